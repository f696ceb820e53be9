"""Behind PgBouncer 1.18 in transaction pooling mode (issue 17).

A real PgBouncer (the ``pgbouncer`` session fixture of ``tests/conftest.py``) sits in front of
the test server. The documented setup (``?pooled=true&listen_url=<direct DSN>``) must deliver
every notification, migrate safely from several instances at once and elect one leader; the
misconfigurations (listening through the pooler, an undeclared pooler) must fail with a clear
``ConfigurationError``, never lose notifications silently.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from urllib.parse import quote, urlsplit

import anyio
import asyncpg
import pytest
from pydantic import SecretStr

from asyncstore.storage import ConfigurationError, StorageSettings, open_storage
from asyncstore.storage._sql import load_migrations
from tests.conftest import pooled_url
from tests.pgbouncer import PgBouncer

pytestmark = pytest.mark.postgres

NOTIFICATIONS = 20


def _bounced(bouncer: PgBouncer, dsn: str) -> str:
    """``dsn``'s database through the pooler, with nothing declared."""
    return bouncer.url(urlsplit(dsn).path.lstrip("/"))


async def _deliver(url: str | StorageSettings, channel: str) -> int:
    """Listen on ``channel``, notify it ``NOTIFICATIONS`` times through the pool and count
    what arrives (waiting on arrivals, with a generous bound for a silently dead listener)."""
    received = 0
    async with open_storage(url) as store, store.listen(channel) as sub:
        for i in range(NOTIFICATIONS):
            await store.notify(channel, str(i))
        with anyio.move_on_after(15):
            while received < NOTIFICATIONS:
                note = await sub.receive()
                if not note.gap:
                    received += 1
    return received


async def test_listen_with_a_direct_listen_url_delivers_every_notification(
    pgbouncer: PgBouncer, postgres_dsn: str
) -> None:
    assert await _deliver(pooled_url(pgbouncer, postgres_dsn), "pgb_ok") == NOTIFICATIONS


async def test_an_undeclared_pooler_is_refused_with_a_clear_error(
    pgbouncer: PgBouncer, postgres_dsn: str
) -> None:
    # Today's failure: 0 of 20 notifications, nothing raised.
    with pytest.raises(ConfigurationError, match=r"storage\.pooled=true"):
        await _deliver(_bounced(pgbouncer, postgres_dsn), "pgb_undeclared")


async def test_listening_through_the_pooler_is_a_clear_error(
    pgbouncer: PgBouncer, postgres_dsn: str
) -> None:
    bounced = _bounced(pgbouncer, postgres_dsn)
    # Declared pooled, no listen_url: nowhere to LISTEN.
    with pytest.raises(ConfigurationError, match="listen_url"):
        await _deliver(f"{bounced}?pooled=true", "pgb_nolisten")
    # listen_url pointing at the pooler too: the LISTEN connection's session would not hold.
    settings = StorageSettings(url=SecretStr(bounced), pooled=True, listen_url=SecretStr(bounced))
    with pytest.raises(ConfigurationError, match="connection pooler"):
        await _deliver(settings, "pgb_listen_pooled")


async def test_pooled_false_skips_the_checks(pgbouncer: PgBouncer, postgres_dsn: str) -> None:
    # The escape hatch for a session-mode pooler: nothing is checked, the call goes through.
    async with open_storage(f"{_bounced(pgbouncer, postgres_dsn)}?pooled=false") as store:
        await store.ping()


@pytest.fixture
async def fresh_database(postgres_dsn: str) -> AsyncIterator[str]:
    """A new, empty database on the test server; its direct DSN."""
    name = f"asyncstore_pgb_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(postgres_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield postgres_dsn.rpartition("/")[0] + f"/{name}"
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def _migrate_together(url: str, instances: int) -> list[list[int] | BaseException]:
    results: list[list[int] | BaseException] = [[] for _ in range(instances)]

    async def one(i: int) -> None:
        try:
            # migrate=True: opening an unmigrated database without it is refused.
            async with open_storage(url, migrate=True) as store:
                results[i] = await store.migrate()
        except Exception as exc:
            results[i] = exc

    with anyio.fail_after(120):  # a migrate left waiting on a stuck lock fails here
        async with anyio.create_task_group() as tg:
            for i in range(instances):
                tg.start_soon(one, i)
    return results


