-- Named queries of the SQLite driver. Values are always bind parameters. Every write runs
-- in a BEGIN IMMEDIATE transaction, so two processes on one file stay correct. Names that
-- start with an underscore are private helpers of this dialect.

-- name: ping
SELECT 1;

-- name: _next_token
UPDATE counters SET value = value + 1 WHERE name = :name RETURNING value;

-- name: _fence
SELECT 1 FROM session_leases WHERE session_id = :session_id AND token = :token AND expires_at > :now;

-- name: append_messages
INSERT INTO chat_sessions (session_id, last_seq, created_at, updated_at)
VALUES (:session_id, :n, :now, :now)
ON CONFLICT (session_id) DO UPDATE
    SET last_seq = chat_sessions.last_seq + excluded.last_seq, updated_at = excluded.updated_at
RETURNING last_seq;

-- name: _insert_message
INSERT INTO chat_messages (session_id, seq, role, content, created_at)
VALUES (?, ?, ?, ?, ?);

-- name: load_messages
SELECT session_id, seq, role, content, created_at FROM chat_messages
WHERE session_id = :session_id AND seq > :after ORDER BY seq LIMIT :limit;

-- name: delete_session
DELETE FROM chat_messages WHERE session_id = :session_id;

-- name: _delete_chat_session
DELETE FROM chat_sessions WHERE session_id = :session_id;

-- name: _delete_stream_events
DELETE FROM stream_events WHERE session_id = :session_id;

-- name: _delete_cancel
DELETE FROM cancel_requests WHERE session_id = :session_id;

-- name: _delete_lease
DELETE FROM session_leases WHERE session_id = :session_id;

-- name: append_stream_events
-- Only events whose (session, epoch) passed the fence (_stream_fence, same transaction) are
-- given. A stored event is replaced only by one of a newer epoch; the same epoch is a retry.
INSERT INTO stream_events (session_id, seq, epoch, kind, payload, created_at)
VALUES (?, ?, ?, ?, ?, ?)
ON CONFLICT (session_id, seq) DO UPDATE SET
    epoch = excluded.epoch, kind = excluded.kind, payload = excluded.payload,
    created_at = excluded.created_at
WHERE stream_events.epoch < excluded.epoch;

-- name: _stream_fence
-- :ids a JSON array of session ids: each one's lease token (NULL: no lease row) and the
-- epoch of its last stored event (NULL: none), read through the primary keys.
SELECT j.value AS session_id,
       (SELECT l.token FROM session_leases l WHERE l.session_id = j.value) AS token,
       (SELECT s.epoch FROM stream_events s WHERE s.session_id = j.value
        ORDER BY s.seq DESC LIMIT 1) AS head_epoch
FROM json_each(:ids) AS j;

-- name: load_stream_events
SELECT session_id, epoch, seq, kind, payload, created_at FROM stream_events
WHERE session_id = :session_id AND seq > :after ORDER BY seq LIMIT :limit;

-- name: last_stream_seq
SELECT coalesce(max(seq), 0) FROM stream_events WHERE session_id = :session_id;

-- name: purge_stream_events
DELETE FROM stream_events WHERE created_at < :cutoff;

-- name: purge_stream_events_batch
DELETE FROM stream_events WHERE rowid IN (
    SELECT rowid FROM stream_events WHERE created_at < :cutoff ORDER BY created_at LIMIT :limit
);

-- name: acquire_lease
INSERT INTO session_leases (session_id, holder, token, expires_at)
VALUES (:session_id, :holder, :token, :expires_at)
ON CONFLICT (session_id) DO UPDATE
    SET holder = excluded.holder, token = excluded.token, expires_at = excluded.expires_at
    WHERE session_leases.expires_at <= :now
RETURNING session_id, holder, token, expires_at;

-- name: renew_lease
UPDATE session_leases SET expires_at = :expires_at
WHERE session_id = :session_id AND token = :token AND expires_at > :now
RETURNING session_id, holder, token, expires_at;

