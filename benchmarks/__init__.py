"""Measurements of asyncstore's hot paths (run them; they are not tests)."""
