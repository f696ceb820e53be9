"""``python -m benchmarks``: the S1-S4 load tests, optimized vs legacy, as one command.

Runs the scenarios of ``benchmarks.scenarios`` on the embedded SQLite default (a file in a
temporary directory) or, with ``--url``, on a throwaway database created on that Postgres
server (peers' schemas installed there too) and dropped afterwards. For each scenario: a
warm-up of both paths, then ``repeats`` repetitions with the optimized and the legacy path
alternating (A B, B A, ...) so machine drift hits both; the median and the spread
((max - min) / median) of each figure are reported, and a comparison whose spread exceeds
25% is marked too noisy instead of met. Output: a progress bar per scenario (rich), one
table, a PNG (matplotlib) and, with ``--json``, every figure with the machine, versions,
settings and git commit.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import math
import sys
import tempfile
import textwrap
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import anyio
import orjson

from asyncstore.orchestrator.config import Settings, load_settings, masked_dump
from asyncstore.orchestrator.runtime import Runtime, open_runtime
from asyncstore.orchestrator.webhooks import load_hooks
from asyncstore.storage import Task, open_storage
from benchmarks import _common
from benchmarks.scenarios import (
    HOOKS_TOML,
    LEGACY,
    OPTIMIZED,
    PATHS,
    S1_PHASES,
    S2_RATE,
    Sizes,
    s1_once,
    s3_once,
    s4_fill,
    s4_once,
    spawn_receiver,
)

SCENARIOS = ("S1", "S2", "S3", "S4")
NOISY = _common.NOISY
DEFAULT_PLOT = "bench-results.png"
PEERS = ("pgqueuer", "procrastinate")

Figures = dict[str, dict[str, list[float]]]


@dataclass(frozen=True, slots=True)
class Row:
    """One line of the table: a figure, both paths, and its target when it has one."""

    scenario: str
    figure: str
    optimized: str
    legacy: str
    ratio: str
    target: str
    verdict: str


# ---------------------------------------------------------------- running


class _Bar:
    """Progress of one scenario in units of (path repetitions), fed by fractional ticks."""

    def __init__(self, progress: Any, label: str, units: int) -> None:
        self._progress = progress
        self._task = progress.add_task(label, total=units) if progress is not None else None
        self._base = 0.0

    def tick(self, fraction: float) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=self._base + min(1.0, fraction))

    def next(self, label: str | None = None) -> None:
        self._base += 1
        if self._progress is not None:
            self._progress.update(self._task, completed=self._base, description=label)

    def done(self) -> None:
        if self._progress is not None:
            total = self._progress.tasks[self._task].total
            self._progress.update(self._task, completed=total)


async def _alternate(
    name: str,
    repeats: int,
    bar: _Bar,
    once: Callable[[str, str, int], Awaitable[dict[str, Any]]],
    figures: Figures,
    series: dict[str, Any],
) -> None:
    for rep in range(repeats):
        order = PATHS if rep % 2 == 0 else tuple(reversed(PATHS))
        for path in order:
            result = await once(path, f"{name}r{rep}{path[0]}", rep)
            for key, value in result.items():
                if key == "series":
                    series[path] = value
                else:
                    figures[path].setdefault(key, []).append(float(value))
            bar.next(f"{name} rep {rep + 1}/{repeats}")


def _settings(url: str) -> Settings:
    return load_settings(
        storage={"url": url}, migrate_on_start=True, runtime={"reload_on_sighup": False}
    )


async def _noop(task: Task) -> None:
    return None


def _set_path(rt: Runtime, path: str) -> None:
    rt.update_flags(**(OPTIMIZED if path == "optimized" else LEGACY))


def _seed_legacy(rt: Runtime) -> None:
    """The legacy stream path as the seed's "before" wrote it: one INSERT per event, no NOTIFY.

    The runtime's per-event writer notifies after every insert, for the memory hubs of other
    instances; none listens here (one process; the legacy path delivers by polling), so
    that notification is work the seed never did and is switched off for the comparison.
    """
    legacy = rt._streams.legacy
    assert legacy is not None, "built by _with_runtime"
    legacy.config = legacy.config.model_copy(update={"notify": False})


def _half(bar: _Bar, start: float) -> Callable[[float], None]:
    """A progress callback filling half of the current unit, from ``start``."""
    return lambda fraction: bar.tick(start + fraction / 2)


def _result() -> dict[str, Any]:
    return {
        "figures": {"optimized": {}, "legacy": {}},
        "series": {},
        "peers": {},
        "notes": [],
    }


async def _with_runtime(
    name: str, settings: Settings, hooks: Any, sizes: Sizes, progress: Any
) -> dict[str, Any]:
    """S1, S2 or S4 on one runtime, the paths switched with ``rt.update_flags``."""
    res = _result()
    reps = sizes.s4_repeats if name == "S4" else sizes.repeats
    fill = name == "S4" and sizes.s4_fill
    bar = _Bar(progress, f"{name} warm-up", 2 + int(fill) + 2 * reps)
    enqueued = [0]
    async with open_runtime(settings, hooks=hooks, queue_handler=_noop) as rt:
        # Both paths of every flag run from the start: the suite switches between them
        # each repetition, and S1's probes wrap the components of both.
        for switch in (rt._broadcast, rt._cancellation, rt._limiter, rt._streams):
            await switch.get(True)
            await switch.get(False)
        _seed_legacy(rt)

        async def once(path: str, tag: str, rep: int, warm: bool = False) -> Any:
            _set_path(rt, path)
            if name == "S1":
                if warm:
                    turns = max(4, sizes.s1_turns // 5)
                    return await s1_once(rt, tag, turns, sizes.s1_deltas, bar.tick)
                # The seed's concurrency, then one that leaves the machine unsaturated.
                high = await s1_once(rt, tag, sizes.s1_turns, sizes.s1_deltas, _half(bar, 0))
                low = await s1_once(
                    rt,
                    f"{tag}l",
                    sizes.s1_low_turns,
                    sizes.s1_deltas,
                    _half(bar, 0.5),
                    sizes.s1_low_concurrency,
                )
                return high | {f"low_{key}": value for key, value in low.items()}
            seconds = min(1.0, sizes.s4_segment_s) if warm else sizes.s4_segment_s
            return await s4_once(rt, tag, seconds, sizes.s4_concurrency, enqueued, bar.tick)

        for path in PATHS:
            await once(path, f"{name}warm{path[0]}", 0, True)
            bar.next(f"{name} warm-up")
        if fill:
            res["fill"] = await _fill_rings(rt, sizes, enqueued, bar)
            res["notes"].append(_fill_note(res["fill"]))
        await _alternate(name, reps, bar, once, res["figures"], res["series"])
    bar.done()
    report = rt.report
    if report is not None and not report.complete:
        res["notes"].append(f"closing the runtime left work undelivered: {report}")
    if name == "S4":
        res["notes"].append("the agent-queue worker is process-wide: both paths use claim mode")
        trims = rt.heap_trim.statistics()
        res["heap_trim"] = asdict(trims)
        res["notes"].append(
            f"heap trims (runtime.heap_trim_interval_s {trims.interval_s:g} s): {trims.runs}, "
            f"{trims.released} gave memory back; the last took {trims.last_ms:.1f} ms"
        )
    if name == "S1":
        low = f"{sizes.s1_low_turns} turns, {sizes.s1_low_concurrency} at once"
        res["labels"] = {"hi": sizes.s1_turns, "lo": low}
        res["notes"].append(
            "library time: inside the library's calls (turn entry with the lease, appends, "
            "emits, hooks, turn exit with the flush and release), timed around each call; "
            "outside: the rest of the overhead (the simulated model's sleeps waking late, "
            "gaps between calls); parts p50 (lease ... other) at the unsaturated concurrency"
        )
        res["notes"].append(
            "legacy: the seed's stream path, one INSERT per event and no NOTIFY (nobody "
            f"listens); {sizes.s1_deltas} token deltas per turn"
        )
    return res


async def _fill_rings(rt: Runtime, sizes: Sizes, enqueued: list[int], bar: _Bar) -> Any:
    """S4's fill: the memory hub keeps a ring per recent session up to a bound (``max_rings``,
    or ``ring_idle_ttl_s`` of idleness), so a soak of fresh sessions raises RSS until the
    bound is reached; the repetitions measure from there. The TTL bound is met at the
    latest one TTL and a sweep after the first ring, hence the limit."""
    hub = rt._broadcast.optimized
    cfg = hub.config if hub is not None else rt.settings.broadcast
    limit = cfg.ring_idle_ttl_s + 2 * cfg.sweep_interval_s
    _set_path(rt, "optimized")
    out = await s4_fill(rt, "S4fill", sizes.s4_concurrency, limit, enqueued, bar.tick)
    bar.next("S4 fill")
    return out


def _fill_note(fill: dict[str, float]) -> str:
    how = "reached" if fill["fill_reached"] else "NOT reached (time limit)"
    return (
        f"before the repetitions, sessions churned {fill['fill_s']:.0f} s until the memory "
        f"hub's ring bound was {how}: {fill['fill_rings']:.0f} rings held (a ring per recent "
        "session, bounded by broadcast.max_rings and ring_idle_ttl_s); growth is measured "
        "from that level"
    )


async def _s2(url: str, sizes: Sizes, progress: Any) -> dict[str, Any]:
    """S2 over sockets (``benchmarks.s2_sockets``): the library's optimized path against
    its legacy (poll) path, a bare broadcast server as the ceiling, two servers on Postgres."""
    from benchmarks import s2_sockets

    res = _result()
    case = s2_sockets.S2Case(
        sizes.s2_streams, sizes.s2_subscribers, sizes.s2_events, sizes.s2_clients, S2_RATE
    )
    bar = _Bar(progress, "S2", sizes.s2_repeats * len(s2_sockets.CASES))
    errors: list[str] = []
    out = await s2_sockets.run_cases(
        url,
        case,
        s2_sockets.CASES,
        sizes.s2_repeats,
        lambda done: bar.next(f"S2 {done}"),
        errors,
    )
    bar.done()
    if sizes.s2_held:
        # The seed's size is more than this machine holds: how far down each one holds.
        probes = _Bar(progress, "S2 held", 2 * len(s2_sockets.HELD_FRACTIONS).bit_length())
        res["held"] = await s2_sockets.find_held(
            url, case, ["bare", "library"], lambda done: probes.next(f"S2 held {done}"), errors
        )
        probes.done()
    res["figures"]["optimized"] = out["library"]
    res["figures"]["legacy"] = out["legacy"]
    res["ceiling"] = out.get("bare", {})
    res["cross"] = out.get("cross", {})
    res["notes"].extend(s2_sockets.notes(case, url, sizes.s2_repeats))
    res["notes"].extend(f"FAILED run: {e}" for e in errors)
    return res


async def _s3(url: str, dialect: str, sizes: Sizes, tmp: Path, progress: Any) -> dict[str, Any]:
    """S3: worker processes with one killed while it holds claims, both queue modes, peers."""
    from benchmarks import queue_bench

    res = _result()
    res["lease_s"] = sizes.s3_lease_s
    notes: list[str] = res["notes"]
    peers: dict[str, list[float]] = res["peers"]
    peer_list = [p for p in PEERS if importlib.util.find_spec(p) is not None]
    if dialect != "postgres":
        notes.append(
            f"SQLite: {sizes.s3_workers} worker processes on one file (BEGIN IMMEDIATE); "
            "the peers need Postgres: skipped"
        )
        peer_list = []
    else:
        notes.extend(
            f"{p} not installed (pip install -e '.[peers]'): skipped"
            for p in PEERS
            if p not in peer_list
        )
    if "procrastinate" in peer_list and not sizes.s3_procrastinate:
        # It drains 0.1-0.5k tasks/s here: the same backlog would take most of a quick pass.
        peer_list.remove("procrastinate")
        notes.append("procrastinate runs in --full only (quick pass: skipped)")
    if peer_list:
        notes.append(
            f"peers drain the same backlog ({sizes.s3_tasks:,} tasks) with {sizes.s3_workers} "
            f"processes, no kill, at the claim worker's concurrency "
            f"({queue_bench.concurrency(100)} per process, batch 100)"
        )
    notes.append(
        f"one worker starts first and holds every task it starts (they block); the others "
        f"start, and once they ran half of the rest it is SIGKILLed while holding its claims; "
        f"re-run delay: kill to the last held claim run again "
        f"in a live worker; lease {sizes.s3_lease_s:g} s, claim mode's fallback poll set to "
        "the lease, poll_spawn polls every 1 s"
    )
    bar = _Bar(progress, "S3", (3 + len(peer_list)) * sizes.s3_repeats)
    mode = {"optimized": "claim", "legacy": "poll_spawn"}

    async def drain(path: str, tag: str, rep: int) -> Any:
        return await s3_once(
            url, mode[path], sizes.s3_tasks, sizes.s3_workers, sizes.s3_lease_s, tmp, bar.tick
        )

    for rep in range(sizes.s3_repeats):
        await _alternate("S3", 1, bar, drain, res["figures"], res["series"])
        plain = await s3_once(
            url,
            "claim",
            sizes.s3_tasks,
            sizes.s3_workers,
            sizes.s3_lease_s,
            tmp,
            bar.tick,
            kill=False,
        )
        res["figures"]["optimized"].setdefault("tasks_per_s_no_kill", []).append(
            plain["tasks_per_s"]
        )
        bar.next(f"S3 rep {rep + 1}/{sizes.s3_repeats}")
        for peer in peer_list:
            n = sizes.s3_tasks
            rate, dups, missing = await queue_bench._drain_once(peer, url, n, sizes.s3_workers)
            peers.setdefault(peer, []).append(rate)
            peers.setdefault(f"{peer}_duplicates", []).append(float(dups))
            peers.setdefault(f"{peer}_lost", []).append(float(missing))
            bar.next(f"S3 rep {rep + 1}/{sizes.s3_repeats}")
    bar.done()
    return res


async def run_suite(
    url: str,
    scenarios: Sequence[str],
    sizes: Sizes,
    tmp: Path,
    progress: Any = None,
    hooks_url: str | None = None,
) -> dict[str, Any]:
    """Run ``scenarios`` on the (migrated) database at ``url``; returns every figure."""
    out: dict[str, Any] = {}
    dialect = "postgres" if url.startswith("postgres") else "sqlite"
    hooks_file = tmp / "hooks.toml"
    receiver = None
    if hooks_url is None:
        receiver = await anyio.to_thread.run_sync(spawn_receiver)
        stdout = receiver.stdout
        if stdout is None:
            raise RuntimeError("the webhook receiver has no stdout")
        hooks_url = (await anyio.to_thread.run_sync(stdout.readline)).strip()
    try:
        hooks_file.write_text(HOOKS_TOML.format(url=hooks_url))
        hooks = load_hooks(hooks_file)
        settings = _settings(url)
        out["settings"] = masked_dump(settings)

        for name in scenarios:
            started = time.perf_counter()
            try:
                if name == "S3":
                    res = await _s3(url, dialect, sizes, tmp, progress)
                elif name == "S2":
                    res = await _s2(url, sizes, progress)
                else:
                    res = await _with_runtime(name, settings, hooks, sizes, progress)
                    if name == "S4" and dialect == "sqlite":
                        res["notes"].append("open connections: sockets of the process (no pool)")
            except Exception as exc:  # one scenario's failure is reported, the rest still run
                res = _result()
                res["error"] = f"{type(exc).__name__}: {exc}"[:500]
                res["notes"].append(f"FAILED: {res['error']}")
                logging.getLogger("benchmarks").exception("scenario %s failed", name)
            res["seconds"] = time.perf_counter() - started
            out[name] = res
    finally:
        if receiver is not None:
            if receiver.stdin is not None:
                receiver.stdin.close()
            await anyio.to_thread.run_sync(receiver.wait)
    return out


# ---------------------------------------------------------------- judging


def _med(values: list[float] | None) -> float | None:
    return _common.median(values) if values else None


def _fmt(value: float | None, unit: str) -> str:
    if value is None or math.isnan(value):
        return "-"
    if unit == "n":
        return f"{value:,.0f}"
    if unit == "%":
        return f"{value:+.1f}%"
    if abs(value) >= 1000:
        return f"{value:,.0f} {unit}".strip()
    if abs(value) >= 10:
        return f"{value:.1f} {unit}".strip()
    return f"{value:.2f} {unit}".strip()


def _cell(values: list[float] | None, unit: str) -> str:
    if not values:
        return "-"
    text = _fmt(_common.median(values), unit)
    s = _common.spread(values)
    if len(values) > 1 and unit not in ("n",) and math.isfinite(s) and s > 0:
        text += f" ±{s * 50:.0f}%"
    return text


def _compare(o: list[float], lg: list[float], meets: Callable[[float, float], bool]) -> str:
    """Verdict of a comparison target: the suite's noise rule (``_common.compare``)."""
    return _common.compare(o, lg, meets)


