"""Named SQL queries and versioned migrations, loaded once from the ``sql/`` folder.

Each dialect keeps its queries in ``sql/<dialect>/queries.sql`` as blocks that start with a
``-- name: <query_name>`` line, and its migrations in ``sql/<dialect>/migrations/NNNN_*.sql``.
Drivers look queries up by name; both dialects must define the same names (a test checks).

A block named ``_part_<name>`` is a shared piece of SQL, not a statement: a line
``-- include: _part_<name>`` in another block is replaced by it (at that line's indent),
and the parts themselves are not among the loaded queries. One statement's rule written
once where two statements need it (the claims' lease-expired handling).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

from asyncstore.storage.errors import InvalidArgument, MigrationError

_NAME = re.compile(r"^--\s*name:\s*(\w+)\s*$", re.MULTILINE)
_MIGRATION = re.compile(r"^(\d{4})_(\w+)\.sql$")
_INCLUDE = re.compile(r"^([ \t]*)--\s*include:\s*(\w+)\s*$", re.MULTILINE)
_PART = "_part_"


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str

    def statements(self) -> list[str]:
        """Split on ``;`` at line ends (for drivers that run one statement at a time)."""
        parts = re.split(r";\s*$", self.sql, flags=re.MULTILINE)
        return [p.strip() for p in parts if p.strip() and not _only_comments(p)]


def _only_comments(text: str) -> bool:
    return all(not line.strip() or line.strip().startswith("--") for line in text.splitlines())


def parse_queries(text: str) -> dict[str, str]:
    """Split a ``queries.sql`` text into ``{name: sql}``; duplicate names are an error."""
    queries: dict[str, str] = {}
    matches = list(_NAME.finditer(text))
    for i, match in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        body = text[match.end() : end].strip().rstrip(";").strip()
        name = match.group(1)
        if name in queries:
            raise InvalidArgument(f"query {name!r} is defined twice")
        queries[name] = body
    return _expand_parts(queries)


def _expand_parts(queries: dict[str, str]) -> dict[str, str]:
    """Replace each ``-- include: _part_x`` line by the part's SQL; drop the parts."""
    parts = {n: sql for n, sql in queries.items() if n.startswith(_PART)}

    def include(match: re.Match[str]) -> str:
        indent, name = match.group(1), match.group(2)
        if name not in parts:
            raise InvalidArgument(f"included SQL part {name!r} is not defined")
        lines = [ln for ln in parts[name].splitlines() if not ln.lstrip().startswith("--")]
        return "\n".join(indent + ln for ln in lines)

    return {n: _INCLUDE.sub(include, sql) for n, sql in queries.items() if not n.startswith(_PART)}


def load_queries(dialect: str) -> dict[str, str]:
    folder = resources.files("asyncstore.storage").joinpath("sql", dialect)
    text = folder.joinpath("queries.sql").read_text("utf-8")
    return parse_queries(text)


def load_migrations(dialect: str) -> list[Migration]:
    folder = resources.files("asyncstore.storage").joinpath("sql", dialect, "migrations")
    found: list[Migration] = []
    for entry in folder.iterdir():
        match = _MIGRATION.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), match.group(2), entry.read_text("utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"{dialect}: two migrations share a version number")
    return found
