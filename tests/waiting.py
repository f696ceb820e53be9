"""The tests' one condition wait: ``wait_for(condition)`` polls until it holds, bounded.

For state that announces no event (a statistics snapshot, a row in the database, another
process's progress). Where the code under test sleeps on a ``Clock``, drive a
``ManualClock`` instead; where it sets an event, wait on the event. The bound is a hang
guard for a loaded machine, never a timing assertion.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable

import anyio

__all__ = ["wait_for"]

POLL_S = 0.01


async def wait_for(
    condition: Callable[[], bool | Awaitable[bool]],
    timeout_s: float = 30.0,
    *,
    what: str = "",
) -> None:
    """Return as soon as ``condition()`` (sync or async) is true; fail after ``timeout_s``."""
    with anyio.move_on_after(timeout_s):
        while True:
            result = condition()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return
            await anyio.sleep(POLL_S)
    raise AssertionError(f"{what or 'condition'} not met within {timeout_s} s")
