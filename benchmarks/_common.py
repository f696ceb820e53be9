"""Helpers every benchmark shares: the environment record, percentiles, median and spread,
RSS, and throwaway Postgres databases.

Nothing here measures anything; the benchmark modules and the S1-S4 suite import it so a
figure is summarized (and a database created and dropped) the same way everywhere.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import resource
import secrets
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

REPO = Path(__file__).resolve().parent.parent
NOISY = 0.25
"""A figure whose repetitions spread more than this ((max - min) / median) is noisy."""


def percentile(samples: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``samples`` by nearest rank; 0.0 when there are none."""
    if not samples:
        return 0.0
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def median(samples: Sequence[float]) -> float:
    return statistics.median(samples) if samples else 0.0


def spread(samples: Sequence[float]) -> float:
    """(max - min) / median of repeated figures: 0.25 means they varied by 25%."""
    if len(samples) < 2:
        return 0.0
    mid = statistics.median(samples)
    if mid == 0:
        return 0.0 if max(samples) == min(samples) else float("inf")
    return (max(samples) - min(samples)) / abs(mid)


def noisy(*series: Sequence[float] | None) -> bool:
    """Whether any of ``series`` (repetitions of one figure) spreads more than ``NOISY``."""
    return any(v is not None and len(v) > 1 and spread(v) > NOISY for v in series)


def compare(
    subject: Sequence[float], reference: Sequence[float], meets: Callable[[float, float], bool]
) -> str:
    """The noise rule of every comparison target: ``met``, ``NOT met`` or ``too noisy``.

    The verdict comes from the medians. When either side's spread exceeds ``NOISY`` the
    medians are not trusted: the verdict stands only if both extreme pairings (the highest
    subject repetition against the lowest reference one, and the lowest against the
    highest) agree with it; otherwise the result is "too noisy".
    """
    verdict = meets(median(subject), median(reference))
    if noisy(subject, reference):
        worst = meets(max(subject), min(reference))
        best = meets(min(subject), max(reference))
        if not worst == best == verdict:
            return "too noisy"
    return "met" if verdict else "NOT met"


def check(values: Sequence[float], meets: Callable[[float], bool]) -> str:
    """``compare`` for a figure against a fixed bound: a noisy figure must meet (or miss)
    it with its highest and its lowest repetition alike."""
    verdict = meets(median(values))
    if noisy(values) and not meets(max(values)) == meets(min(values)) == verdict:
        return "too noisy"
    return "met" if verdict else "NOT met"


def rss_mb() -> float:
    """Current resident set size in MiB (peak RSS where /proc is unavailable)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024 if sys.platform == "darwin" else 1024)


def memory_mb() -> float | None:
    """Total memory of the machine in MiB (Linux), else None."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def cpu_ticks() -> list[int] | None:
    """The machine's CPU time so far (``/proc/stat``'s first line: user, nice, system,
    idle, iowait, ...), in clock ticks; None off Linux."""
    try:
        with open("/proc/stat") as f:
            return [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None


def cpu_shares(before: list[int] | None, after: list[int] | None) -> dict[str, float] | None:
    """How the machine's CPU was spent between two ``cpu_ticks``, as fractions: ``nice`` is
    time of niced processes (background jobs), ``busy`` everything but idle and iowait."""
    if not before or not after:
        return None
    delta = [a - b for a, b in zip(after, before, strict=False)]
    total = sum(delta[:8]) or 1
    idle = delta[3] + delta[4]
    return {
        "busy": (total - idle) / total,
        "user": delta[0] / total,
        "nice": delta[1] / total,
        "system": delta[2] / total,
        "idle": idle / total,
    }


def version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def environment() -> dict[str, Any]:
    """The machine, the versions and the git commit a set of figures was measured with."""
    status = git("status", "--porcelain")
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "asyncpg": version("asyncpg"),
        "aiosqlite": version("aiosqlite"),
        "orjson": version("orjson"),
        "asyncstore": version("asyncstore"),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "git_head": git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
    }


def redact(url: str) -> str:
    """``url`` with its password replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def with_database(url: str, database: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{database}"))


async def create_database(admin_url: str, prefix: str = "asyncstore_bench") -> str | None:
    """Create a throwaway database and return its name, or None if Postgres does not answer."""
    name = f"{prefix}_{secrets.token_hex(6)}"
    try:
        conn = await asyncpg.connect(admin_url, timeout=5)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        print(f"Postgres at {redact(admin_url)} did not answer ({exc!r}): SQLite only.")
        return None
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    except asyncpg.PostgresError as exc:
        print(f"cannot create a database on {redact(admin_url)} ({exc}): SQLite only.")
        return None
    finally:
        await conn.close()
    return name


async def drop_database(admin_url: str, name: str) -> None:
    conn = await asyncpg.connect(admin_url, timeout=5)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()
