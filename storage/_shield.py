"""Cleanup awaits that finish even when their caller is cancelled, by anyio or by asyncio.

anyio's ``CancelScope(shield=True)`` keeps anyio cancellation out, but a plain asyncio
cancellation (``Task.cancel()``, ``asyncio.wait_for``, ``asyncio.timeout``) still lands at
the next await inside it. ``complete`` runs the awaitable in a task of its own and waits for
it through ``asyncio.shield`` until it is done, whatever arrives meanwhile, then re-raises
the first cancellation. Both drivers run on asyncio only (asyncpg and aiosqlite need it).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

import anyio

_T = TypeVar("_T")


async def complete(aw: Awaitable[_T]) -> _T:
    """Await ``aw`` to its end; a cancellation that arrives meanwhile is re-raised after it.

    For cleanup that must not be abandoned half-way (ROLLBACK, COMMIT, returning a
    connection): abandoning it would leave a connection inside a transaction.
    """
    # Not ownerless: this coroutine waits for the task to finish before it returns.
    task = asyncio.ensure_future(aw)
    cancelled: asyncio.CancelledError | None = None
    with anyio.CancelScope(shield=True):
        while not task.done():
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError as exc:
                if not task.done():
                    cancelled = cancelled or exc
    if cancelled is not None:
        if not task.cancelled() and (error := task.exception()) is not None:
            raise cancelled from error
        raise cancelled
    return task.result()