-- name: release_lease
UPDATE session_leases SET expires_at = :now
WHERE session_id = :session_id AND token = :token AND expires_at > :now;

-- name: get_lease
SELECT session_id, holder, token, expires_at FROM session_leases
WHERE session_id = :session_id AND expires_at > :now;

-- name: expire_leases
DELETE FROM session_leases WHERE expires_at < :cutoff;

-- name: ensure_lease_slots
WITH RECURSIVE g(n) AS (SELECT 1 WHERE :count >= 1 UNION ALL SELECT n + 1 FROM g WHERE n < :count)
INSERT OR IGNORE INTO lease_slots (pool, slot, token, expires_at) SELECT :pool, n, 0, 0 FROM g;

-- name: _ensure_slot_pool
INSERT OR IGNORE INTO lease_slot_pools (pool, waiting) VALUES (:pool, 0);

-- name: _free_slot
SELECT slot FROM lease_slots
WHERE pool = :pool AND slot <= :slots AND expires_at <= :now ORDER BY slot LIMIT 1;

-- name: _pool_waited_on
UPDATE lease_slot_pools SET waiting = 1 WHERE pool = :pool AND waiting = 0;

-- name: acquire_lease_slot
-- The lease part of the slot-capped acquire; the driver runs it in one IMMEDIATE transaction
-- with _free_slot and _bind_slot (SQLite serializes writers, so no row locks are needed).
-- The fencing token is allocated inside this statement: the counter's value + 1, and the
-- triggers of migration 0003 raise the counter to it as the row is written (as nextval()
-- does inside the Postgres statement), so an uncapped acquire is this one statement.
INSERT INTO session_leases (session_id, holder, token, expires_at, contended)
VALUES (
    :session_id, :holder, (SELECT value + 1 FROM counters WHERE name = 'lease_tokens'),
    :expires_at, 0
)
ON CONFLICT (session_id) DO UPDATE
    SET holder = excluded.holder, token = excluded.token, expires_at = excluded.expires_at,
        contended = 0
    WHERE session_leases.expires_at <= :now
RETURNING session_id, holder, token, expires_at;

-- name: _lease_contended
UPDATE session_leases SET contended = 1
WHERE session_id = :session_id AND contended = 0 AND expires_at > :now;

-- name: _bind_slot
UPDATE lease_slots SET token = :token, expires_at = :expires_at WHERE pool = :pool AND slot = :slot;

-- name: renew_lease_slot
UPDATE session_leases SET expires_at = :expires_at
WHERE session_id = :session_id AND token = :token AND expires_at > :now
RETURNING session_id, holder, token, expires_at;

-- name: _renew_slot
UPDATE lease_slots SET expires_at = :expires_at WHERE pool = :pool AND token = :token;

-- name: release_lease_slot
UPDATE session_leases SET expires_at = :now
WHERE session_id = :session_id AND token = :token AND expires_at > :now
RETURNING contended;

-- name: _release_slot
UPDATE lease_slots SET expires_at = :now
WHERE pool = :pool AND token = :token AND expires_at > :now
RETURNING pool;

-- name: _pool_woken
UPDATE lease_slot_pools SET waiting = 0 WHERE pool = :pool AND waiting = 1 RETURNING pool;

