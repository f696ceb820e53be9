"""``Switch``: one component's optimized and legacy instances, picked per session by flag.

This module owns how the runtime serves a per-session feature flag: a ``Switch`` over the
optimized and the legacy instance of one component (stream writer, broadcast hub, session
limiter, cancel registry), building an instance only when some session can take its path
(at open for the shares in effect, later on first use), picking one per session from the
current ``Flags``, and hosting the built instances until the runtime closes
(``_open_switch``).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from types import MappingProxyType
from typing import Generic, TypeVar

import anyio
import anyio.abc

from asyncstore.orchestrator.config import (
    Flags,
)
from asyncstore.orchestrator.errors import ComponentNotBuilt, RuntimeClosed

log = logging.getLogger("asyncstore.runtime")

T = TypeVar("T")


_PATHS: tuple[tuple[bool, str], ...] = ((True, "optimized"), (False, "legacy"))


class Switch(Generic[T]):
    """The optimized and the legacy instance of a component behind a per-session flag.

    An instance is built only when a session can take its path: ``open_runtime`` builds
    the optimized one when the flag's share is above 0 and the legacy one when it is below
    100 (plus any path in ``always``); after a live flag change ``prepare`` starts the
    newly needed build in the background, and ``get`` / ``choose`` build on first use in
    any case. A built instance runs until the runtime closes, so sessions already running
    keep theirs. ``optimized`` / ``legacy`` are None while not built; ``built()`` maps the
    built ones by path name. Each build runs in a task of the switch's own task group, so
    the instance is entered and exited by one task, at the switch's place in the runtime's
    closing order.
    """

    def __init__(
        self,
        flag: str,
        flags: Callable[[], Flags],
        builders: Mapping[bool, Callable[[], AbstractAsyncContextManager[T]]],
        tg: anyio.abc.TaskGroup,
        *,
        on_built: Callable[[bool, T], None] = lambda optimized, instance: None,
        always: tuple[bool, ...] = (),
    ) -> None:
        self.flag = flag
        self._flags = flags
        self._builders = dict(builders)
        self._tg = tg
        self._on_built = on_built
        self._always = always
        self._built: dict[bool, T] = {}
        self._building: dict[bool, _Build[T]] = {}
        self._closing = anyio.Event()

    @property
    def optimized(self) -> T | None:
        return self._built.get(True)

    @property
    def legacy(self) -> T | None:
        return self._built.get(False)

    def built(self) -> Mapping[str, T]:
        """The running instances, keyed ``optimized`` / ``legacy``."""
        return MappingProxyType({name: self._built[o] for o, name in _PATHS if o in self._built})

    def uses_optimized(self, session_id: str) -> bool:
        return self._flags().optimized(self.flag, session_id)

    def needed(self, flags: Flags) -> tuple[bool, ...]:
        """The paths some session can take under ``flags`` (and those always built)."""
        share = flags.share(self.flag)
        wanted = set(self._always)
        if share > 0.0:
            wanted.add(True)
        if share < 100.0:
            wanted.add(False)
        return tuple(o for o, _ in _PATHS if o in wanted)

    def pick(self, session_id: str) -> T:
        """The running instance the current flags choose for the session.

        Raises ``ComponentNotBuilt`` if that path was never built (only right after a live
        flag change); ``await choose(session_id)`` builds it instead.
        """
        optimized = self.uses_optimized(session_id)
        instance = self._built.get(optimized)
        if instance is None:
            name = "optimized" if optimized else "legacy"
            raise ComponentNotBuilt(f"the {name} path of {self.flag!r} is not running yet")
        return instance

    async def choose(self, session_id: str) -> T:
        """The instance the current flags choose for the session, built on first use."""
        return await self.get(self.uses_optimized(session_id))

    async def get(self, optimized: bool) -> T:
        """The instance of one path, built now if it is not running yet.

        Concurrent callers share one build; a failed build raises its error to them and
        the next call tries again. Cancelling the wait leaves the build running.
        """
        while True:
            instance = self._built.get(optimized)
            if instance is not None:
                return instance
            if self._closing.is_set():
                raise RuntimeClosed(f"the runtime is closing: {self.flag!r} builds nothing")
            build = self._start(optimized)
            await build.done.wait()
            if build.error is not None:
                raise build.error

    def prepare(self, flags: Flags) -> None:
        """Start building, in the background, every path ``flags`` need that is missing."""
        if self._closing.is_set():
            return
        for optimized in self.needed(flags):
            if optimized not in self._built:
                self._start(optimized)

    def _start(self, optimized: bool) -> _Build[T]:
        build = self._building.get(optimized)
        if build is None:
            build = self._building[optimized] = _Build()
            self._tg.start_soon(self._host, optimized, build)
        return build

    async def _host(self, optimized: bool, build: _Build[T]) -> None:
        try:
            async with self._builders[optimized]() as instance:
                self._built[optimized] = instance
                self._on_built(optimized, instance)
                build.done.set()
                await self._closing.wait()
        except Exception as exc:
            if build.done.is_set():
                raise  # the running instance failed (or failed to close): as before
            log.error("building the %s path of %r failed: %s", optimized, self.flag, exc)
            # Built but not registered (e.g. its metrics clashed): it closed on the way out,
            # so the next get() builds again instead of returning a closed instance.
            self._built.pop(optimized, None)
            build.error = exc
        finally:
            if self._building.get(optimized) is build and not build.done.is_set():
                del self._building[optimized]
            build.done.set()


class _Build(Generic[T]):
    __slots__ = ("done", "error")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.error: Exception | None = None


@asynccontextmanager
async def _open_switch(
    flag: str,
    flags: Callable[[], Flags],
    builders: Mapping[bool, Callable[[], AbstractAsyncContextManager[T]]],
    *,
    on_built: Callable[[bool, T], None],
    always: tuple[bool, ...] = (),
) -> AsyncIterator[Switch[T]]:
    """A ``Switch`` whose instances run while the block runs; the needed ones are built."""
    async with anyio.create_task_group() as tg:
        switch = Switch(flag, flags, builders, tg, on_built=on_built, always=always)
        try:
            for optimized in switch.needed(flags()):
                await switch.get(optimized)
            yield switch
        finally:
            # Each instance leaves its block in its own task now, draining as it does.
            switch._closing.set()
