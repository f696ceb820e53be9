"""The dialect hooks: the ``_sql_*`` methods a storage driver implements, and nothing else.

This module owns ``DialectHooks``, the abstract base of ``AsyncStorageBackend`` that
declares every ``_sql_*`` hook with its signature. Each hook receives arguments the
public contract method (``storage.base``) has already validated and encoded, runs SQL
only, and is called inside the ``operation`` wrapper (closed check, error mapping). The
drivers (``storage.postgres``, ``storage.sqlite``) implement these hooks.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from typing import Any

from asyncstore.storage._queue_limits import LimitedClaim, QueueLimits
from asyncstore.storage.jobkinds import JobKind
from asyncstore.storage.records import (
    AuditEntry,
    CancelState,
    ChatMessage,
    FailureColumns,
    JournaledEvent,
    Leadership,
    Lease,
    LeaseAttempt,
    LoginPolicy,
    LoginSlot,
    NewMessage,
    NotificationStream,
    Presence,
    QueueDepth,
    StreamAppend,
    StreamEvent,
    StreamPartition,
    StreamRow,
    Task,
    WebhookAttempt,
)
from asyncstore.storage.task_cancel import TaskCancellation


class DialectHooks(abc.ABC):
    """What a dialect implements: SQL only, on arguments the contract prepared.

    ``AsyncStorageBackend`` derives from this class and calls the hooks from its public
    methods; a dialect overrides these, never the public methods (refused at class
    creation), and is never called with an empty batch.
    """

    # -- dialect hooks ---------------------------------------------------------
    # What a dialect implements: SQL only. Each hook receives arguments the public method
    # above has already validated and encoded (``storage._validate``), is called inside
    # the ``operation`` wrapper (closed check, error mapping), and is never called with an
    # empty batch. A dialect overrides these, never the public methods.

    @abc.abstractmethod
    async def _sql_append_messages(
        self,
        session_id: str,
        rows: list[tuple[str, bytes]],
        outbox: list[tuple[str, str, bytes, int]],
        lease_token: int | None,
        messages: Sequence[NewMessage],
    ) -> list[ChatMessage] | None:
        """The appended messages in seq order; None if ``lease_token`` was not current."""

    @abc.abstractmethod
    async def _sql_load_messages(
        self, session_id: str, after_seq: int, limit: int
    ) -> list[ChatMessage]: ...

    @abc.abstractmethod
    async def _sql_delete_session(self, session_id: str) -> bool: ...

    @abc.abstractmethod
    async def _sql_append_stream_events(
        self, rows: list[StreamRow], notify: tuple[str, Sequence[str]] | None = None
    ) -> StreamAppend: ...

    @abc.abstractmethod
    async def _sql_load_stream_events(
        self, session_id: str, after_seq: int, limit: int
    ) -> list[StreamEvent]: ...

    @abc.abstractmethod
    async def _sql_last_stream_seq(self, session_id: str) -> int: ...

    @abc.abstractmethod
    async def _sql_purge_stream_events(self, age_s: float) -> int: ...

    @abc.abstractmethod
    async def _sql_purge_stream_events_batch(self, age_s: float, limit: int) -> int: ...

    @abc.abstractmethod
    async def _sql_list_stream_partitions(self) -> list[StreamPartition]: ...

    @abc.abstractmethod
    async def _sql_partition_stream_events(self) -> bool: ...

    @abc.abstractmethod
    async def _sql_create_stream_partitions(self, width_s: int, ahead_s: float) -> int: ...

    @abc.abstractmethod
    async def _sql_drop_stream_partition(self, name: str, age_s: float) -> int | None: ...

    @abc.abstractmethod
    async def _sql_acquire_lease(
        self, session_id: str, holder: str, ttl_s: float
    ) -> Lease | None: ...

    @abc.abstractmethod
    async def _sql_renew_lease(self, session_id: str, token: int, ttl_s: float) -> Lease | None:
        """The renewed lease; None if ``token`` is not current."""

    @abc.abstractmethod
    async def _sql_release_lease(self, session_id: str, token: int) -> bool: ...

    @abc.abstractmethod
    async def _sql_get_lease(self, session_id: str) -> Lease | None: ...

    @abc.abstractmethod
    async def _sql_expire_leases(self, age_s: float) -> int: ...

    @abc.abstractmethod
    async def _sql_ensure_lease_slots(self, pool: str, slots: int) -> None: ...

    @abc.abstractmethod
    async def _sql_acquire_lease_slot(
        self, session_id: str, holder: str, ttl_s: float, pool: str | None, slots: int
    ) -> LeaseAttempt: ...

    @abc.abstractmethod
    async def _sql_renew_lease_slot(
        self, session_id: str, token: int, ttl_s: float, pool: str | None
    ) -> Lease | None:
        """The renewed lease; None if ``token`` is not current."""

    @abc.abstractmethod
    async def _sql_release_lease_slot(
        self, session_id: str, token: int, channel: str, pool: str | None
    ) -> bool: ...

    @abc.abstractmethod
    async def _sql_count_leases(self) -> int: ...

    @abc.abstractmethod
    async def _sql_enqueue_jobs(
        self, kind: JobKind[Any, Any, Any], rows: list[Any], notify: str | None
    ) -> list[Any]:
        """One record per row, in row order (``_validate.match_enqueued`` puts tasks so);
        with ``notify``, one notification when a returned row is waiting (see
        ``enqueue_jobs``)."""

    @abc.abstractmethod
    async def _sql_claim_jobs(
        self,
        kind: JobKind[Any, Any, Any],
        worker_id: str,
        limit: int,
        lease_s: float,
        queues: list[str] | None,
    ) -> list[Any]: ...

    @abc.abstractmethod
    async def _sql_heartbeat_jobs(
        self, kind: JobKind[Any, Any, Any], ids: list[int], tokens: list[int], lease_s: float
    ) -> list[int]: ...

    @abc.abstractmethod
    async def _sql_complete_jobs(
        self, kind: JobKind[Any, Any, Any], ids: list[int], tokens: list[int]
    ) -> list[int]: ...

    @abc.abstractmethod
    async def _sql_fail_jobs(
        self, kind: JobKind[Any, Any, Any], failures: FailureColumns
    ) -> dict[int, str]: ...

    @abc.abstractmethod
    async def _sql_release_jobs(
        self, kind: JobKind[Any, Any, Any], ids: list[int], tokens: list[int]
    ) -> list[int]: ...

    @abc.abstractmethod
    async def _sql_dead_letter_jobs(
        self, kind: JobKind[Any, Any, Any], failures: FailureColumns
    ) -> list[int]: ...

    @abc.abstractmethod
    async def _sql_redrive_jobs(
        self, kind: JobKind[Any, Any, Any], ids: list[int]
    ) -> list[int]: ...

    @abc.abstractmethod
    async def _sql_get_job(self, kind: JobKind[Any, Any, Any], job_id: int) -> Any: ...

    @abc.abstractmethod
    async def _sql_purge_jobs(self, kind: JobKind[Any, Any, Any], age_s: float) -> int: ...

    @abc.abstractmethod
    async def _sql_cancel_task(
        self, task_id: int, reason: str, channel: str | None
    ) -> TaskCancellation: ...

    @abc.abstractmethod
    async def _sql_next_task_due_s(self, queue: str) -> float | None: ...

    @abc.abstractmethod
    async def _sql_enqueue_grouped_tasks(
        self, rows: list[Any], groups: list[str | None], notify: str | None
    ) -> list[Task]:
        """``_sql_enqueue_jobs(TASKS, ...)`` with each row's group; creates the queues'
        ``task_queues`` rows."""

    @abc.abstractmethod
    async def _sql_set_queue_limits(
        self, queue: str, running: int | None, rate: float | None, group: int
    ) -> QueueLimits: ...

    @abc.abstractmethod
    async def _sql_get_queue_limits(self, queue: str) -> QueueLimits | None: ...

    @abc.abstractmethod
    async def _sql_claim_limited_tasks(
        self, queue: str, worker_id: str, limit: int, lease_s: float
    ) -> LimitedClaim | None:
        """None when the queue has no ``task_queues`` row."""

    @abc.abstractmethod
    async def _sql_wake_task_queue(self, queue: str, channel: str) -> bool: ...

    @abc.abstractmethod
    async def _sql_backlog_depths(self) -> tuple[list[QueueDepth], QueueDepth]: ...

    @abc.abstractmethod
    async def _sql_list_jobs(
        self, kind: JobKind[Any, Any, Any], status: str, limit: int
    ) -> Any: ...

    @abc.abstractmethod
    async def _sql_list_queued_tasks(self, queues: list[str], limit: int) -> list[Task]: ...

    @abc.abstractmethod
    async def _sql_list_leases(self, limit: int) -> list[Lease]: ...

    @abc.abstractmethod
    async def _sql_record_audit(
        self, actor: str, action: str, target: str, outcome: str, detail: str
    ) -> AuditEntry: ...

    @abc.abstractmethod
    async def _sql_list_audit(self, limit: int) -> list[AuditEntry]: ...

    @abc.abstractmethod
    async def _sql_publish_presence(
        self, instance_id: str, host: str, pid: int, ttl_s: float, counts: bytes
    ) -> Presence: ...

    @abc.abstractmethod
    async def _sql_list_presence(self, limit: int) -> list[Presence]: ...

    @abc.abstractmethod
    async def _sql_withdraw_presence(self, instance_id: str) -> bool: ...

    @abc.abstractmethod
    async def _sql_purge_presence(self) -> int: ...

    @abc.abstractmethod
    async def _sql_journal_webhook_events(
        self, endpoint: str, owner: str, bodies: list[str]
    ) -> list[int]: ...

    @abc.abstractmethod
    async def _sql_delete_webhook_events(self, ids: list[int]) -> int: ...

    @abc.abstractmethod
    async def _sql_claim_webhook_orphans(
        self, endpoints: list[str], owner: str, age_s: float, limit: int
    ) -> list[JournaledEvent]: ...

    @abc.abstractmethod
    async def _sql_record_webhook_attempts(
        self, rows: list[tuple[str, str, int | None, datetime, int | None, str, bool]]
    ) -> int: ...

    @abc.abstractmethod
    async def _sql_list_webhook_attempts(
        self, endpoint: str | None, webhook_id: str | None, failed: bool, limit: int
    ) -> list[WebhookAttempt]: ...

    @abc.abstractmethod
    async def _sql_purge_webhook_attempts(self, age_s: float) -> int: ...

    @abc.abstractmethod
    async def _sql_request_cancel(
        self, session_id: str, reason: str, channel: str | None
    ) -> CancelState: ...

    @abc.abstractmethod
    async def _sql_get_cancel(self, session_id: str) -> CancelState | None: ...

    @abc.abstractmethod
    async def _sql_clear_cancel(self, session_id: str) -> bool: ...

    @abc.abstractmethod
    async def _sql_notify(self, channel: str, payload: str) -> None: ...

    @abc.abstractmethod
    def _sql_listen(self, channels: list[str]) -> AbstractAsyncContextManager[NotificationStream]:
        """Subscribe to checked channel names (at least one)."""

    @abc.abstractmethod
    def _sql_leadership(
        self, name: str, ttl_s: float
    ) -> AbstractAsyncContextManager[Leadership]: ...

    @abc.abstractmethod
    async def _sql_record_periodic_tick(
        self, schedule: str, tick_at: datetime, row: Any, notify: str | None
    ) -> Task | None: ...

    @abc.abstractmethod
    async def _sql_last_periodic_ticks(self, schedules: list[str]) -> dict[str, datetime]: ...

    @abc.abstractmethod
    async def _sql_purge_periodic_ticks(self, retention_s: float) -> int: ...

    @abc.abstractmethod
    async def _sql_reserve_login_attempt(
        self, scope: str, key: str, policy: LoginPolicy
    ) -> LoginSlot: ...

    @abc.abstractmethod
    async def _sql_finish_login_attempt(
        self, scope: str, key: str, window_start: float, outcome: str, policy: LoginPolicy
    ) -> bool: ...

    @abc.abstractmethod
    async def _sql_purge_login_attempts(self, age_s: float) -> int: ...