-- name: count_leases
-- Legacy limiter only (lock.mode = db_poll): the global COUNT(*) the old loop ran per attempt.
-- Liveness is judged by asyncstore_now() (time.time() in the connection's thread, read
-- after the statement's snapshot began), not a :now taken before the statement ran: a
-- release committed in between kept its release time as expires_at and was counted live
-- beside the lease that replaced it (6 live under a cap of 5, twice in loaded runs).
SELECT count(*) AS n FROM session_leases WHERE expires_at > asyncstore_now();

-- ---------------------------------------------------------------- leased jobs
-- One engine, two kinds (storage.base.JobKind): see the Postgres dialect's header. A
-- statement named <op>_jobs is written once for both kinds ({jobs} the table, {waiting},
-- {running}, {done}, {dead} the status names, filled from the closed set of kinds); a
-- statement named <op>_tasks or <op>_outbox is that kind's own rule.

-- name: heartbeat_jobs
UPDATE {jobs} SET run_after = :lease_until, updated_at = :now
WHERE status = '{running}'
  AND (id, lease_token) IN (SELECT value ->> 0, value ->> 1 FROM json_each(:claims))
RETURNING id;

-- name: complete_jobs
UPDATE {jobs} SET status = '{done}', updated_at = :now
WHERE status = '{running}'
  AND (id, lease_token) IN (SELECT value ->> 0, value ->> 1 FROM json_each(:claims))
RETURNING id;

-- name: fail_jobs
UPDATE {jobs} AS t SET
    status = CASE WHEN t.attempts >= t.max_attempts THEN '{dead}' ELSE '{waiting}' END,
    run_after = coalesce(f.retry_at, :now),
    last_error = f.error,
    updated_at = :now
FROM (SELECT value ->> 0 AS fid, value ->> 1 AS ftoken, value ->> 2 AS error,
             value ->> 3 AS retry_at
      FROM json_each(:failures)) AS f
WHERE t.id = f.fid AND t.lease_token = f.ftoken AND t.status = '{running}'
RETURNING id, status;

-- name: release_jobs
UPDATE {jobs} SET status = '{waiting}', run_after = :now,
    attempts = max(attempts - 1, 0), updated_at = :now
WHERE status = '{running}'
  AND (id, lease_token) IN (SELECT value ->> 0, value ->> 1 FROM json_each(:claims))
RETURNING id;

-- name: dead_letter_jobs
-- A permanent failure or a cancelled job: dead now, whatever attempts are left.
UPDATE {jobs} AS t SET status = '{dead}', last_error = f.error, updated_at = :now
FROM (SELECT value ->> 0 AS fid, value ->> 1 AS ftoken, value ->> 2 AS error
      FROM json_each(:failures)) AS f
WHERE t.id = f.fid AND t.lease_token = f.ftoken AND t.status = '{running}'
RETURNING id;

-- name: redrive_jobs
-- A redriven outbox message goes back to its place (its id) among its group's open
-- messages: it waits while a message of its group is in flight, then goes before the later
-- ones still pending (one writer: no group version to bump here).
UPDATE {jobs} SET status = '{waiting}', attempts = 0, run_after = :now, updated_at = :now
WHERE status = '{dead}' AND id IN (SELECT value FROM json_each(:ids))
RETURNING id;

-- name: get_jobs
SELECT * FROM {jobs} WHERE id = :id;

-- name: purge_jobs
DELETE FROM {jobs} WHERE status = '{done}' AND updated_at < :cutoff;

-- name: _existing_keyed_tasks
SELECT * FROM agent_tasks
WHERE idempotency_key IS NOT NULL AND status IN ('queued', 'running')
  AND (queue, idempotency_key) IN (SELECT value ->> 0, value ->> 1 FROM json_each(:keys));

-- name: _max_task_id
SELECT coalesce(max(id), 0) FROM agent_tasks;

-- name: enqueue_tasks
INSERT INTO agent_tasks (queue, payload, priority, run_after, idempotency_key, max_attempts,
                         created_at, updated_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?);

-- name: _tasks_after
SELECT * FROM agent_tasks WHERE id > :after ORDER BY id;

-- name: _part_claim_attempt
-- A claim's SET of a task row it takes (claim_tasks, claim_limited_tasks); see Postgres's.
status = CASE WHEN status = 'running' AND attempts >= max_attempts
              THEN 'dead' ELSE 'running' END,
last_error = CASE WHEN status = 'running' AND attempts >= max_attempts
                  THEN 'lease expired on the last attempt'
                  WHEN status = 'running' THEN 'lease expired'
                  ELSE last_error END,
attempts = CASE WHEN status = 'running' AND attempts >= max_attempts
                THEN attempts ELSE attempts + 1 END,

-- name: claim_tasks
-- A running task whose lease expired with no attempts left is dead-lettered, not re-run; one
-- with attempts left is re-run with last_error 'lease expired' (workers count re-runs by it).
UPDATE agent_tasks SET
    -- include: _part_claim_attempt
    worker_id = :worker_id,
    lease_token = :token,
    run_after = :lease_until,
    updated_at = :now
WHERE id IN (
    SELECT id FROM agent_tasks
    WHERE queue = :queue AND status IN ('queued', 'running') AND run_after <= :now
      AND NOT EXISTS (SELECT 1 FROM task_queues q WHERE q.queue = :queue)  -- coordinated
    ORDER BY priority DESC, run_after, id
    LIMIT :limit
)
RETURNING *;

-- name: _max_outbox_id
SELECT coalesce(max(id), 0) FROM outbox;

-- name: next_task_due
-- Read by idle workers: a running task's run_after is its lease expiry, so the minimum is
-- the next moment a delayed task becomes due or a dead worker's task becomes claimable.
SELECT min(run_after) - :now AS due_s
FROM agent_tasks WHERE queue = :queue AND status IN ('queued', 'running');

-- name: task_backlog
SELECT queue AS name,
    sum(run_after <= :now) AS waiting,
    sum(status = 'queued' AND run_after > :now) AS delayed,
    sum(status = 'running' AND run_after > :now) AS in_flight,
    :now - min(CASE WHEN run_after <= :now THEN run_after END) AS oldest_wait_s
FROM agent_tasks WHERE status IN ('queued', 'running')
GROUP BY queue ORDER BY queue;

-- name: outbox_backlog
-- Metrics only; kept apart from the outbox claim queries. Rows held back behind an earlier
-- message of their group count as waiting: they are due, delivery order makes them wait.
SELECT 'outbox' AS name,
    coalesce(sum(run_after <= :now), 0) AS waiting,
    coalesce(sum(status = 'pending' AND run_after > :now), 0) AS delayed,
    coalesce(sum(status = 'sending' AND run_after > :now), 0) AS in_flight,
    :now - min(CASE WHEN run_after <= :now THEN run_after END) AS oldest_wait_s
FROM outbox WHERE status IN ('pending', 'sending');

-- name: enqueue_outbox
INSERT INTO outbox (channel, account, payload, max_attempts, run_after, created_at, updated_at)
VALUES (?, ?, ?, ?, ?, ?, ?);

-- name: _outbox_after
SELECT * FROM outbox WHERE id > :after ORDER BY id;

-- name: claim_outbox
-- Group rule (both dialects): nothing of a (channel, account) group is claimed while one of
-- its messages is in flight under a live claim, and a message waiting for its retry holds
-- back the later messages of its group; a dead message holds nothing back. A claim takes a
-- prefix, in id order, of its groups' due messages. One writer: the claim's transaction sees
-- every committed claim, so no group row is needed here (see the Postgres dialect).
UPDATE outbox SET
    status = CASE WHEN status = 'sending' AND attempts >= max_attempts
                  THEN 'dead' ELSE 'sending' END,
    last_error = CASE WHEN status = 'sending' AND attempts >= max_attempts
                      THEN 'lease expired on the last attempt' ELSE last_error END,
    attempts = CASE WHEN status = 'sending' AND attempts >= max_attempts
                    THEN attempts ELSE attempts + 1 END,
    worker_id = :worker_id,
    lease_token = :token,
    run_after = :lease_until,
    updated_at = :now
WHERE id IN (
    SELECT o.id FROM outbox o
    WHERE o.status IN ('pending', 'sending') AND o.run_after <= :now
      AND (:channels IS NULL OR o.channel IN (SELECT value FROM json_each(:channels)))
      AND NOT EXISTS (
          SELECT 1 FROM outbox p
          WHERE p.channel = o.channel AND p.account = o.account
            AND p.id < o.id AND p.status IN ('pending', 'sending') AND p.run_after > :now
      )
      AND NOT EXISTS (  -- any message of the group in flight (outbox_sending_group)
          SELECT 1 FROM outbox p
          WHERE p.channel = o.channel AND p.account = o.account
            AND p.status = 'sending' AND p.run_after > :now
      )
    ORDER BY o.id
    LIMIT :limit
)
RETURNING *;

-- ---------------------------------------------------------------- coordinated task queues
-- Ordering groups and fleet-wide limits (migration 0010, storage/_queue_limits.py), the
-- same semantics as Postgres. One writer: a coordinated claim's BEGIN IMMEDIATE
-- transaction reads the queue's row, counts, claims and logs, and sees every committed
-- claim, so nothing is locked. claim_tasks (no limits, no groups) is unchanged.

-- name: enqueue_grouped_tasks
INSERT INTO agent_tasks (queue, payload, priority, run_after, idempotency_key, max_attempts,
                         created_at, updated_at, group_key)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?);

