"""``python -m benchmarks [NAME] [ARGS...]``: run one of the component benchmarks.

NAME is ``storage`` (the default), ``streams``, ``locks``, ``queue``, ``webhooks``,
``auth``, ``maintenance`` or ``runtime``; ARGS go to that benchmark (``python -m
benchmarks streams --help``). The S1-S4 load-test suite will become the default once it
exists.
"""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = {
    "storage": "benchmarks.storage_bench",
    "streams": "benchmarks.streams_bench",
    "locks": "benchmarks.locks_bench",
    "queue": "benchmarks.queue_bench",
    "webhooks": "benchmarks.webhooks_bench",
    "auth": "benchmarks.auth_bench",
    "maintenance": "benchmarks.maintenance_bench",
    "runtime": "benchmarks.runtime_bench",
}


def main(argv: list[str]) -> int:
    name = "storage"
    if argv and argv[0] in BENCHMARKS:
        name, argv = argv[0], argv[1:]
    elif argv and not argv[0].startswith("-"):
        print(f"unknown benchmark {argv[0]!r}; choose from {', '.join(BENCHMARKS)}")
        return 2
    try:
        module = importlib.import_module(BENCHMARKS[name])
    except ModuleNotFoundError as exc:
        print(f"benchmark {name!r} is not available: {exc}")
        return 2
    result: int = module.main(argv)
    return result


raise SystemExit(main(sys.argv[1:]))