@pytest.mark.parametrize("through", ["pgbouncer", "direct"])
async def test_instances_migrating_at_once_apply_each_migration_once(
    through: str, pgbouncer: PgBouncer, fresh_database: str
) -> None:
    url = pooled_url(pgbouncer, fresh_database) if through == "pgbouncer" else fresh_database
    results = await _migrate_together(url, 3)
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors
    versions = [m.version for m in load_migrations("postgres")]
    conn = await asyncpg.connect(fresh_database)
    try:
        recorded = [r[0] for r in await conn.fetch("SELECT version FROM schema_migrations")]
    finally:
        await conn.close()
    assert sorted(recorded) == versions  # every migration applied exactly once, by someone
    # Nothing left held: the next instance migrates (nothing to do) without waiting.
    again = await _migrate_together(url, 1)
    assert again == [[]]
    async with open_storage(url) as store:
        assert await store.schema_version() == versions[-1]


async def test_one_leader_through_pgbouncer(pgbouncer: PgBouncer, postgres_dsn: str) -> None:
    url = pooled_url(pgbouncer, postgres_dsn)
    name = f"sweep_{secrets.token_hex(3)}"
    async with (
        open_storage(url) as a,
        open_storage(url) as b,
        open_storage(url) as c,
        a.open_leadership(name, ttl_s=30) as la,
        b.open_leadership(name, ttl_s=30) as lb,
        c.open_leadership(name, ttl_s=30) as lc,
    ):
        for _ in range(5):
            leaders = [await role.try_lead() for role in (la, lb, lc)]
            assert leaders.count(True) == 1, leaders
        first = [la, lb, lc][leaders.index(True)]
        others = [r for r in (la, lb, lc) if r is not first]
        await first.aclose()  # gives the role up: one of the others takes it over
        leaders = [await role.try_lead() for role in others]
        assert leaders.count(True) == 1, leaders


async def test_leadership_without_a_session_dsn_is_a_clear_error(
    pgbouncer: PgBouncer, postgres_dsn: str
) -> None:
    async with (
        open_storage(f"{_bounced(pgbouncer, postgres_dsn)}?pooled=true") as store,
        store.open_leadership("sweep", ttl_s=30) as role,
    ):
        with pytest.raises(ConfigurationError, match="listen_url"):
            await role.try_lead()


async def test_every_call_works_with_statement_cache_off(
    pgbouncer: PgBouncer, postgres_dsn: str
) -> None:
    # Declared pooled: named prepared statements are off whatever statement_cache_size says.
    direct = postgres_dsn
    settings = StorageSettings(
        url=SecretStr(_bounced(pgbouncer, direct)),
        pooled=True,
        listen_url=SecretStr(direct),
        statement_cache_size=100,
    )
    async with open_storage(settings) as store:
        for _ in range(30):  # more calls than server connections: they move between them
            await store.ping()
            assert await store.last_stream_seq(f"nobody_{quote('x')}") == 0


async def test_a_multi_host_dsn_finds_the_writable_server(postgres_dsn: str) -> None:
    # The first host refuses; target_session_attrs=read-write takes the next that accepts writes.
    parts = urlsplit(postgres_dsn)
    url = (
        f"postgresql://postgres@127.0.0.1:1,{parts.hostname}:{parts.port or 5432}{parts.path}"
        "?target_session_attrs=read-write"
    )
    async with open_storage(url) as store, store.listen("multi_host") as sub:
        await store.notify("multi_host", "x")
        with anyio.fail_after(30):
            assert (await sub.receive()).payload == "x"