-- name: _ensure_task_queue
INSERT INTO task_queues (queue, updated_at) VALUES (:queue, :now) ON CONFLICT DO NOTHING;

-- name: set_queue_limits
INSERT INTO task_queues AS q (queue, max_running, max_per_second, max_per_group, updated_at)
VALUES (:queue, :max_running, :max_per_second, :max_per_group, :now)
ON CONFLICT (queue) DO UPDATE SET
    max_running = excluded.max_running, max_per_second = excluded.max_per_second,
    max_per_group = excluded.max_per_group, updated_at = excluded.updated_at
RETURNING queue, max_running, max_per_second, max_per_group;

-- name: get_queue_limits
SELECT queue, max_running, max_per_second, max_per_group FROM task_queues
WHERE queue = :queue;

-- name: _lock_task_queue
-- Read inside the claim's write transaction (the one writer is the lock).
SELECT max_running, max_per_second, max_per_group, recent_starts FROM task_queues
WHERE queue = :queue;

-- name: _running_tasks
SELECT count(*) AS n, min(run_after) AS first_expiry FROM agent_tasks
WHERE queue = :queue AND status = 'running' AND run_after > :now;

-- name: claim_limited_tasks
-- :budget is what the limits allow (computed in the same transaction); the group rule and
-- the order are Postgres's claim_limited_tasks.
UPDATE agent_tasks SET
    -- include: _part_claim_attempt
    worker_id = :worker_id,
    lease_token = :token,
    run_after = :lease_until,
    updated_at = :now