FIGURES: dict[str, list[tuple[str, str, str]]] = {
    "S1": [
        ("lib_p50_ms", "library time/turn p50 ({hi} turns)", "ms"),
        ("lib_p95_ms", "library time/turn p95 ({hi} turns)", "ms"),
        ("lib_p99_ms", "library time/turn p99 ({hi} turns)", "ms"),
        ("lag_p95_ms", "outside the library/turn p95 ({hi})", "ms"),
        ("p95_ms", "overhead/turn p95, both ({hi})", "ms"),
        ("loop_lag_p99_ms", "event-loop lag p99 ({hi})", "ms"),
        ("cpu_ms_per_turn", "process CPU/turn ({hi})", "ms"),
        ("low_lib_p50_ms", "library time/turn p50 ({lo})", "ms"),
        ("low_lib_p95_ms", "library time/turn p95 ({lo})", "ms"),
        ("low_lib_p99_ms", "library time/turn p99 ({lo})", "ms"),
        ("low_lag_p95_ms", "outside the library/turn p95 ({lo})", "ms"),
        ("low_p95_ms", "overhead/turn p95, both ({lo})", "ms"),
        ("low_loop_lag_p99_ms", "event-loop lag p99 ({lo})", "ms"),
        *[(f"low_{phase}_p50_ms", f"  {phase} p50 ({{lo}})", "ms") for phase in S1_PHASES],
        ("statements_per_turn", "db statements/turn", ""),
    ],
    "S2": [
        ("deliveries_per_s", "deliveries/s (sockets)", "/s"),
        ("p50_ms", "delivery latency p50", "ms"),
        ("p99_ms", "delivery latency p99", "ms"),
        ("server_us_per_delivery", "server CPU per delivery", "us"),
        ("db_reads_per_s", "db reads/s by subscribers", "/s"),
        ("live_reads", "reads by live subscribers", "n"),
        ("undelivered", "not delivered within the run's limit", "n"),
        ("misordered", "gaps/duplicates/out of order", "n"),
        ("rss_per_conn_kib", "server RSS per connection", "KiB"),
        ("close_s", "producers' turns closed after the window", "s"),
        ("close_timed_out", "runs whose close passed the limit", "n"),
        ("failed_runs", "runs that failed (see notes)", "n"),
    ],
    "S3": [
        ("kill_rerun_s", "killed worker's held claims run again after", "s"),
        ("held_at_kill", "claims held by the killed worker", "n"),
        ("tasks_per_s_no_kill", "drain rate, no kill (claim)", "/s"),
        ("duplicates", "duplicates (live workers)", "n"),
        ("lost", "lost tasks", "n"),
        ("rerun_after_kill", "re-runs of the killed worker's claims", "n"),
        ("outcomes_undelivered", "outcomes given up at a live worker's stop", "n"),
    ],
    "S4": [
        ("rss_growth_pct", "RSS growth after warm-up (max)", "%"),
        ("rss_mb", "peak RSS", "MiB"),
        ("sessions_per_s", "sessions/s", "/s"),
        ("peak_connections", "peak open connections", "n"),
        ("queues_left", "queued items left at the end (max)", "n"),
        ("drain_s", "time for queues to empty", "s"),
        ("events_lost", "stream events lost (counted)", "n"),
    ],
}
# Counts of runs: the table shows their sum over the repeats.
SUM_FIGURES = {("S2", "close_timed_out"), ("S2", "failed_runs")}
MAX_FIGURES = {
    ("S4", "rss_growth_pct"),
    ("S4", "queues_left"),
    ("S3", "duplicates"),
    ("S3", "lost"),
    ("S3", "outcomes_undelivered"),
    ("S4", "events_lost"),
    ("S2", "undelivered"),
    ("S2", "misordered"),
}


