"""``python -m benchmarks [NAME] [ARGS...]``: the S1-S4 load-test suite, or one component.

Without NAME (``python -m benchmarks [--url URL] [--scenario S1] [--full] [--json PATH]
[--plot PATH]``) the S1-S4 suite of ``benchmarks.suite`` runs: optimized vs legacy, a quick
pass on SQLite by default. NAME is one of the component benchmarks, ``storage``,
``streams``, ``locks``, ``queue``, ``webhooks``, ``auth``, ``maintenance``, ``runtime``,
``notify``, ``cancel`` or ``periodic``; ARGS go to it (``python -m benchmarks streams --help``).
"""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = {
    "suite": "benchmarks.suite",
    "storage": "benchmarks.storage_bench",
    "streams": "benchmarks.streams_bench",
    "locks": "benchmarks.locks_bench",
    "queue": "benchmarks.queue_bench",
    "webhooks": "benchmarks.webhooks_bench",
    "auth": "benchmarks.auth_bench",
    "maintenance": "benchmarks.maintenance_bench",
    "runtime": "benchmarks.runtime_bench",
    "notify": "benchmarks.notify_bench",
    "cancel": "benchmarks.cancel_bench",
    "periodic": "benchmarks.periodic_bench",
}


def main(argv: list[str]) -> int:
    name = "suite"
    if argv and argv[0] in BENCHMARKS:
        name, argv = argv[0], argv[1:]
    elif argv and not argv[0].startswith("-"):
        print(f"unknown benchmark {argv[0]!r}; choose from {', '.join(BENCHMARKS)}")
        return 2
    try:
        module = importlib.import_module(BENCHMARKS[name])
    except ModuleNotFoundError as exc:
        print(f"benchmark {name!r} is not available: {exc} (pip install -e '.[bench]')")
        return 2
    result: int = module.main(argv)
    return result


raise SystemExit(main(sys.argv[1:]))
