"""``python -m benchmarks``: runs the storage benchmark for now."""

from __future__ import annotations

from benchmarks.storage_bench import main

raise SystemExit(main())