WHERE id IN (
    WITH picked AS MATERIALIZED (
        SELECT t.id, t.group_key FROM agent_tasks t
        WHERE t.queue = :queue AND t.status IN ('queued', 'running') AND t.run_after <= :now
          AND (t.group_key IS NULL OR (
              NOT EXISTS (
                  SELECT 1 FROM agent_tasks p
                  WHERE p.queue = t.queue AND p.group_key = t.group_key AND p.id < t.id
                    AND p.status = 'queued' AND p.run_after > :now
              )
              AND (SELECT count(*) FROM (
                  SELECT 1 FROM agent_tasks p
                  WHERE p.queue = t.queue AND p.group_key = t.group_key AND p.id <> t.id
                    AND p.status IN ('queued', 'running')
                    AND (p.id < t.id OR (p.status = 'running' AND p.run_after > :now))
                  LIMIT :per_group
              )) < :per_group
          ))
        ORDER BY t.priority DESC, t.run_after, t.id
        LIMIT :budget
    )
    SELECT k.id FROM picked k WHERE k.group_key IS NULL
    UNION ALL
    SELECT o.id FROM (
        SELECT p.id, p.group_key,
               row_number() OVER (PARTITION BY p.group_key ORDER BY p.id) AS rn
        FROM agent_tasks p
        WHERE p.queue = :queue AND p.status IN ('queued', 'running')
          AND p.group_key IN (SELECT group_key FROM picked WHERE group_key IS NOT NULL)
          AND NOT (p.status = 'running' AND p.run_after > :now)
    ) o
    JOIN (SELECT group_key, count(*) AS k FROM picked WHERE group_key IS NOT NULL
          GROUP BY group_key) g ON g.group_key = o.group_key
    WHERE o.rn <= g.k
)
RETURNING *;