def judge(results: dict[str, Any]) -> list[Row]:
    """The table's rows, with each target's verdict: met, NOT met, too noisy or skipped."""
    rows: list[Row] = []
    for name in SCENARIOS:
        if name not in results:
            continue
        res = results[name]
        if "error" in res:
            rows.append(Row(name, "scenario failed (see notes)", "-", "-", "-", "", "failed"))
            continue
        opt: dict[str, list[float]] = res["figures"]["optimized"]
        leg: dict[str, list[float]] = res["figures"]["legacy"]
        labels = res.get("labels", {})
        for key, template, unit in FIGURES[name]:
            label = template.format(**labels) if labels else template
            o, lg = opt.get(key), leg.get(key)
            if (name, key) in SUM_FIGURES:
                if not (o and sum(o)) and not (lg and sum(lg)):
                    continue  # no run closed late or failed: no row
                o_cell, l_cell = _fmt(sum(o or [0.0]), unit), _fmt(sum(lg or [0.0]), unit)
            elif (name, key) in MAX_FIGURES:
                o_cell = _fmt(max(o), unit) if o else "-"
                l_cell = _fmt(max(lg), unit) if lg else "-"
            else:
                o_cell, l_cell = _cell(o, unit), _cell(lg, unit)
            om, lm = _med(o), _med(lg)
            # A part the legacy path does not have (the end-of-turn flush) has no ratio.
            ratio = f"{om / lm:.2f}x" if om is not None and lm and om / lm < 1000 else "-"
            target, verdict = _target(name, key, o, lg, res)
            rows.append(Row(name, label, o_cell, l_cell, ratio, target, verdict))
        for peer in PEERS:
            rates = res["peers"].get(peer)
            if not rates:
                continue
            om = _med(opt.get("tasks_per_s_no_kill"))
            pm = _common.median(rates)
            ratio = f"{om / pm:.2f}x" if om else "-"
            target, verdict = "", ""
            if peer == "pgqueuer":
                target = ">= 1.5x pgqueuer"
                claim = opt.get("tasks_per_s_no_kill")
                if claim:
                    verdict = _compare(claim, rates, lambda a, b: a >= 1.5 * b)
            dups = int(sum(res["peers"].get(f"{peer}_duplicates", [])))
            rows.append(
                Row(
                    name,
                    f"{peer} drain rate, no kill ({dups} dups)",
                    _cell(rates, "/s"),
                    "",
                    ratio,
                    target,
                    verdict,
                )
            )
        if name == "S2":
            from benchmarks.s2_sockets import extra_rows

            rows.extend(Row(name, *row) for row in extra_rows(res))
        if name == "S3" and "pgqueuer" not in res["peers"]:
            rows.append(Row(name, "vs pgqueuer", "", "", "", ">= 1.5x pgqueuer", "skipped"))
    return rows


