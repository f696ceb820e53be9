"""The metric families and series a fresh runtime exports, as data (for before/after checks).

``inventory(url)`` opens a full runtime (webhooks, queue worker, outbox relay, backlog
monitor) on ``url``, scrapes it at once and returns every family with its type, its help
and its series (sample name and labels; the values of the ``operation`` label, which depend
on which statements ran first, are masked). Run as a script it prints the inventory of
both drivers as JSON: ``tests/unit/metrics_families_main.json`` was made that way from
main's code before the families moved into the components::

    PYTHONPATH=/work/main python tests/unit/metrics_inventory.py POSTGRES_DSN > out.json
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
from prometheus_client.parser import text_string_to_metric_families

if TYPE_CHECKING:
    from asyncstore.orchestrator.runtime import Runtime

Inventory = dict[str, dict[str, Any]]

MASKED_LABELS = ("operation",)


async def _nothing(_item: object) -> None:
    return None


@asynccontextmanager
async def open_full_runtime(url: str) -> AsyncIterator[Runtime]:
    """A runtime with every optional component: webhooks, queue worker, outbox relay."""
    from asyncstore.orchestrator.config import load_settings
    from asyncstore.orchestrator.runtime import open_runtime
    from asyncstore.orchestrator.webhooks import parse_hooks

    settings = load_settings(
        storage={"url": url},
        runtime={"reload_on_sighup": False},
        migrate_on_start=True,
        metrics={"process_metrics": False},
    )
    hook = {"name": "audit", "url": "http://127.0.0.1:9/hook", "trigger": "error"}
    hooks = parse_hooks({"async_webhooks": [hook]}, environ={})
    async with open_runtime(
        settings, hooks=hooks, queue_handler=_nothing, outbox_senders={"mail": _nothing}
    ) as rt:
        # Both paths of every flag, as main built them: a process now builds a flag's
        # legacy component only while the flag's share is below 100% (issue 15 item 6).
        for switch in (rt._broadcast, rt._cancellation, rt._limiter, rt._streams):
            await switch.get(True)
            await switch.get(False)
        yield rt


async def inventory(url: str) -> Inventory:
    async with open_full_runtime(url) as rt:
        text = rt.metrics.render()[0].decode()
    return parse(text)


def parse(text: str) -> Inventory:
    out: Inventory = {}
    for family in text_string_to_metric_families(text):
        series = sorted(
            {
                json.dumps(
                    [
                        s.name,
                        {
                            k: ("*" if k in MASKED_LABELS else v)
                            for k, v in sorted(s.labels.items())
                        },
                    ]
                )
                for s in family.samples
            }
        )
        out[family.name] = {"type": family.type, "help": family.documentation, "series": series}
    return out


def main(dsn: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        sqlite = anyio.run(inventory, f"sqlite:///{Path(tmp) / 'inventory.db'}")
    postgres = anyio.run(inventory, dsn)
    json.dump({"sqlite": sqlite, "postgres": postgres}, sys.stdout, indent=1, sort_keys=True)


if __name__ == "__main__":
    main(sys.argv[1])