-- name: _due_tasks_left
-- After the claim: a due task it did not take (the claimed ones now run under a lease).
SELECT EXISTS (
    SELECT 1 FROM agent_tasks
    WHERE queue = :queue AND status IN ('queued', 'running') AND run_after <= :now
) AS left_over;

-- name: _next_retry_due
SELECT min(run_after) AS next_due FROM agent_tasks
WHERE queue = :queue AND status = 'queued' AND run_after > :now;

-- name: _log_task_queue
UPDATE task_queues SET recent_starts = :starts, waiting = (waiting OR :refused),
    updated_at = :now
WHERE queue = :queue;

-- name: wake_task_queue
UPDATE task_queues SET waiting = 0 WHERE queue = :queue AND waiting RETURNING queue;
-- name: cancel_task
-- Run after _task_cancel_state in the same BEGIN IMMEDIATE transaction (one writer: the
-- status read there is the status this update sees); see the Postgres statement.
UPDATE agent_tasks SET status = 'cancelled', last_error = :reason, updated_at = :now
WHERE id = :id AND status IN ('queued', 'running');

-- name: _task_cancel_state
SELECT status, worker_id, queue FROM agent_tasks WHERE id = :id;

-- name: purge_tasks
-- The tasks' own purge: succeeded and cancelled tasks (both finished for good); dead ones
-- are kept for a redrive.
DELETE FROM agent_tasks WHERE status IN ('succeeded', 'cancelled') AND updated_at < :cutoff;

-- name: request_cancel
INSERT INTO cancel_requests (session_id, reason, requested_at)
VALUES (:session_id, :reason, :now)
ON CONFLICT (session_id) DO UPDATE SET session_id = cancel_requests.session_id
RETURNING session_id, reason, requested_at;

-- name: get_cancel
SELECT session_id, reason, requested_at FROM cancel_requests WHERE session_id = :session_id;

-- name: clear_cancel
DELETE FROM cancel_requests WHERE session_id = :session_id;

-- name: notify
SELECT 1;

-- name: acquire_leadership
-- Take the role if it is free or expired, or renew it if this holder has it; a row comes
-- back only then.
INSERT INTO maintenance_leaders (name, holder, expires_at) VALUES (:name, :holder, :expires_at)
ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at
    WHERE maintenance_leaders.holder = excluded.holder OR maintenance_leaders.expires_at <= :now
RETURNING holder;

-- name: release_leadership
DELETE FROM maintenance_leaders WHERE name = :name AND holder = :holder;

-- name: journal_webhook_events
INSERT INTO webhook_journal (endpoint, owner, body, claimed_at, created_at)
VALUES (:endpoint, :owner, :body, :now, :now)
RETURNING id;

-- name: delete_webhook_events
DELETE FROM webhook_journal WHERE id IN (SELECT value FROM json_each(:ids));

-- name: claim_webhook_orphans
-- Events their owner did not batch within the age limit (it crashed, or lost its storage):
-- taken over by this owner, oldest first (one writer at a time: BEGIN IMMEDIATE).
UPDATE webhook_journal SET owner = :owner, claimed_at = :now
WHERE id IN (
    SELECT id FROM webhook_journal
    WHERE endpoint IN (SELECT value FROM json_each(:endpoints)) AND claimed_at < :cutoff
    ORDER BY id LIMIT :limit
)
RETURNING id, endpoint, body;

-- name: record_webhook_attempts
INSERT INTO webhook_attempts (endpoint, webhook_id, outbox_id, attempted_at, status, error, ok)
VALUES (:endpoint, :webhook_id, :outbox_id, :attempted_at, :status, :error, :ok);

