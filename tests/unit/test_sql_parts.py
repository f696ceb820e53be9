"""Shared SQL parts (``-- name: _part_x`` blocks, ``-- include: _part_x`` lines)."""

from __future__ import annotations

from importlib import resources

import pytest

from asyncstore.storage._sql import load_queries, parse_queries
from asyncstore.storage.errors import InvalidArgument

TEXT = """
-- name: _part_cols
-- a comment that is not copied
a = 1,
b = 2

-- name: one
UPDATE t SET
    -- include: _part_cols
WHERE id = 1;

-- name: two
UPDATE u SET
  -- include: _part_cols
;
"""


def test_an_included_part_is_copied_at_the_lines_indent_and_is_not_a_query() -> None:
    queries = parse_queries(TEXT)
    assert set(queries) == {"one", "two"}
    assert queries["one"] == "UPDATE t SET\n    a = 1,\n    b = 2\nWHERE id = 1"
    assert queries["two"] == "UPDATE u SET\n  a = 1,\n  b = 2"


def test_an_unknown_part_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="_part_nope"):
        parse_queries("-- name: q\nSELECT 1,\n-- include: _part_nope\n")


@pytest.mark.parametrize("dialect", ["postgres", "sqlite"])
def test_the_claims_lease_expired_rule_is_written_once_per_dialect(dialect: str) -> None:
    folder = resources.files("asyncstore.storage").joinpath("sql", dialect)
    text = folder.joinpath("queries.sql").read_text("utf-8")
    queries = load_queries(dialect)
    for name in ("claim_tasks", "claim_limited_tasks"):
        written = text.split(f"-- name: {name}\n", 1)[1].split("-- name:", 1)[0]
        assert "-- include: _part_claim_attempt" in written
        assert "lease expired on the last attempt" not in written
        assert "'lease expired on the last attempt'" in queries[name]
        assert "include:" not in queries[name]