def _target(
    name: str,
    key: str,
    o: list[float] | None,
    lg: list[float] | None,
    res: dict[str, Any],
) -> tuple[str, str]:
    if not o:
        return "", ""
    if name == "S1" and key in ("lib_p95_ms", "low_lib_p95_ms") and lg:
        seed = _compare(o, lg, lambda a, b: a <= 0.7 * b)
        return f">= 70% lower (seed 30%: {seed})", _compare(o, lg, lambda a, b: a <= 0.3 * b)
    if name == "S2" and key == "live_reads":
        return "0 live reads", "met" if max(o) == 0 else "NOT met"
    if name == "S2" and key == "misordered":
        both = list(o) + list(lg or [])
        return "0 (both paths)", "met" if max(both) == 0 else "NOT met"
    if name == "S2" and key == "undelivered":
        return "0", "met" if max(o) == 0 else "NOT met"
    if name == "S2" and key == "db_reads_per_s" and lg:
        return "seed: >= 60% lower", _compare(o, lg, lambda a, b: a <= 0.4 * b)
    if name == "S3" and key == "kill_rerun_s" and "lease_s" in res:
        bound = res["lease_s"] + 1.0
        return f"<= lease + 1 s ({bound:g} s)", _common.check(o, lambda v: v <= bound)
    if name == "S3" and key in ("duplicates", "lost", "outcomes_undelivered"):
        both = list(o) + list(lg or [])
        return "0", "met" if max(both) == 0 else "NOT met"
    if name == "S4" and key == "rss_growth_pct":
        return "< 5%", "met" if max(o) < 5.0 else "NOT met"
    if name == "S4" and key == "queues_left":
        both = list(o) + list(lg or [])
        return "0 (both paths)", "met" if max(both) == 0 else "NOT met"
    return "", ""


