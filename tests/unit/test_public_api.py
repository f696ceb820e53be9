"""Issue 18: ``import asyncstore`` is the public API, and the examples need nothing else.

Every name in ``asyncstore.__all__`` resolves and carries its own docstring; the examples
import no ``asyncstore`` path but ``asyncstore`` itself (AST check) and carry no
``type: ignore``; importing ``asyncstore`` does not pull in the ASGI extra; every service
class has an ``open_*`` async context manager; the runtime's optimized/legacy switches
are internal.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import asyncstore

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


def test_every_exported_name_resolves_and_is_documented() -> None:
    assert len(asyncstore.__all__) == len(set(asyncstore.__all__)) > 50
    undocumented = []
    for name in asyncstore.__all__:
        obj = getattr(asyncstore, name)  # the ASGI names are imported here, on first use
        # Its own docstring: a class inheriting one (a bare enum, a subclass) does not count.
        doc = vars(obj).get("__doc__") if isinstance(obj, type) else inspect.getdoc(obj)
        if isinstance(obj, type) and doc and doc.startswith(f"{obj.__name__}("):
            doc = None  # the signature a dataclass writes when it has no docstring
        if not (doc and doc.strip()):
            undocumented.append(name)
    assert undocumented == []
    assert asyncstore.__doc__ is not None and "open_runtime" in asyncstore.__doc__


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no_such_thing"):
        asyncstore.no_such_thing  # noqa: B018


def test_importing_asyncstore_does_not_need_the_asgi_extra() -> None:
    code = "import sys, asyncstore; print('starlette' in sys.modules, 'uvicorn' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.split() == ["False", "False"]


def _asyncstore_imports(path: Path) -> list[str]:
    """Every import of an ``asyncstore`` module in ``path``, as written."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] == "asyncstore"]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "asyncstore":
            found.append(f"from {node.module} import {', '.join(a.name for a in node.names)}")
    return found


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_examples_import_asyncstore_only(example: Path) -> None:
    assert _asyncstore_imports(example) == ["asyncstore"]
    assert "type: ignore" not in example.read_text()


def test_the_import_check_sees_a_submodule_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import asyncstore\nfrom asyncstore.storage import StreamEvent\n")
    assert _asyncstore_imports(bad) == ["asyncstore", "from asyncstore.storage import StreamEvent"]


def test_every_service_opens_with_an_open_function() -> None:
    from asyncstore.orchestrator.batching import BatchWriter, open_batch_writer
    from asyncstore.orchestrator.broadcast import BroadcastHub, Subscription, open_broadcast_hub
    from asyncstore.orchestrator.streams import StreamEventWriter, open_stream_writer
    from asyncstore.orchestrator.webhooks import AsyncWebhookBatcher, open_webhook_batcher

    openers = {
        asyncstore.AsyncStorageBackend: asyncstore.open_storage,
        BatchWriter: open_batch_writer,
        BroadcastHub: open_broadcast_hub,
        StreamEventWriter: open_stream_writer,
        AsyncWebhookBatcher: open_webhook_batcher,
    }
    # A subscription is a handle a hub hands out (``hub.subscribe``), not a service.
    handles = {Subscription}
    for info in pkgutil.walk_packages(asyncstore.__path__, "asyncstore."):
        importlib.import_module(info.name)
    services = set()
    for module in list(sys.modules.values()):
        if not (getattr(module, "__name__", "") or "").startswith("asyncstore."):
            continue
        for obj in vars(module).values():
            if (
                isinstance(obj, type)
                and obj.__module__ == module.__name__
                and "__aenter__" in vars(obj)
                and not obj.__name__.startswith("_")
            ):
                services.add(obj)
    assert services - handles == set(openers)
    for opener in openers.values():
        assert opener.__name__.startswith("open_") and opener.__doc__


async def test_the_runtime_keeps_its_optimized_and_legacy_switches_internal(
    tmp_path: Path,
) -> None:
    settings = asyncstore.load_settings(
        storage={"url": f"sqlite:///{tmp_path / 'rt.db'}"},
        migrate_on_start=True,
        runtime={"reload_on_sighup": False},
    )
    async with asyncstore.open_runtime(settings) as rt:
        public = {name for name in dir(rt) if not name.startswith("_")}
        assert not public & {"streams", "broadcast", "limiter", "cancellation"}
        assert not [name for name in public if "optimized" in name or "legacy" in name]
        # The documented internal accessor, for this package's tests and benchmarks.
        assert rt._streams.optimized is not None
        assert set(rt.statistics().streams) == {"optimized"}  # legacy: no session can take it
