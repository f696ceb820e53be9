"""The ``asyncstore`` command line: ``migrate``, ``config`` and ``demo``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import anyio
from pydantic import SecretStr, ValidationError

from orchestrator.config import Settings, load_settings, mask_url, masked_dump
from storage import StorageError, StorageSettings, open_storage


def _settings(args: argparse.Namespace) -> Settings:
    settings = load_settings(args.config)
    if getattr(args, "url", None):
        storage = settings.storage.model_copy(update={"url": SecretStr(args.url)})
        settings = settings.model_copy(update={"storage": storage})
    return settings


async def _migrate(storage_settings: StorageSettings) -> int:
    async with open_storage(storage_settings) as storage:
        applied = await storage.migrate()
        version = await storage.schema_version()
    url = mask_url(storage_settings.url.get_secret_value())
    if applied:
        print(f"{url}: applied migrations {applied}; schema version {version}")
    else:
        print(f"{url}: schema is up to date (version {version})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``asyncstore`` console script."""
    parser = argparse.ArgumentParser(prog="asyncstore", description=__doc__)
    parser.add_argument("--config", help="TOML settings file (default: $ASYNCSTORE_CONFIG)")
    sub = parser.add_subparsers(dest="command", required=True)
    migrate = sub.add_parser("migrate", help="apply pending schema migrations")
    migrate.add_argument("--url", help="storage URL (default: settings storage.url)")
    sub.add_parser("config", help="print the effective settings, secrets masked")
    demo = sub.add_parser("demo", help="walk through the storage API end to end")
    demo.add_argument("--url", help="storage URL (default: settings storage.url)")
    args = parser.parse_args(argv)
    try:
        settings = _settings(args)
        if args.command == "config":
            print(json.dumps(masked_dump(settings), indent=2, sort_keys=True))
            return 0
        if args.command == "migrate":
            return anyio.run(_migrate, settings.storage)
        from orchestrator.demo import run_demo

        anyio.run(run_demo, settings.storage)
        return 0
    except (StorageError, ValidationError, FileNotFoundError) as exc:
        print(f"asyncstore {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