-- name: list_webhook_attempts
-- Newest first. :failed: only webhook-ids that no attempt delivered; :webhook_id: one id.
SELECT a.* FROM webhook_attempts a
WHERE (:endpoint IS NULL OR a.endpoint = :endpoint)
  AND (:webhook_id IS NULL OR a.webhook_id = :webhook_id)
  AND (NOT :failed OR NOT EXISTS (
        SELECT 1 FROM webhook_attempts s WHERE s.webhook_id = a.webhook_id AND s.ok))
ORDER BY a.id DESC
LIMIT :limit;

-- name: purge_webhook_attempts
DELETE FROM webhook_attempts WHERE attempted_at < :cutoff;

-- ---------------------------------------------------------------- login attempts (auth)
-- Same statements as the Postgres dialect: each reads and writes the row in one statement
-- (SQLite runs one writer at a time), times are :now from the writer's clock.

-- name: reserve_login_attempt
INSERT INTO login_attempts AS a (scope, key, window_start, in_flight, granted, updated_at)
VALUES (:scope, :key, :now, 1, 1, :now)
ON CONFLICT (scope, key) DO UPDATE SET
    window_start = CASE WHEN a.window_start + :window_s <= :now
                        THEN :now ELSE a.window_start END,
    failures = CASE WHEN a.window_start + :window_s <= :now THEN 0 ELSE a.failures END,
    in_flight = CASE WHEN a.window_start + :window_s <= :now THEN 0 ELSE a.in_flight END
        + CASE WHEN a.locked_until <= :now
                AND CASE WHEN a.window_start + :window_s <= :now THEN 0
                         ELSE a.failures + a.in_flight END < :limit
               THEN 1 ELSE 0 END,
    granted = a.locked_until <= :now
        AND CASE WHEN a.window_start + :window_s <= :now THEN 0
                 ELSE a.failures + a.in_flight END < :limit,
    updated_at = :now
RETURNING granted, window_start, locked_until, updated_at AS now;

-- name: release_login_attempt
UPDATE login_attempts
SET in_flight = max(in_flight - 1, 0), updated_at = :now
WHERE scope = :scope AND key = :key AND window_start = :window_start;

-- name: succeed_login_attempt
UPDATE login_attempts
SET in_flight = CASE WHEN window_start = :window_start THEN max(in_flight - 1, 0)
                     ELSE in_flight END,
    failures = 0, locked_until = 0, next_lockout_s = 0, last_failure = 0, updated_at = :now
WHERE scope = :scope AND key = :key;

-- name: fail_login_attempt
UPDATE login_attempts AS a SET
    window_start = CASE WHEN a.window_start + :window_s <= :now THEN :now ELSE a.window_start END,
    in_flight = CASE WHEN a.window_start + :window_s <= :now THEN 0
                     WHEN a.window_start = :window_start THEN max(a.in_flight - 1, 0)
                     ELSE a.in_flight END,
    failures = CASE
        WHEN a.locked_until > :now
            THEN CASE WHEN a.window_start + :window_s <= :now THEN 0 ELSE a.failures END
        WHEN CASE WHEN a.window_start + :window_s <= :now THEN 0 ELSE a.failures END + 1
             >= :limit THEN 0
        ELSE CASE WHEN a.window_start + :window_s <= :now THEN 0 ELSE a.failures END + 1 END,
    locked_until = CASE
        WHEN a.locked_until <= :now
         AND CASE WHEN a.window_start + :window_s <= :now THEN 0 ELSE a.failures END + 1
             >= :limit
        THEN :now + min(:lockout_max_s,
                        CASE WHEN a.next_lockout_s <= 0 OR :now - a.last_failure > :forget_after_s
                             THEN :lockout_base_s ELSE a.next_lockout_s END)
        ELSE a.locked_until END,
    locked_at = CASE
        WHEN a.locked_until <= :now
         AND CASE WHEN a.window_start + :window_s <= :now THEN 0 ELSE a.failures END + 1
             >= :limit
        THEN :now ELSE a.locked_at END,
    next_lockout_s = CASE
        WHEN a.locked_until <= :now
         AND CASE WHEN a.window_start + :window_s <= :now THEN 0 ELSE a.failures END + 1
             >= :limit
        THEN min(:lockout_max_s, :lockout_factor *
                 CASE WHEN a.next_lockout_s <= 0 OR :now - a.last_failure > :forget_after_s
                      THEN :lockout_base_s ELSE a.next_lockout_s END)
        WHEN :now - a.last_failure > :forget_after_s THEN 0
        ELSE a.next_lockout_s END,
    last_failure = :now,
    updated_at = :now