# ---------------------------------------------------------------- output


def _failures(results: dict[str, Any]) -> list[str]:
    """The scenarios that failed, or had a run fail (S2's ceiling and two-server runs too)."""
    out = []
    for name in SCENARIOS:
        res = results.get(name)
        if res is None:
            continue
        parts = [*res["figures"].values(), res.get("ceiling") or {}, res.get("cross") or {}]
        if "error" in res or any(part.get("failed_runs") for part in parts):
            out.append(name)
    return out


def render(rows: Sequence[Row], title: str, console: Any) -> None:
    from rich.table import Table

    table = Table(title=title, title_justify="left", show_lines=False)
    for col, justify in (
        ("", "left"),
        ("figure", "left"),
        ("optimized", "right"),
        ("legacy", "right"),
        ("opt/legacy", "right"),
        ("target", "left"),
        ("", "left"),
    ):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    last = ""
    for row in rows:
        if last and row.scenario != last:
            table.add_section()
        last = row.scenario
        style = {"met": "green", "NOT met": "bold red", "too noisy": "yellow"}.get(row.verdict)
        verdict = f"[{style}]{row.verdict}[/]" if style else row.verdict
        table.add_row(
            row.scenario, row.figure, row.optimized, row.legacy, row.ratio, row.target, verdict
        )
    console.print(table)


