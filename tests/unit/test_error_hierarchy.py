"""Issue 18: one error tree under ``AsyncstoreError``, drawn where it is defined, and misuse
raising named errors.

The drawings in the docstrings of ``storage.errors`` (the whole tree), ``orchestrator.errors``
and ``orchestrator.webhooks.errors`` (branches) are parsed and compared with the classes:
each node's first base is its parent in the drawing and its other bases are the ``(+X)``
it names. Every ``AsyncstoreError`` subclass of the package is drawn, defined in one of the
two errors modules, and exported by ``asyncstore``. No raise site throws a bare builtin
error except pydantic validators (pydantic's contract) and the internal guards listed.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
import re
from pathlib import Path

import anyio
import pytest

import asyncstore
from asyncstore.orchestrator import errors as orchestrator_errors
from asyncstore.orchestrator.webhooks import errors as webhook_errors
from asyncstore.storage import errors as storage_errors

ROOT = Path(__file__).resolve().parents[2]
BUILTIN_BASES: dict[str, type] = {
    "RuntimeError": RuntimeError,
    "ValueError": ValueError,
    "TypeError": TypeError,
    "anyio.WouldBlock": anyio.WouldBlock,
}
_NODE = re.compile(r"^(?P<indent>[ │]*(?:[├└]── )?)(?P<name>[A-Z]\w+)(?P<rest>.*)$")
_EXTRA = re.compile(r"\(\+([\w.]+)\)")


def _drawing(doc: str) -> list[tuple[int, str, list[str]]]:
    """(depth, class name, extra bases) of each node of the first tree in ``doc``."""
    lines = doc.split("::", 1)[1].splitlines()
    block: list[str] = []
    for line in lines:
        if block and line and not line.startswith("    "):
            break
        if line.strip():
            block.append(line[4:])
    nodes = []
    for line in block:
        match = _NODE.match(line)
        is_node = match is not None and ("── " in match["indent"] or not nodes)
        if match is None or not is_node:
            continue  # a continuation line of the previous node's description
        depth = len(match["indent"]) // 4
        nodes.append((depth, match["name"], _EXTRA.findall(match["rest"])))
    return nodes


def _cls(name: str) -> type:
    if name in BUILTIN_BASES:
        return BUILTIN_BASES[name]
    found = getattr(asyncstore, name)
    assert isinstance(found, type), name
    return found


@pytest.mark.parametrize(
    "module", [storage_errors, orchestrator_errors, webhook_errors], ids=lambda m: m.__name__
)
def test_the_drawn_tree_is_the_class_hierarchy(module: object) -> None:
    nodes = _drawing(module.__doc__ or "")
    assert len(nodes) >= 8
    parents: list[type] = []
    for depth, name, extras in nodes:
        cls = _cls(name)
        del parents[depth:]
        if parents:
            assert cls.__bases__[0] is parents[-1], f"{name} is drawn under {parents[-1]}"
            assert [_cls(e) for e in extras] == list(cls.__bases__[1:]), name
        parents.append(cls)


def _package_errors() -> set[type]:
    for info in pkgutil.walk_packages(asyncstore.__path__, "asyncstore."):
        importlib.import_module(info.name)
    found: set[type] = set()
    todo = [asyncstore.AsyncstoreError]
    while todo:
        cls = todo.pop()
        if cls.__module__.startswith("asyncstore.") and cls not in found:
            found.add(cls)
            todo.extend(cls.__subclasses__())
    return found


def test_every_library_error_is_drawn_defined_once_and_exported() -> None:
    drawn = {name for _, name, _ in _drawing(storage_errors.__doc__ or "")}
    errors = _package_errors()
    assert {cls.__name__ for cls in errors} == drawn  # nothing drawn that does not exist
    for cls in errors:
        assert cls.__name__ in drawn, f"{cls.__qualname__} is not in the drawn tree"
        assert cls.__module__ in (storage_errors.__name__, orchestrator_errors.__name__), cls
        assert getattr(asyncstore, cls.__name__) is cls, f"asyncstore.{cls.__name__}"
        assert cls.__name__ in asyncstore.__all__
    # Where they were defined before, they are still importable (the same classes).
    from asyncstore.orchestrator.auth import LoginLocked
    from asyncstore.orchestrator.runtime import ComponentNotBuilt, RuntimeClosed
    from asyncstore.orchestrator.webhooks.admin import ResendRefused
    from asyncstore.orchestrator.webhooks.batcher import AttemptFailed
    from asyncstore.orchestrator.webhooks.transport import DeliveryFailed

    assert {LoginLocked, ComponentNotBuilt, RuntimeClosed, ResendRefused} <= errors
    assert {AttemptFailed, DeliveryFailed} <= errors


def test_the_old_roots_still_catch_what_they_caught() -> None:
    assert issubclass(asyncstore.InvalidInput, asyncstore.StorageError)
    assert issubclass(asyncstore.ConfigurationError, asyncstore.StorageError)
    assert issubclass(asyncstore.StorageClosed, asyncstore.StorageError)
    assert issubclass(asyncstore.WriterClosed, asyncstore.OrchestratorError)
    assert issubclass(asyncstore.WebhookError, asyncstore.OrchestratorError)
    for cls in (asyncstore.StorageError, asyncstore.OrchestratorError):
        assert issubclass(cls, asyncstore.AsyncstoreError)
    # Misuse keeps the builtin it used to be.
    assert issubclass(asyncstore.InvalidArgument, ValueError)
    assert issubclass(asyncstore.InvalidInput, ValueError)
    assert issubclass(asyncstore.InvalidType, TypeError)
    assert issubclass(asyncstore.UsageError, RuntimeError)
    assert issubclass(asyncstore.Dropped, anyio.WouldBlock)


# Raise sites allowed to throw a builtin error, with the reason.
INTERNAL_GUARDS = {
    ("orchestrator/cli.py", "_next_signal"): "unreachable: the signal receiver is infinite",
    ("orchestrator/demo.py", "_walk"): "the demo's own precondition, not the API's",
    ("orchestrator/queue.py", "_start"): "private, only called while the worker runs",
    ("orchestrator/queue.py", "_record"): "private, only called while the worker runs",
    ("orchestrator/outbox.py", "_dispatch"): "private, only called while the relay runs",
    ("orchestrator/outbox.py", "_record"): "private, only called while the relay runs",
    ("orchestrator/webhooks/batcher.py", "_journal_sink"): "private, built only when durable",
    # Functions pydantic calls as validators (pydantic turns ValueError into its error).
    ("orchestrator/config.py", "parse"): "a BeforeValidator",
    ("orchestrator/webhooks/config.py", "_check_triggers"): "called by field validators",
}
BUILTINS = {"RuntimeError", "ValueError", "TypeError", "Exception", "AssertionError"}


def _builtin_raises(path: Path) -> list[tuple[str, int]]:
    """(enclosing function, line) of each ``raise <builtin>`` outside a pydantic validator."""
    tree = ast.parse(path.read_text())
    found: list[tuple[str, int]] = []

    def visit(node: ast.AST, func: ast.FunctionDef | ast.AsyncFunctionDef | None) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            func = node
        if isinstance(node, ast.Raise) and node.exc is not None:
            exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            if isinstance(exc, ast.Name) and exc.id in BUILTINS:
                decorators = [ast.unparse(d) for d in (func.decorator_list if func else [])]
                if not any("validator" in d for d in decorators):
                    found.append((func.name if func else "<module>", node.lineno))
        for child in ast.iter_child_nodes(node):
            visit(child, func)

    visit(tree, None)
    return found


def test_misuse_raises_named_errors_not_bare_builtins() -> None:
    files = sorted((ROOT / "storage").rglob("*.py")) + sorted((ROOT / "orchestrator").rglob("*.py"))
    assert len(files) > 40
    offenders = []
    for path in files:
        rel = path.relative_to(ROOT).as_posix()
        for func, line in _builtin_raises(path):
            if (rel, func) not in INTERNAL_GUARDS:
                offenders.append(f"{rel}:{line} in {func}")
    assert offenders == []


def test_named_misuse_errors_at_the_former_bare_sites() -> None:
    from asyncstore.orchestrator.timing import Backoff, ManualClock

    with pytest.raises(asyncstore.InvalidArgument, match="1-based"):
        Backoff(base_s=1.0, max_s=2.0).delay(0)
    with pytest.raises(asyncstore.InvalidArgument, match="backwards"):
        ManualClock().advance(-1.0)
    with pytest.raises(asyncstore.InvalidArgument, match="per-session flag"):
        asyncstore.Flags().share("queue")
