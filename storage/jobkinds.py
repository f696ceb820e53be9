"""The leased-job engine's kinds: ``JobKind``, ``TASKS``, ``OUTBOX`` and their SQL templates.

This module owns what makes agent tasks and outbox messages two kinds of one engine: the
``JobKind`` descriptor (table, status names, record and preparation), the two closed
instances ``TASKS`` and ``OUTBOX`` (``JOB_KINDS``), and ``render_job_queries``, which
expands a dialect's ``*_jobs`` SQL templates into one statement per kind. The storage
contract's ``*_jobs`` methods (``storage.base``) take a kind first; ``storage.base``
re-exports every name.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Generic, TypeVar

from asyncstore.storage.errors import InvalidArgument
from asyncstore.storage.job_records import (
    NewOutboxMessage,
    NewTask,
    OutboxMessage,
    OutboxStatus,
    Task,
    TaskStatus,
)

_J = TypeVar("_J")  # the record of a kind (Task, OutboxMessage)
_N = TypeVar("_N")  # what enqueuing takes (NewTask, NewOutboxMessage)
_S = TypeVar("_S", bound=StrEnum)  # the status enum of a kind

_TEMPLATE_FIELD = re.compile(r"\{(\w+)\}")


@dataclass(frozen=True, eq=False, slots=True)
class JobKind(Generic[_J, _N, _S]):
    """One kind of leased job: the table its rows live in and the names of its states.

    Agent tasks (``TASKS``) and outbox messages (``OUTBOX``) are two kinds of one engine:
    rows enqueued ``waiting``, claimed into ``running`` under a lease token (``run_after``
    is then the lease expiry), and finished ``done`` or ``dead``; failing puts a row back to
    ``waiting`` at its ``retry_at`` until its attempts run out. The ``*_jobs`` methods of the
    storage contract take the kind as their first argument. The set of kinds is closed:
    only the two instances below exist, and SQL templates are rendered from their fields
    (never from caller input), so a table name cannot be injected.

    ``grouped`` kinds carry an ordering group (an outbox message's (channel, account)): the
    claim takes a group's messages in id order, at most one in flight per group.
    """

    name: str
    table: str
    suffix: str  # statement names: "<op>_<suffix>" (complete_tasks, claim_outbox, ...)
    waiting: str
    running: str
    done: str
    grouped: bool
    queue_label: str  # what claim_jobs' ``queues`` filter names for this kind
    record: Callable[[Mapping[str, Any]], _J]
    status: Callable[[str], _S]
    prepare: Callable[[object], list[Any]]
    dead: str = "dead"

    def __repr__(self) -> str:
        return f"JobKind({self.name!r})"

    def statement(self, operation: str) -> str:
        """The name of this kind's statement for ``operation`` (e.g. ``claim_tasks``)."""
        return f"{operation}_{self.suffix}"

    def render(self, template: str) -> str:
        """Fill a ``*_jobs`` SQL template: ``{jobs}`` the table, ``{waiting}``, ``{running}``,
        ``{done}``, ``{dead}`` the status names; any other field is an error."""
        fields = {
            "jobs": self.table,
            "waiting": self.waiting,
            "running": self.running,
            "done": self.done,
            "dead": self.dead,
        }

        def fill(match: re.Match[str]) -> str:
            if match.group(1) not in fields:
                raise InvalidArgument(f"unknown field {{{match.group(1)}}} in a job template")
            return fields[match.group(1)]

        return _TEMPLATE_FIELD.sub(fill, template)


TASKS: JobKind[Task, NewTask, TaskStatus] = JobKind(
    "task",
    "agent_tasks",
    "tasks",
    TaskStatus.QUEUED,
    TaskStatus.RUNNING,
    TaskStatus.SUCCEEDED,
    grouped=False,
    queue_label="queue",
    record=Task.from_row,
    status=TaskStatus,
    prepare=lambda jobs: v.prepare_tasks(jobs),
)
"""Agent tasks: per queue, by priority then due time; idempotency keys; no groups."""

OUTBOX: JobKind[OutboxMessage, NewOutboxMessage, OutboxStatus] = JobKind(
    "outbox",
    "outbox",
    "outbox",
    OutboxStatus.PENDING,
    OutboxStatus.SENDING,
    OutboxStatus.SENT,
    grouped=True,
    queue_label="channel",
    record=OutboxMessage.from_row,
    status=OutboxStatus,
    prepare=lambda jobs: v.prepare_outbox(jobs),
)
"""Outbox messages: in id order per (channel, account) group, one in flight per group."""

JOB_KINDS: tuple[JobKind[Any, Any, Any], ...] = (TASKS, OUTBOX)


def render_job_queries(queries: Mapping[str, str]) -> dict[str, str]:
    """Expand each ``<op>_jobs`` template into one statement per kind, ``<op>_<suffix>``.

    A statement the dialect writes for one kind under that name (a kind-specific rule, such
    as a grouped kind's claim) takes the template's place for that kind.
    """
    out = {name: sql for name, sql in queries.items() if not name.endswith("_jobs")}
    for name, sql in queries.items():
        if name.endswith("_jobs"):
            for kind in JOB_KINDS:
                out.setdefault(kind.statement(name.removesuffix("_jobs")), kind.render(sql))
    return out


# Imported last: _validate imports the kinds defined above (the lambdas read it lazily).
from asyncstore.storage import _validate as v  # noqa: E402