def plot(results: dict[str, Any], out: Path, title: str) -> None:
    """Latency percentiles and throughput per scenario, optimized vs legacy (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in SCENARIOS if n in results]
    fig, axes = plt.subplots(len(names), 2, figsize=(12, 3.2 * len(names)), squeeze=False)
    colors = {"optimized": "#2a7ab9", "legacy": "#d9822b"}

    def bars(ax: Any, keys: list[tuple[str, str]], res: dict[str, Any], ylabel: str) -> None:
        width = 0.38
        for k, path in enumerate(PATHS):
            vals = [res["figures"][path].get(key) or [0.0] for key, _ in keys]
            mids = [_common.median(v) for v in vals]
            errs = [
                [m - min(v) for m, v in zip(mids, vals, strict=True)],
                [max(v) - m for m, v in zip(mids, vals, strict=True)],
            ]
            xs = [i + (k - 0.5) * width for i in range(len(keys))]
            ax.bar(xs, mids, width, yerr=errs, capsize=3, label=path, color=colors[path])
            for x, m in zip(xs, mids, strict=True):
                ax.annotate(_fmt(m, ""), (x, m), ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(keys)), [label for _, label in keys])
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)

    for row, name in enumerate(names):
        res = results[name]
        left, right = axes[row]
        if name == "S1":
            bars(
                left,
                [
                    ("lib_p50_ms", "p50"),
                    ("lib_p95_ms", "p95"),
                    ("lib_p99_ms", "p99"),
                    ("low_lib_p50_ms", "p50 unsat."),
                    ("low_lib_p95_ms", "p95 unsat."),
                    ("low_lib_p99_ms", "p99 unsat."),
                ],
                res,
                "ms",
            )
            left.set_title("S1 library time per turn (lower is better)")
            bars(
                right,
                [(f"low_{phase}_p50_ms", phase) for phase in S1_PHASES],
                res,
                "ms",
            )
            right.set_title("S1 library time by part, p50, unsaturated")
        elif name == "S2":
            bars(left, [("p50_ms", "p50"), ("p99_ms", "p99")], res, "ms")
            left.set_title("S2 delivery latency")
            bars(
                right,
                [("deliveries_per_s", "deliveries/s"), ("db_reads_per_s", "db reads/s")],
                res,
                "per second",
            )
            right.set_title("S2 fan-out throughput and database reads")
        elif name == "S3":
            bars(left, [("kill_rerun_s", "kill -> held claims run again")], res, "s")
            left.set_title("S3 re-run delay of a killed worker's claims (lower is better)")
            labels, mids, cols = [], [], []
            for path, key, label in (("optimized", "tasks_per_s_no_kill", "claim, no kill"),):
                v = res["figures"][path].get(key)
                if v:
                    labels.append(label)
                    mids.append(_common.median(v))
                    cols.append(colors[path])
            for peer in PEERS:
                if res["peers"].get(peer):
                    labels.append(peer)
                    mids.append(_common.median(res["peers"][peer]))
                    cols.append("#888888")
            right.bar(range(len(labels)), mids, color=cols)
            right.set_xticks(range(len(labels)), labels, fontsize=8)
            for x, m in enumerate(mids):
                right.annotate(_fmt(m, ""), (x, m), ha="center", va="bottom", fontsize=7)
            right.set_ylabel("tasks/s")
            right.set_title("S3 drain throughput")
        else:
            for path in PATHS:
                s = res["series"].get(path) or []
                if s:
                    left.plot(
                        [p["t"] for p in s],
                        [p["rss_mb"] for p in s],
                        label=f"{path} RSS",
                        color=colors[path],
                    )
                    right.plot(
                        [p["t"] for p in s],
                        [p["agent_queue"] + p["stream_writer"] + p["webhooks"] for p in s],
                        label=f"{path} queued",
                        color=colors[path],
                    )
                    right.plot(
                        [p["t"] for p in s],
                        [p["rings"] for p in s],
                        linestyle="--",
                        label=f"{path} rings",
                        color=colors[path],
                    )
            left.set_xlabel("s (last repetition)")
            left.set_ylabel("MiB")
            left.set_title("S4 soak: RSS over time")
            left.legend(fontsize=8)
            right.set_xlabel("s (last repetition)")
            right.set_title("S4 soak: queue depths and rings")
            right.legend(fontsize=8)
    fig.suptitle("\n".join(textwrap.wrap(title, 120)), fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _title(dialect: str, full: bool, sizes: Sizes, scale: float) -> str:
    kind = "full" if full and scale == 1.0 else "quick pass" if not full else f"full x{scale:g}"
    scaled = "" if full and scale == 1.0 else " (scaled down)"
    return (
        f"asyncstore S1-S4 on {dialect}, {kind}{scaled}: S1 {sizes.s1_turns} turns "
        f"(and {sizes.s1_low_turns} at {sizes.s1_low_concurrency} at once), "
        f"S2 {sizes.s2_subscribers} subscribers / {sizes.s2_streams} streams, "
        f"S3 {sizes.s3_tasks:,} tasks x {sizes.s3_workers} processes, "
        f"S4 {sizes.s4_repeats}x{sizes.s4_segment_s:g} s per path; "
        f"medians of {sizes.repeats} (S3 {sizes.s3_repeats}), ±half-spread"
    )


# ---------------------------------------------------------------- entry point


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="S1-S4 load tests, optimized vs legacy (and peers on Postgres). "
        "Component benchmarks: python -m benchmarks {storage,streams,locks,queue,webhooks,"
        "auth,maintenance,runtime} --help",
    )
    parser.add_argument("--url", help="postgresql://... server (a throwaway database is made)")
    parser.add_argument(
        "--scenario",
        action="append",
        choices=SCENARIOS,
        type=str.upper,
        help="run only this scenario (repeatable)",
    )
    parser.add_argument("--full", action="store_true", help="the issue's full sizes")
    parser.add_argument("--json", type=Path, help="write every figure and the environment")
    parser.add_argument("--plot", type=Path, help=f"PNG to draw (default ./{DEFAULT_PLOT})")
    parser.add_argument("--scale", type=float, default=1.0, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


async def _run(args: argparse.Namespace, sizes: Sizes, tmp: Path, progress: Any) -> Any:
    scenarios = args.scenario or list(SCENARIOS)
    if not args.url:
        url = f"sqlite:///{tmp / 'bench.db'}"
        async with open_storage(url, migrate=True):
            pass
        return "sqlite", await run_suite(url, scenarios, sizes, tmp, progress)
    from benchmarks import queue_bench

    name, url = await queue_bench._prepare(args.url)
    try:
        return "postgres", await run_suite(url, scenarios, sizes, tmp, progress)
    finally:
        await queue_bench._drop(args.url, name)


def main(argv: Sequence[str] | None = None) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    args = parse_args(argv)
    # Every flag switch between paths logs a warning by design; the table says it all.
    logging.getLogger("asyncstore").setLevel(logging.ERROR)
    sizes = Sizes.for_mode(args.full, args.scale)
    console = Console(width=None if sys.stdout.isatty() else 150)
    started = time.perf_counter()
    ticks = _common.cpu_ticks()
    with (
        tempfile.TemporaryDirectory(prefix="asyncstore-suite-") as tmp,
        Progress(
            TextColumn("{task.description:<16}"),
            BarColumn(),
            TextColumn("{task.percentage:>3.0f}%"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        ) as progress,
    ):
        dialect, results = anyio.run(_run, args, sizes, Path(tmp), progress)
    title = _title(dialect, args.full, sizes, args.scale)
    rows = judge(results)
    render(rows, title, console)
    for name in SCENARIOS:
        for note in results.get(name, {}).get("notes", []):
            console.print(f"  {name}: {note}")
    plot_path = args.plot or Path(DEFAULT_PLOT)
    plot(results, plot_path, title)
    elapsed = time.perf_counter() - started
    shares = _common.cpu_shares(ticks, _common.cpu_ticks())
    console.print(f"plot: {plot_path}   ({elapsed:.0f} s)")
    if shares:
        # Niced background jobs (``nice -n 19``) yield the cores to the suite; their share
        # says how much CPU the suite left unused or could not take.
        console.print(
            f"machine CPU over the run: {shares['busy']:.0%} busy, of which niced "
            f"background {shares['nice']:.0%}; load average now {_common.load_average() or 0:.1f}"
        )
    if args.json:
        env = _common.environment()
        env.update(
            memory_mb=_common.memory_mb(),
            load_average=_common.load_average(),
            cpu_shares=shares,
            peers={p: _common.version(p) for p in PEERS},
            rich=_common.version("rich"),
            matplotlib=_common.version("matplotlib"),
        )
        doc = {
            "command": ["python", "-m", "benchmarks", *(argv or sys.argv[1:])],
            "database": dialect,
            "url": _common.redact(args.url) if args.url else "sqlite (temporary file)",
            "mode": "full" if args.full else "quick",
            "scale": args.scale,
            "sizes": asdict(sizes),
            "environment": env,
            "settings": results.pop("settings", None),
            "flags": {"optimized": OPTIMIZED, "legacy": LEGACY},
            "seconds": elapsed,
            "scenarios": results,
            "table": [asdict(r) for r in rows],
            "title": title,
        }
        args.json.write_bytes(
            orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY)
        )
        console.print(f"json: {args.json}")
    failed = _failures(results)
    if failed:
        console.print(f"[bold red]failed: {', '.join(failed)} (see the notes)[/]")
        return 1
    return 0
