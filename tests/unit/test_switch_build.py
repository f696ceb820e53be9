"""A flag's component whose registration fails is not kept: the next use builds it again."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import pytest

from asyncstore.orchestrator.config import Flags
from asyncstore.orchestrator.runtime import _open_switch


class _Component:
    def __init__(self) -> None:
        self.closed = False


async def test_a_component_whose_registration_failed_is_built_again() -> None:
    built: list[_Component] = []
    failures = [ValueError("metrics source clash")]  # the first legacy registration fails

    @asynccontextmanager
    async def build() -> AsyncIterator[_Component]:
        component = _Component()
        built.append(component)
        try:
            yield component
        finally:
            component.closed = True

    def on_built(optimized: bool, instance: _Component) -> None:
        if not optimized and failures:
            raise failures.pop()

    with anyio.fail_after(10):
        async with _open_switch(
            "lock", lambda: Flags(), {True: build, False: build}, on_built=on_built
        ) as switch:
            with pytest.raises(ValueError, match="clash"):
                await switch.get(False)
            legacy = await switch.get(False)
            assert not legacy.closed  # before the fix: the closed instance of the failed build
            assert len(built) == 3 and built[1].closed
