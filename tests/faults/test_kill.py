"""SIGKILL of a producer mid-batch: the next holder continues the stream at the right seq and
every subscriber sees one consistent stream.

Producer A streams with a 200 ms flush interval, so when it is killed it holds events it
already published to its own live subscribers but never stored. Producer B, another process,
takes the lease once A's expires and continues after the highest stored seq, in a new epoch.
"""

from __future__ import annotations

from pathlib import Path

from asyncstore.orchestrator.broadcast import BroadcastHub, StreamReset
from asyncstore.storage import StreamEvent, open_storage
from tests.faults.conftest import FaultDB
from tests.faults.procs import check_stored_stream, check_view, collect, load_stream, spawn_agent

SESSION = "killed-producer"
OPTS = {
    "lease_ttl_s": 2.0,
    "limiter": {"backoff_initial_s": 0.1, "backoff_max_s": 0.5},
    "batch": {"flush_interval_s": 0.2},
}


async def test_sigkilled_producer_next_holder_continues_at_the_right_seq(
    fault_db: FaultDB, tmp_path: Path
) -> None:
    log = tmp_path / "a.seqs"
    async with (
        open_storage(fault_db.url) as storage,
        BroadcastHub(storage) as hub,
        collect(hub.subscribe(SESSION, after=(0, 0))) as seen,
    ):
        async with spawn_agent("A", fault_db.url, log=str(log), **OPTS) as a:
            t1 = (await a.call("hold", session=SESSION))["token"]
            await a.call("begin", session=SESSION)
            await a.call("run", session=SESSION, every_s=0.002, report_every=10)
            await seen.wait_until(lambda c: c.last_seq() >= 50, what="A's stored events")
            await a.wait_for(lambda m: m.get("event") == "progress" and m["count"] >= 100)
            a.kill()
            await a.process.wait()
        # (epoch, seq) of every event A published, written before its next emit.
        published = [tuple(map(int, line.split())) for line in log.read_text().splitlines()]
        assert {epoch for epoch, _ in published} == {t1}
        last_published = published[-1][1]

        async with spawn_agent("B", fault_db.url, **OPTS) as b:
            t2 = (await b.call("hold", session=SESSION, limit_s=30))["token"]
            assert t2 > t1
            # Read only now: a batch A sent just before the kill may have committed after it
            # (the server finishes a statement whose client died); B's lease waited for it.
            stored_by_a = await load_stream(storage, SESSION)
            last_stored = stored_by_a[-1].seq
            # The kill landed mid-batch: A had published events it never stored.
            assert last_published > last_stored, (last_published, last_stored)
            assert (await b.call("begin", session=SESSION))["last"] == last_stored
            n = last_published - last_stored + 20
            emitted = await b.call("emit", session=SESSION, n=n, tag="B")
            assert emitted["seqs"] == list(range(last_stored + 1, last_stored + n + 1)), emitted
            b_stats = await b.call("flush")
            final_seq = last_stored + n
            await seen.wait_until(lambda c: c.last_seq() >= final_seq, what="B's events")
            rows = await load_stream(storage, SESSION)
            closed = await b.close()

        check_stored_stream(rows)
        assert [r.epoch for r in rows] == [t1] * last_stored + [t2] * n
        assert rows[: len(stored_by_a)] == stored_by_a  # B replaced nothing A had stored
        assert b_stats["writer"]["refused"] == 0 and closed["writer"]["lost"] == 0, closed
        # The live subscriber in this process: one stream, exactly, with no reset.
        assert seen.resets == []
        assert [e.seq for e in seen.events] == list(range(1, final_seq + 1))
        check_view(seen.items, rows)

        async with BroadcastHub(storage) as fresh:
            # A client resuming from the last stored event of A continues exactly.
            async with collect(fresh.subscribe(SESSION, after=(t1, last_stored))) as resumed:
                await resumed.wait_until(lambda c: c.last_seq() >= final_seq, what="resume")
            assert resumed.resets == []
            assert _ids(resumed.events) == _ids(seen.events[last_stored:])
            # A client of A's that saw an event A never stored is told its view changed.
            after = (t1, last_published)
            async with collect(fresh.subscribe(SESSION, after=after)) as orphan:
                await orphan.wait_until(lambda c: c.head() >= final_seq, what="orphan resume")
            first = orphan.items[0]
            assert isinstance(first, StreamReset) and first.reason == "epoch_changed", first
            assert orphan.resets == [first]
            check_view(orphan.items, rows)
            # A client reading from the start gets the same stream the live one got.
            async with collect(fresh.subscribe(SESSION, after=(0, 0))) as replay:
                await replay.wait_until(lambda c: c.last_seq() >= final_seq, what="replay")
            assert replay.resets == []
            assert _ids(replay.events) == _ids(seen.events)


def _ids(events: list[StreamEvent]) -> list[tuple[int, int, object]]:
    return [(e.epoch, e.seq, e.payload) for e in events]