WHERE a.scope = :scope AND a.key = :key
RETURNING locked_at = :now AS tripped;

-- name: purge_login_attempts
DELETE FROM login_attempts WHERE updated_at < :cutoff AND locked_until <= :now;

-- name: record_periodic_tick
INSERT INTO periodic_ticks (schedule, tick_at, recorded_at) VALUES (:schedule, :tick_at, :now)
ON CONFLICT (schedule, tick_at) DO NOTHING
RETURNING schedule;

-- name: set_periodic_tick_task
UPDATE periodic_ticks SET task_id = :task_id WHERE schedule = :schedule AND tick_at = :tick_at;

-- name: last_periodic_ticks
SELECT p.schedule, max(p.tick_at) AS tick_at
FROM periodic_ticks p
WHERE p.schedule IN (SELECT value FROM json_each(:schedules))
GROUP BY p.schedule;

-- name: purge_periodic_ticks
DELETE FROM periodic_ticks
WHERE recorded_at < :cutoff
  AND EXISTS (SELECT 1 FROM periodic_ticks q
              WHERE q.schedule = periodic_ticks.schedule AND q.tick_at > periodic_ticks.tick_at);

-- ---------------------------------------------------------------- operator views and audit
-- Cold reads for the dashboard (orchestrator/dashboard.py) and its audit log (0013).

-- name: list_jobs
SELECT * FROM {jobs} WHERE status = :status ORDER BY id DESC LIMIT :limit;

-- name: list_queued_tasks
-- :queues a JSON array of names, :limit rows per queue: each queue's next queued tasks in
-- claim order, through agent_tasks_claimable, queues in the array's order.
SELECT t.* FROM json_each(:queues) AS q
JOIN agent_tasks AS t ON t.id IN (
    SELECT a.id FROM agent_tasks AS a
    WHERE a.queue = q.value AND a.status = 'queued'
    ORDER BY a.priority DESC, a.run_after, a.id
    LIMIT :limit)
ORDER BY q.key, t.priority DESC, t.run_after, t.id;

-- name: list_leases
SELECT session_id, holder, token, expires_at FROM session_leases
WHERE expires_at > :now ORDER BY session_id LIMIT :limit;

-- name: record_audit
INSERT INTO operator_audit (created_at, actor, action, target, outcome, detail)
VALUES (:now, :actor, :action, :target, :outcome, :detail)
RETURNING *;

-- name: list_audit
SELECT * FROM operator_audit ORDER BY id DESC LIMIT :limit;

-- ---------------------------------------------------------------- instance presence
-- Each runtime instance's live subscribers per session, for the dashboard (0015); :now is
-- the writer's clock (every process on one SQLite file shares the host's).

-- name: publish_presence
INSERT INTO instance_presence (instance_id, host, pid, seen_at, expires_at, counts)
VALUES (:instance_id, :host, :pid, :now, :now + :ttl_s, :counts)
ON CONFLICT (instance_id) DO UPDATE
SET host = excluded.host, pid = excluded.pid, seen_at = excluded.seen_at,
    expires_at = excluded.expires_at, counts = excluded.counts
RETURNING *;

-- name: list_presence
SELECT * FROM instance_presence WHERE expires_at > :now ORDER BY instance_id LIMIT :limit;

-- name: withdraw_presence
DELETE FROM instance_presence WHERE instance_id = :instance_id;

-- name: purge_presence
DELETE FROM instance_presence WHERE expires_at <= :now;
