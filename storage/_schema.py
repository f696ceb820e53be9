"""What the storage layer says about a URL and a schema before any contract call runs.

``mask_url`` hides a URL's password in every message the open path raises. ``check_schema``
is the schema guard ``open_storage`` runs on every new handle: a database whose schema is
behind this code (or empty) or ahead of it raises ``MigrationError`` instead of failing
later with "relation does not exist". It relies only on ``schema_version()`` and the
migration files shipped beside the drivers.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from asyncstore.storage._sql import load_migrations
from asyncstore.storage.base import AsyncStorageBackend
from asyncstore.storage.errors import MigrationError, QueryError

# user:password@ in a URL's authority, found without parsing (the URL may not parse).
_USERINFO_PASSWORD = re.compile(r"^(?P<scheme>[^:/]*://)(?P<user>[^:@/]*):[^@/]*@")


_SECRET_PARAMS = frozenset({"password", "sslpassword"})


def mask_url(url: str) -> str:
    """The URL with its password replaced by ``***``, even when the URL does not parse."""
    try:
        parts = urlsplit(url)
        if parts.query:  # e.g. ?listen_url=<a DSN with its own password>&password=...
            query = [
                (k, "***" if k in _SECRET_PARAMS else mask_url(v) if "://" in v else v)
                for k, v in parse_qsl(parts.query, keep_blank_values=True)
            ]
            parts = parts._replace(query=urlencode(query, safe="/:@*"))
        if parts.password is not None:
            host = parts.netloc.rpartition("@")[2]
            parts = parts._replace(netloc=f"{parts.username or ''}:***@{host}")
        return urlunsplit(parts) if parts.query or parts.password is not None else url
    except ValueError:
        return _USERINFO_PASSWORD.sub(r"\g<scheme>\g<user>:***@", url, count=1)


def _first_after(dialect: str, version: int) -> int:
    """The first migration this code ships after ``version`` (numbers may skip: branches
    reserve theirs, so 0013 can land before 0010)."""
    return min(m.version for m in load_migrations(dialect) if m.version > version)


def latest_version(dialect: str) -> int:
    """The newest migration this code ships for ``dialect`` (0 when there is none)."""
    migrations = load_migrations(dialect)
    return migrations[-1].version if migrations else 0


async def check_schema(backend: AsyncStorageBackend, where: str) -> int:
    """Return the schema version, or raise ``MigrationError`` unless it is this code's.

    ``where`` names the database in the message (a masked URL). Cancelling it cancels one
    read and changes nothing.
    """
    try:
        version = await backend.schema_version()
    except QueryError as exc:
        if "permission denied" not in str(exc):
            raise
        raise QueryError(
            f"{where}: this user may not read the schema version ({exc}): grant it SELECT on "
            "schema_migrations (the schema guard reads it when a handle opens) and on the "
            "asyncstore tables"
        ) from exc
    migrations = load_migrations(backend.dialect)
    latest = migrations[-1].version if migrations else 0
    if version == latest:
        return version
    if version < latest:
        first = _first_after(backend.dialect, version)
        state = (
            "has no asyncstore schema (version 0)"
            if version == 0
            else f"has schema version {version}, migrations {first}..{latest} are missing"
        )
        raise MigrationError(
            f"{where} {state}; this code needs version {latest}: run `asyncstore migrate` "
            "(or open it with migrate=True, or set ASYNCSTORE_MIGRATE_ON_START=true)"
        )
    raise MigrationError(
        f"{where} has schema version {version}, newer than this code knows (latest {latest}): "
        "a newer asyncstore migrated it; upgrade asyncstore here (`asyncstore migrate` "
        "cannot go back)"
    )
