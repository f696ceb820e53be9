-- Named queries of the Postgres driver. Values are always bind parameters.
--
-- DESIGN (scaling past one primary, issue 17). Every hot statement below touches one
-- session (its WHERE / ON CONFLICT names session_id) or one other key: a queue, an outbox
-- (channel, account) group, a slot pool, a webhook endpoint, a login (scope, key). So the
-- session tables (chat_sessions, chat_messages, stream_events, session_leases,
-- cancel_requests) can be distributed by session_id, each statement routed to one shard;
-- the keyed tables stay on one node or are distributed by their own key. Cold statements
-- (purges, backlogs, count_leases, list_webhook_attempts) scan across keys on purpose and
-- would run on every node. append_stream_events carries the sessions of one flush: on a
-- sharded deployment that is one statement per shard unless the writer batches by shard.
-- Global state that sharding must replace: the sequences lease_tokens (fencing: per
-- session only, so per shard is enough while a session never moves) and claim_tokens,
-- the advisory locks (acquire_leadership, the migration lock), and LISTEN/NOTIFY, which
-- is per server. Every committing transaction that sent a NOTIFY takes one database-wide
-- lock: notify once per flush, never per event (python -m benchmarks notify measures it).
-- tests/contract/test_shard_keys.py holds the classification; a new query or unique key
-- fails it until classified there.

-- name: ping
SELECT 1;

-- name: append_messages
-- $1 session, $2 roles, $3 contents, $4 fencing token or NULL. The session upsert takes the
-- row lock that serializes appenders, so seqs are gap-free; a failed fence inserts nothing.
WITH s AS (
    INSERT INTO chat_sessions AS cs (session_id, last_seq)
    SELECT $1, cardinality($2::text[])
    WHERE $4::bigint IS NULL OR EXISTS (
        SELECT 1 FROM session_leases l
        WHERE l.session_id = $1 AND l.token = $4 AND l.expires_at > now()
        FOR SHARE
    )
    ON CONFLICT (session_id) DO UPDATE
        SET last_seq = cs.last_seq + cardinality($2::text[]), updated_at = now()
    RETURNING last_seq
)
INSERT INTO chat_messages (session_id, seq, role, content)
SELECT $1, s.last_seq - cardinality($2::text[]) + m.ord, m.role, m.content
FROM s, unnest($2::text[], $3::json[]) WITH ORDINALITY AS m(role, content, ord)
RETURNING session_id, seq, role, content, created_at;

-- name: load_messages
SELECT session_id, seq, role, content, created_at FROM chat_messages
WHERE session_id = $1 AND seq > $2 ORDER BY seq LIMIT $3;

-- name: _lock_chat_session
-- delete_session's first statement: waits for an append in flight to commit, so the delete
-- that follows (a new snapshot) sees its messages too and none is left behind.
SELECT 1 FROM chat_sessions WHERE session_id = $1 FOR UPDATE;

-- name: delete_session
WITH m AS (DELETE FROM chat_messages WHERE session_id = $1 RETURNING 1),
     s AS (DELETE FROM chat_sessions WHERE session_id = $1 RETURNING 1),
     e AS (DELETE FROM stream_events WHERE session_id = $1 RETURNING 1),
     c AS (DELETE FROM cancel_requests WHERE session_id = $1 RETURNING 1),
     l AS (DELETE FROM session_leases WHERE session_id = $1 RETURNING 1)
SELECT (SELECT count(*) FROM m) + (SELECT count(*) FROM s) + (SELECT count(*) FROM e)
     + (SELECT count(*) FROM c) + (SELECT count(*) FROM l);

-- name: append_stream_events
-- $1..$5 the events' columns. Fenced per (session, epoch), in this statement: an epoch is
-- accepted only if it is the session's lease token (the lease row is read FOR SHARE, so an
-- acquisition committing concurrently either waits for this append or is seen by it, and
-- its new holder reads a head that includes what was accepted here); without a lease row,
-- only if it is no older than the epoch of the session's last stored event (read through
-- the primary key, newest seq first). Accepted events replace a stored event only of an
-- older epoch (a superseded holder's seqs); the same epoch is a retry and is skipped.
-- $6 a channel and $7 notification payloads (empty: none), sent in order with the insert
-- (delivered on commit) only if no pair is refused: the stream writer's notification of the
-- flush, one round trip with its rows. Returns the count written, the refused (session,
-- epoch) pairs and how many payloads were sent.
WITH e AS (
    SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::text[], $5::json[])
        AS e(session_id, seq, epoch, kind, payload)
), f AS (
    SELECT DISTINCT session_id, epoch FROM e
), held AS (
    SELECT l.session_id, l.token FROM session_leases l
    WHERE l.session_id IN (SELECT session_id FROM f)
    ORDER BY l.session_id
    FOR SHARE
), ok AS (
    SELECT f.session_id, f.epoch FROM f LEFT JOIN held h ON h.session_id = f.session_id
    WHERE CASE WHEN h.session_id IS NOT NULL THEN f.epoch = h.token
               ELSE f.epoch >= coalesce((
                   SELECT s.epoch FROM stream_events s WHERE s.session_id = f.session_id
                   ORDER BY s.seq DESC LIMIT 1), 0)
          END
), ins AS (
    INSERT INTO stream_events (session_id, seq, epoch, kind, payload)
    SELECT e.session_id, e.seq, e.epoch, e.kind, e.payload FROM e JOIN ok USING (session_id, epoch)
    ON CONFLICT (session_id, seq) DO UPDATE SET
        epoch = EXCLUDED.epoch, kind = EXCLUDED.kind, payload = EXCLUDED.payload,
        created_at = now()
    WHERE stream_events.epoch < EXCLUDED.epoch
    RETURNING 1
), refused AS (
    SELECT f.session_id, f.epoch FROM f
    WHERE NOT EXISTS (SELECT 1 FROM ok WHERE ok.session_id = f.session_id AND ok.epoch = f.epoch)
), sent AS (
    SELECT pg_notify($6, n.payload) FROM unnest($7::text[]) WITH ORDINALITY AS n(payload, i)
    WHERE NOT EXISTS (SELECT 1 FROM refused)
    ORDER BY n.i
)
SELECT (SELECT count(*) FROM ins) AS stored,
       (SELECT array_agg(session_id ORDER BY session_id, epoch) FROM refused) AS refused_ids,
       (SELECT array_agg(epoch ORDER BY session_id, epoch) FROM refused) AS refused_epochs,
       (SELECT count(*) FROM sent) AS notified;

-- name: load_stream_events
SELECT session_id, epoch, seq, kind, payload, created_at FROM stream_events
WHERE session_id = $1 AND seq > $2 ORDER BY seq LIMIT $3;

-- name: last_stream_seq
SELECT coalesce(max(seq), 0) FROM stream_events WHERE session_id = $1;

-- name: purge_stream_events
DELETE FROM stream_events WHERE created_at < now() - make_interval(secs => $1);

-- name: purge_stream_events_batch
-- $1 age in seconds, $2 batch size. At most $2 expired rows, by ctid (the subquery locks them,
-- so their ctids hold); rows locked by others are skipped. No ORDER BY: created_at has only a
-- BRIN index, so sorting would read every expired row on every batch (quadratic over a
-- backlog: 500k rows took 11 s instead of under 1 s). The BRIN bitmap scan returns rows in
-- heap order, which is roughly insertion order for this append-only table.
DELETE FROM stream_events
WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM stream_events
    WHERE created_at < now() - make_interval(secs => $1)
    LIMIT $2
    FOR UPDATE SKIP LOCKED
));

-- name: acquire_lease
-- One statement: insert, or take over an expired lease; a live lease makes it return nothing.
INSERT INTO session_leases AS l (session_id, holder, token, expires_at)
VALUES ($1, $2, nextval('lease_tokens'), now() + make_interval(secs => $3))
ON CONFLICT (session_id) DO UPDATE
    SET holder = EXCLUDED.holder, token = EXCLUDED.token, expires_at = EXCLUDED.expires_at
    WHERE l.expires_at <= now()
RETURNING session_id, holder, token, expires_at;

-- name: renew_lease
UPDATE session_leases SET expires_at = now() + make_interval(secs => $3)
WHERE session_id = $1 AND token = $2 AND expires_at > now()
RETURNING session_id, holder, token, expires_at;

-- name: release_lease
UPDATE session_leases SET expires_at = now()
WHERE session_id = $1 AND token = $2 AND expires_at > now();

-- name: get_lease
SELECT session_id, holder, token, expires_at FROM session_leases
WHERE session_id = $1 AND expires_at > now();

-- name: expire_leases
DELETE FROM session_leases WHERE expires_at < now() - make_interval(secs => $1);

-- name: ensure_lease_slots
-- $1 pool, $2 number of slots. Creates the pool's numbered slots 1..$2 that do not exist yet.
WITH p AS (INSERT INTO lease_slot_pools (pool) VALUES ($1) ON CONFLICT DO NOTHING)
INSERT INTO lease_slots (pool, slot) SELECT $1, g FROM generate_series(1, $2) AS g
ON CONFLICT DO NOTHING;

-- name: acquire_lease_slot
-- $1 session, $2 holder, $3 ttl seconds, $4 slot pool or NULL (no cap), $5 slots in the pool.
-- One statement, no COUNT(*) and no DELETE: claim the lowest free numbered slot of the pool
-- (SKIP LOCKED, so concurrent acquirers never queue on one slot), take the session lease if
-- it is free or expired, and bind the slot to the new token. A busy session marks its live
-- lease contended and a full pool marks itself waited on, so that a release notifies remote
-- waiters only when there are some. Always one row: slot_ok is false when the pool was full,
-- the lease columns are NULL when the lease was not taken.
WITH slot AS (
    SELECT s.pool, s.slot FROM lease_slots s
    WHERE s.pool = $4 AND s.slot <= $5 AND s.expires_at <= now()
    ORDER BY s.slot
    LIMIT 1
    FOR UPDATE SKIP LOCKED
), lease AS (
    INSERT INTO session_leases AS l (session_id, holder, token, expires_at)
    SELECT $1, $2, nextval('lease_tokens'), now() + make_interval(secs => $3)
    WHERE $4::text IS NULL OR EXISTS (SELECT 1 FROM slot)
    ON CONFLICT (session_id) DO UPDATE
        SET holder = EXCLUDED.holder, token = EXCLUDED.token, expires_at = EXCLUDED.expires_at,
            contended = false
        WHERE l.expires_at <= now()
    RETURNING l.session_id, l.holder, l.token, l.expires_at
), bound AS (
    UPDATE lease_slots s SET token = lease.token, expires_at = lease.expires_at
    FROM lease, slot WHERE s.pool = slot.pool AND s.slot = slot.slot
), busy AS (
    UPDATE session_leases l SET contended = true
    WHERE l.session_id = $1 AND NOT l.contended AND l.expires_at > now()
      AND ($4::text IS NULL OR EXISTS (SELECT 1 FROM slot))
      AND NOT EXISTS (SELECT 1 FROM lease)
), full_pool AS (
    UPDATE lease_slot_pools p SET waiting = true
    WHERE p.pool = $4 AND NOT p.waiting AND NOT EXISTS (SELECT 1 FROM slot)
)
SELECT ($4::text IS NULL OR EXISTS (SELECT 1 FROM slot)) AS slot_ok,
       lease.session_id, lease.holder, lease.token, lease.expires_at
FROM (SELECT 1) AS one LEFT JOIN lease ON true;

-- name: renew_lease_slot
-- $1 session, $2 token, $3 ttl seconds, $4 pool or NULL: renew the lease and its slot.
WITH renewed AS (
    UPDATE session_leases SET expires_at = now() + make_interval(secs => $3)
    WHERE session_id = $1 AND token = $2 AND expires_at > now()
    RETURNING session_id, holder, token, expires_at
), slot AS (
    UPDATE lease_slots s SET expires_at = renewed.expires_at
    FROM renewed WHERE s.pool = $4 AND s.token = renewed.token
)
SELECT session_id, holder, token, expires_at FROM renewed;

-- name: release_lease_slot
-- $1 session, $2 token, $3 channel, $4 pool or NULL. Release the lease and its slot; notify
-- $3 with 's:<session>' if an acquirer found the lease busy, and with 'p:<pool>' if one found
-- the pool full (clearing that flag). The NOTIFY is sent only then, in the same statement.
-- A released lease and slot expire at -infinity, not now(): an acquirer whose statement
-- started a moment before this one (an earlier now()) still sees them as free, instead of
-- finding the lease live, marking it contended after this release has looked, and waiting
-- for a notification that was never sent.
WITH released AS (
    UPDATE session_leases SET expires_at = '-infinity'
    WHERE session_id = $1 AND token = $2 AND expires_at > now()
    RETURNING session_id, contended
), freed AS (
    UPDATE lease_slots s SET expires_at = '-infinity'
    FROM released WHERE s.pool = $4 AND s.token = $2 AND s.expires_at > now()
    RETURNING s.pool
), woken AS (
    UPDATE lease_slot_pools p SET waiting = false
    FROM freed WHERE p.pool = freed.pool AND p.waiting
    RETURNING p.pool
)
SELECT EXISTS (SELECT 1 FROM released) AS released,
       (SELECT pg_notify($3, 's:' || $1) FROM released WHERE contended) AS session_woken,
       (SELECT pg_notify($3, 'p:' || pool) FROM woken) AS pool_woken;

-- name: count_leases
-- Legacy limiter only (lock.mode = db_poll): the global COUNT(*) the old loop ran per attempt.
SELECT count(*) FROM session_leases WHERE expires_at > now();

-- ---------------------------------------------------------------- leased jobs
-- One engine, two kinds (storage.base.JobKind): agent_tasks (queued / running / succeeded /
-- dead) and outbox (pending / sending / sent / dead). A statement named <op>_jobs is a
-- template written once for both: {jobs} is the kind's table and {waiting}, {running},
-- {done}, {dead} its status names, filled from the closed set of kinds when the queries
-- are loaded (render_job_queries), never from input; it becomes <op>_tasks and
-- <op>_outbox. A statement named <op>_tasks or <op>_outbox is that kind's own rule (its
-- enqueue, its claim order, a grouped kind's redrive) and takes the template's place.
-- While a job is running, run_after is its lease expiry.

-- name: enqueue_tasks
-- Rows with an idempotency key that matches an unfinished task return that task (the no-op
-- update makes RETURNING include it). Identity values follow the ORDER BY, so new rows'
-- ids are in input order. $7 a channel or NULL: when a returned task is queued, one
-- notification carries the earliest run_after of those (Unix seconds), in this statement,
-- sent on commit with the rows (no second round trip).
WITH ins AS (
    INSERT INTO agent_tasks (queue, payload, priority, run_after, idempotency_key, max_attempts)
    SELECT x.queue, x.payload, x.priority, coalesce(x.run_after, now()), x.idempotency_key,
           x.max_attempts
    FROM unnest($1::text[], $2::json[], $3::int[], $4::timestamptz[], $5::text[], $6::int[])
         WITH ORDINALITY AS x(queue, payload, priority, run_after, idempotency_key, max_attempts,
                              ord)
    ORDER BY x.ord
    ON CONFLICT (queue, idempotency_key)
        WHERE idempotency_key IS NOT NULL AND status IN ('queued', 'running')
        DO UPDATE SET idempotency_key = EXCLUDED.idempotency_key
    RETURNING *
), woken AS (
    SELECT pg_notify($7, extract(epoch FROM min(run_after))::text) AS sent
    FROM ins WHERE $7::text IS NOT NULL AND status = 'queued'
    HAVING count(*) > 0
)
SELECT ins.*, (SELECT count(*) FROM woken) AS notified FROM ins;

-- name: _part_claim_attempt
-- A claim's SET of a task row t it takes (claim_tasks, claim_limited_tasks): a running row
-- (its lease expired) with no attempts left is dead-lettered, not re-run; one with attempts
-- left is re-run with last_error 'lease expired' (workers count re-runs by it); a queued
-- row starts its next attempt.
status = CASE WHEN t.status = 'running' AND t.attempts >= t.max_attempts
              THEN 'dead' ELSE 'running' END,
last_error = CASE WHEN t.status = 'running' AND t.attempts >= t.max_attempts
                  THEN 'lease expired on the last attempt'
                  WHEN t.status = 'running' THEN 'lease expired'
                  ELSE t.last_error END,
attempts = CASE WHEN t.status = 'running' AND t.attempts >= t.max_attempts
                THEN t.attempts ELSE t.attempts + 1 END,

-- name: claim_tasks
-- $1 worker, $2 limit, $3 the one queue (an array, as every kind's claim), $4 lease seconds.
-- A running task whose lease expired with no attempts left is dead-lettered, not re-run; one
-- with attempts left is re-run with last_error 'lease expired' (workers count re-runs by it).
-- A coordinated queue (a task_queues row) is never claimed here: nothing is picked (one
-- index probe, evaluated once), and the caller finds out why (QueueCoordinated).
WITH picked AS (
    SELECT id FROM agent_tasks
    WHERE queue = ($3::text[])[1] AND status IN ('queued', 'running') AND run_after <= now()
      AND NOT EXISTS (SELECT 1 FROM task_queues q WHERE q.queue = ($3::text[])[1])
    ORDER BY priority DESC, run_after, id
    LIMIT $2
    FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE agent_tasks t SET
        -- include: _part_claim_attempt
        worker_id = $1,
        lease_token = nextval('claim_tokens'),
        run_after = now() + make_interval(secs => $4),
        updated_at = now()
    FROM picked WHERE t.id = picked.id
    RETURNING t.*
)
SELECT * FROM claimed WHERE status = 'running' ORDER BY priority DESC, id;

-- Updates under claims look rows up by primary key (id = ANY) and check each row's token
-- at its position in the arrays (ids are unique per call), with no join: a join with
-- unnest() let the planner pick a sequential scan of the whole table (its statistics
-- rarely see running rows) and rescan the unnest per row, O(table x batch) per write.

-- name: heartbeat_jobs
UPDATE {jobs} t SET run_after = now() + make_interval(secs => $3), updated_at = now()
WHERE t.id = ANY($1::bigint[]) AND t.status = '{running}'
  AND t.lease_token = ($2::bigint[])[array_position($1::bigint[], t.id)]
RETURNING t.id;

-- name: complete_jobs
UPDATE {jobs} t SET status = '{done}', updated_at = now()
WHERE t.id = ANY($1::bigint[]) AND t.status = '{running}'
  AND t.lease_token = ($2::bigint[])[array_position($1::bigint[], t.id)]
RETURNING t.id;

-- name: fail_jobs
UPDATE {jobs} t SET
    status = CASE WHEN t.attempts >= t.max_attempts THEN '{dead}' ELSE '{waiting}' END,
    run_after = coalesce(($4::timestamptz[])[array_position($1::bigint[], t.id)], now()),
    last_error = ($3::text[])[array_position($1::bigint[], t.id)],
    updated_at = now()
WHERE t.id = ANY($1::bigint[]) AND t.status = '{running}'
  AND t.lease_token = ($2::bigint[])[array_position($1::bigint[], t.id)]
RETURNING t.id, t.status;

-- name: release_jobs
UPDATE {jobs} t SET status = '{waiting}', run_after = now(),
    attempts = greatest(t.attempts - 1, 0), updated_at = now()
WHERE t.id = ANY($1::bigint[]) AND t.status = '{running}'
  AND t.lease_token = ($2::bigint[])[array_position($1::bigint[], t.id)]
RETURNING t.id;

-- name: dead_letter_jobs
-- A permanent failure or a cancelled job: dead now, whatever attempts are left.
UPDATE {jobs} t SET status = '{dead}',
    last_error = ($3::text[])[array_position($1::bigint[], t.id)], updated_at = now()
WHERE t.id = ANY($1::bigint[]) AND t.status = '{running}'
  AND t.lease_token = ($2::bigint[])[array_position($1::bigint[], t.id)]
RETURNING t.id;

-- name: redrive_jobs
UPDATE {jobs} SET status = '{waiting}', attempts = 0, run_after = now(), updated_at = now()
WHERE id = ANY($1::bigint[]) AND status = '{dead}'
RETURNING id;

-- name: get_jobs
SELECT * FROM {jobs} WHERE id = $1;

-- name: purge_jobs
DELETE FROM {jobs}
WHERE status = '{done}' AND updated_at < now() - make_interval(secs => $1);

-- name: next_task_due
-- Read by idle workers: a running task's run_after is its lease expiry, so the minimum is
-- the next moment a delayed task becomes due or a dead worker's task becomes claimable.
SELECT extract(epoch FROM min(run_after) - now())::float8 AS due_s
FROM agent_tasks WHERE queue = $1 AND status IN ('queued', 'running');

-- name: task_backlog
-- Rows are judged against a time read after the statement's snapshot (clock_timestamp(),
-- once, in a materialized CTE), not now(): now() is the transaction's start, which can
-- precede the enqueue of rows this snapshot sees, and due rows would read as delayed.
WITH t AS MATERIALIZED (SELECT clock_timestamp() AS at)
SELECT queue AS name,
    count(*) FILTER (WHERE run_after <= t.at) AS waiting,
    count(*) FILTER (WHERE status = 'queued' AND run_after > t.at) AS delayed,
    count(*) FILTER (WHERE status = 'running' AND run_after > t.at) AS in_flight,
    extract(epoch FROM t.at - min(run_after) FILTER (WHERE run_after <= t.at))::float8
        AS oldest_wait_s
FROM agent_tasks, t WHERE status IN ('queued', 'running')
GROUP BY queue, t.at ORDER BY queue;

-- name: outbox_backlog
-- Metrics only; kept apart from the outbox claim queries. Rows held back behind an earlier
-- message of their group count as waiting: they are due, delivery order makes them wait.
-- Judged against a time after the snapshot, as task_backlog.
WITH t AS MATERIALIZED (SELECT clock_timestamp() AS at)
SELECT 'outbox' AS name,
    count(*) FILTER (WHERE run_after <= t.at) AS waiting,
    count(*) FILTER (WHERE status = 'pending' AND run_after > t.at) AS delayed,
    count(*) FILTER (WHERE status = 'sending' AND run_after > t.at) AS in_flight,
    extract(epoch FROM t.at - min(run_after) FILTER (WHERE run_after <= t.at))::float8
        AS oldest_wait_s
FROM t LEFT JOIN outbox ON status IN ('pending', 'sending')
GROUP BY t.at;

-- name: enqueue_outbox
-- The group rows (see claim_outbox) are created here, in a stable order so two enqueues that
-- create the same new groups cannot deadlock; existing ones are left untouched. $5 a channel
-- or NULL: one notification, as enqueue_tasks sends it, in this statement.
WITH new_groups AS (
    INSERT INTO outbox_groups (channel, account)
    SELECT DISTINCT g.channel, g.account FROM unnest($1::text[], $2::text[]) AS g(channel, account)
    ORDER BY g.channel, g.account
    ON CONFLICT DO NOTHING
), ins AS (
    INSERT INTO outbox (channel, account, payload, max_attempts)
    SELECT x.channel, x.account, x.payload, x.max_attempts
    FROM unnest($1::text[], $2::text[], $3::json[], $4::int[])
         WITH ORDINALITY AS x(channel, account, payload, max_attempts, ord)
    ORDER BY x.ord
    RETURNING *
), woken AS (
    SELECT pg_notify($5, extract(epoch FROM min(run_after))::text) AS sent
    FROM ins WHERE $5::text IS NOT NULL
    HAVING count(*) > 0
)
SELECT ins.*, (SELECT count(*) FROM woken) AS notified FROM ins;

-- name: claim_outbox
-- $1 worker, $2 limit, $3 channels or NULL (any), $4 lease seconds.
-- Group rule (both dialects): nothing of a (channel, account) group is claimed while one of
-- its messages is in flight under a live claim, and a message waiting for its retry holds
-- back the later messages of its group; a dead message holds nothing back. A claim takes a
-- prefix, in id order, of its groups' due messages.
-- Concurrent claims (Postgres): `picked` reads this statement's snapshot, which may predate
-- a claim of the same group that committed since. So the claim locks each picked group's
-- outbox_groups row (SKIP LOCKED: a group being claimed right now is left alone) on the
-- condition that its version is the one the snapshot saw (`seen`). Every claim and every
-- redrive bumps the version of the groups it touches, and FOR UPDATE re-checks that
-- condition against the row's latest committed version, so a group whose state changed after
-- the snapshot drops out of `locked` and is left for the next claim. (Locking the group row
-- alone would not do: the outbox rows would still be read from the old snapshot.) Delivery
-- results do not touch the group row: the only result that can land on a row this claim
-- takes is the late result of an expired claim, and the update below re-reads such a row
-- (status check only), so it is taken or dropped by its current state and never skipped
-- while the rows behind it go.
WITH picked AS MATERIALIZED (
    SELECT o.id, o.channel, o.account FROM outbox o
    WHERE o.status IN ('pending', 'sending') AND o.run_after <= now()
      AND ($3::text[] IS NULL OR o.channel = ANY($3::text[]))
      AND NOT EXISTS (
          SELECT 1 FROM outbox p
          WHERE p.channel = o.channel AND p.account = o.account
            AND p.id < o.id AND p.status IN ('pending', 'sending') AND p.run_after > now()
      )
      AND NOT EXISTS (  -- any message of the group in flight (outbox_sending_group)
          SELECT 1 FROM outbox p
          WHERE p.channel = o.channel AND p.account = o.account
            AND p.status = 'sending' AND p.run_after > now()
      )
    ORDER BY o.id
    LIMIT $2
), seen AS MATERIALIZED (
    SELECT g.channel, g.account, g.version FROM outbox_groups g
    WHERE (g.channel, g.account) IN (SELECT channel, account FROM picked)
), adopted AS (
    -- A group without a row (its messages were written by an older version during a
    -- rolling upgrade) gets one now. This claim holds it: nobody can lock the row before
    -- this transaction commits, and a concurrent insert makes this one do nothing.
    INSERT INTO outbox_groups AS g (channel, account, version)
    SELECT DISTINCT p.channel, p.account, 1 FROM picked p
    WHERE NOT EXISTS (
        SELECT 1 FROM seen s WHERE s.channel = p.channel AND s.account = p.account
    )
    ORDER BY 1, 2
    ON CONFLICT DO NOTHING
    RETURNING g.channel, g.account
), locked AS MATERIALIZED (
    SELECT g.channel, g.account FROM outbox_groups g
    JOIN seen s ON s.channel = g.channel AND s.account = g.account AND s.version = g.version
    FOR UPDATE OF g SKIP LOCKED
), held AS MATERIALIZED (
    SELECT channel, account FROM locked
    UNION ALL
    SELECT channel, account FROM adopted
), bumped AS (
    UPDATE outbox_groups g SET version = g.version + 1
    FROM held h WHERE g.channel = h.channel AND g.account = h.account
), claimed AS (
    UPDATE outbox o SET
        status = CASE WHEN o.status = 'sending' AND o.attempts >= o.max_attempts
                      THEN 'dead' ELSE 'sending' END,
        last_error = CASE WHEN o.status = 'sending' AND o.attempts >= o.max_attempts
                          THEN 'lease expired on the last attempt' ELSE o.last_error END,
        attempts = CASE WHEN o.status = 'sending' AND o.attempts >= o.max_attempts
                        THEN o.attempts ELSE o.attempts + 1 END,
        worker_id = $1,
        lease_token = nextval('claim_tokens'),
        run_after = now() + make_interval(secs => $4),
        updated_at = now()
    FROM picked p JOIN held h ON h.channel = p.channel AND h.account = p.account
    WHERE o.id = p.id AND o.status IN ('pending', 'sending')
    RETURNING o.*
)
SELECT * FROM claimed WHERE status = 'sending' ORDER BY id;

-- name: redrive_outbox
-- A redriven message goes back to its place (its id) among its group's open messages: it
-- waits while a message of its group is in flight, then goes before the later ones still
-- pending. Bumping the group's version makes a claim whose snapshot predates this redrive
-- leave the group alone (see claim_outbox) instead of taking the messages behind it. The grouped
-- kind's own redrive: it takes the place of redrive_jobs for the outbox.
WITH moved AS (
    UPDATE outbox SET status = 'pending', attempts = 0, run_after = now(), updated_at = now()
    WHERE id = ANY($1::bigint[]) AND status = 'dead'
    RETURNING id, channel, account
), bumped AS (
    UPDATE outbox_groups g SET version = g.version + 1
    FROM (SELECT DISTINCT channel, account FROM moved) m
    WHERE g.channel = m.channel AND g.account = m.account
)
SELECT id FROM moved;

-- ---------------------------------------------------------------- coordinated task queues
-- Ordering groups and fleet-wide limits (migration 0010, storage/_queue_limits.py). A queue
-- with a task_queues row is claimed by claim_limited_tasks, never by claim_tasks (which,
-- with no limits and no groups, stays the one-statement claim above, unchanged).

-- name: enqueue_grouped_tasks
-- enqueue_tasks for a batch with at least one grouped task: $8 the group keys (NULL:
-- ungrouped). The queues of the grouped rows get their task_queues row here (ON CONFLICT
-- DO NOTHING: an existing row, locked by a claim or not, is left alone), so their claims
-- are coordinated from the first grouped task on.
WITH coordinated AS (
    INSERT INTO task_queues (queue)
    SELECT DISTINCT g.queue FROM unnest($1::text[], $8::text[]) AS g(queue, grp)
    WHERE g.grp IS NOT NULL
    ORDER BY 1
    ON CONFLICT DO NOTHING
), ins AS (
    INSERT INTO agent_tasks (queue, payload, priority, run_after, idempotency_key, max_attempts,
                             group_key)
    SELECT x.queue, x.payload, x.priority, coalesce(x.run_after, now()), x.idempotency_key,
           x.max_attempts, x.grp
    FROM unnest($1::text[], $2::json[], $3::int[], $4::timestamptz[], $5::text[], $6::int[],
                $8::text[])
         WITH ORDINALITY AS x(queue, payload, priority, run_after, idempotency_key, max_attempts,
                              grp, ord)
    ORDER BY x.ord
    ON CONFLICT (queue, idempotency_key)
        WHERE idempotency_key IS NOT NULL AND status IN ('queued', 'running')
        DO UPDATE SET idempotency_key = EXCLUDED.idempotency_key
    RETURNING *
), woken AS (
    SELECT pg_notify($7, extract(epoch FROM min(run_after))::text) AS sent
    FROM ins WHERE $7::text IS NOT NULL AND status = 'queued'
    HAVING count(*) > 0
)
SELECT ins.*, (SELECT count(*) FROM woken) AS notified FROM ins;

-- name: set_queue_limits
-- $1 queue, $2 max_running, $3 max_per_second, $4 max_per_group (NULL: no cap). Waits for
-- a claim holding the row; the next claim reads the new limits.
INSERT INTO task_queues AS q (queue, max_running, max_per_second, max_per_group)
VALUES ($1, $2, $3, $4)
ON CONFLICT (queue) DO UPDATE SET
    max_running = EXCLUDED.max_running, max_per_second = EXCLUDED.max_per_second,
    max_per_group = EXCLUDED.max_per_group, updated_at = now()
RETURNING q.queue, q.max_running, q.max_per_second, q.max_per_group;

-- name: get_queue_limits
SELECT queue, max_running, max_per_second, max_per_group FROM task_queues WHERE queue = $1;

-- name: _lock_task_queue
-- The coordinated claim's first statement: the queue's row, locked until the claim
-- commits. Concurrent claims of the queue wait here (not SKIP LOCKED: a skipped claimer
-- would have to poll), so the next statement's snapshot sees every claim committed before.
SELECT max_running, max_per_second, max_per_group FROM task_queues WHERE queue = $1
FOR UPDATE;

-- name: claim_limited_tasks
-- The coordinated claim's second statement, under the row lock of _lock_task_queue, in the
-- same transaction: $1 worker, $2 limit, $3 queue, $4 lease seconds, $5 max_running or
-- NULL, $6 the starts allowed per rate window or NULL, $7 the window in seconds,
-- $8 max_per_group.
-- Budget: $2, less the tasks running under a live lease beyond $5, less the starts logged
-- inside the window beyond $6 (a task whose lease expired holds no slot: a killed worker's
-- slot comes back when its lease runs out).
-- Group rule (the outbox's, with N = $8 in flight): a grouped task is claimable when no
-- earlier task of its group waits for its retry, and fewer than N of its group are in
-- flight or open ahead of it; a dead task holds nothing back. Candidates are taken by
-- priority, then run_after, then id, as claim_tasks takes them; a grouped candidate goes
-- only with every open task ahead of it in its group that is not in flight (a cut by the
-- budget never lets a later task of a group start before an earlier one).
-- Returns one row per claimed task, or one row of NULL task columns when none: every row
-- carries refused (due tasks left unclaimed below $2: a limit or a group held them), the
-- window's log, the earliest lease expiry and, when refused, the next due time of a task
-- waiting for its retry (it may hold its group back) (Unix seconds), from which the
-- worker computes when to try again; a refusal also marks the row waiting (wake_task_queue).
-- A claimed task's updated_at is its start time, the time logged for the rate.
WITH clock AS (
    -- The time under the lock (not the transaction's start): claims of the queue read it
    -- in the order they hold the lock, so the start log is in time order.
    SELECT c AS at, extract(epoch FROM c)::float8 AS epoch FROM clock_timestamp() AS c
), recent AS (
    -- The window's claims, one entry per claim (its time and how many it started).
    SELECT coalesce(array_agg(s.t ORDER BY s.t), '{}'::float8[]) AS times,
           coalesce(array_agg(s.n ORDER BY s.t), '{}'::int[]) AS counts,
           coalesce(sum(s.n), 0)::int AS total
    FROM task_queues q, unnest(q.start_times, q.start_counts) AS s(t, n)
    WHERE q.queue = $3 AND s.t > (SELECT epoch FROM clock) - $7
), running AS (
    SELECT count(*)::int AS n, extract(epoch FROM min(run_after))::float8 AS first_expiry
    FROM agent_tasks
    WHERE queue = $3 AND status = 'running' AND run_after > (SELECT at FROM clock)
), budget AS (
    SELECT greatest(0, least($2::int,
               coalesce($5::int - running.n, $2::int),
               coalesce($6::int - recent.total, $2::int)))::int AS n
    FROM running, recent
), picked AS MATERIALIZED (
    SELECT t.id, t.group_key FROM agent_tasks t
    WHERE t.queue = $3 AND t.status IN ('queued', 'running') AND t.run_after <= (SELECT at FROM clock)
      AND (t.group_key IS NULL OR (
          NOT EXISTS (
              SELECT 1 FROM agent_tasks p
              WHERE p.queue = t.queue AND p.group_key = t.group_key AND p.id < t.id
                AND p.status = 'queued' AND p.run_after > (SELECT at FROM clock)
          )
          AND (SELECT count(*) FROM (
              SELECT 1 FROM agent_tasks p
              WHERE p.queue = t.queue AND p.group_key = t.group_key AND p.id <> t.id
                AND p.status IN ('queued', 'running')
                AND (p.id < t.id OR (p.status = 'running' AND p.run_after > (SELECT at FROM clock)))
              LIMIT $8
          ) AS ahead) < $8
      ))
    ORDER BY t.priority DESC, t.run_after, t.id
    LIMIT (SELECT n FROM budget)
), taken AS MATERIALIZED (
    -- The cut by the budget may leave a group's earlier candidate out (a retried task
    -- sorts by its later run_after): each group present takes its first k open tasks not
    -- in flight, in id order, where k is how many of it were picked. Those are all
    -- candidates (a candidate has every such task ahead of it due and under the cap).
    SELECT k.id FROM picked k WHERE k.group_key IS NULL
    UNION ALL
    SELECT first.id
    FROM (SELECT group_key, count(*) AS k FROM picked WHERE group_key IS NOT NULL
          GROUP BY group_key) g
    CROSS JOIN LATERAL (
        SELECT p.id FROM agent_tasks p
        WHERE p.queue = $3 AND p.group_key = g.group_key AND p.status IN ('queued', 'running')
          AND NOT (p.status = 'running' AND p.run_after > (SELECT at FROM clock))
        ORDER BY p.id
        LIMIT g.k
    ) AS first
), claimed AS (
    UPDATE agent_tasks t SET
        -- include: _part_claim_attempt
        worker_id = $1,
        lease_token = nextval('claim_tokens'),
        run_after = (SELECT at FROM clock) + make_interval(secs => $4),
        updated_at = (SELECT at FROM clock)
    FROM taken WHERE t.id = taken.id
    RETURNING t.*
), started AS (
    SELECT count(*)::int AS n FROM claimed WHERE status = 'running'
), refused AS (
    SELECT (SELECT n FROM started) < $2 AND EXISTS (
        SELECT 1 FROM agent_tasks t
        WHERE t.queue = $3 AND t.status IN ('queued', 'running') AND t.run_after <= (SELECT at FROM clock)
          AND t.id NOT IN (SELECT id FROM taken)
    ) AS yes
), logged AS (
    UPDATE task_queues q SET
        start_times = CASE WHEN $6::int IS NULL THEN '{}'::float8[]
            WHEN (SELECT n FROM started) = 0 THEN (SELECT times FROM recent)
            ELSE (SELECT times FROM recent) || (SELECT epoch FROM clock) END,
        start_counts = CASE WHEN $6::int IS NULL THEN '{}'::int[]
            WHEN (SELECT n FROM started) = 0 THEN (SELECT counts FROM recent)
            ELSE (SELECT counts FROM recent) || (SELECT n FROM started) END,
        waiting = q.waiting OR (SELECT yes FROM refused),
        updated_at = (SELECT at FROM clock)
    WHERE q.queue = $3
    RETURNING q.start_times, q.start_counts
), summary AS (
    SELECT (SELECT yes FROM refused) AS refused,
           (SELECT epoch FROM clock) AS clock_s,
           (SELECT start_times FROM logged) AS window_times,
           (SELECT start_counts FROM logged) AS window_counts,
           (SELECT first_expiry FROM running) AS first_expiry_s,
           CASE WHEN (SELECT yes FROM refused) THEN (
               SELECT extract(epoch FROM min(run_after))::float8 FROM agent_tasks
               WHERE queue = $3 AND status = 'queued' AND run_after > (SELECT at FROM clock)
           ) END AS next_due_s
)
SELECT s.refused, s.clock_s, s.window_times, s.window_counts, s.first_expiry_s, s.next_due_s,
       c.*
FROM summary s LEFT JOIN (SELECT * FROM claimed WHERE status = 'running') c ON true
ORDER BY c.priority DESC, c.id;

-- name: wake_task_queue
-- $1 queue, $2 channel. Run after tasks of a coordinated queue finished (their outcome
-- committed): if a claim was refused since the last wake, clear the mark and notify the
-- channel ('0': due now), in this statement. The update names the row by its key only, so
-- it always waits for a claim holding the row's lock and then reads the row as that claim
-- left it (a predicate on the mark would be judged on this statement's snapshot, and
-- miss a mark that a claim set and committed meanwhile: a lost wakeup). A claim that
-- started after the finish committed sees the freed slot itself. woke keeps the mark as
-- this update found it; the notification is sent only then (no refusal: no notifying
-- commit).
UPDATE task_queues SET woke = waiting, waiting = false WHERE queue = $1
RETURNING woke, CASE WHEN woke THEN pg_notify($2, '0') END AS notified;
-- name: cancel_task
-- $1 the task id, $2 the reason (kept in last_error), $3 a channel or NULL. The row is
-- locked first (a concurrent claim or outcome write commits before, or waits until after,
-- this statement); its status under the lock decides: queued or running rows end
-- cancelled, any other status is reported as it is. A running row's cancel notifies $3
-- with ["<id>", "<worker id>"] in this same statement (sent on commit, never without the
-- write), so its worker cancels the handler; its later outcome write finds the row no
-- longer running and changes nothing. coordinated: the task's queue has a task_queues row;
-- the driver then runs wake_task_queue after this commits, as a finish does (a cancelled
-- task frees its slot and its group). Not in this statement: it would lock the task's row
-- before the queue's, the reverse of a coordinated claim's order (a deadlock).
WITH old AS (
    SELECT id, status, worker_id, queue FROM agent_tasks WHERE id = $1 FOR UPDATE
), cancelled AS (
    UPDATE agent_tasks t SET status = 'cancelled', last_error = $2, updated_at = now()
    FROM old WHERE t.id = old.id AND old.status IN ('queued', 'running')
    RETURNING t.id
)
SELECT old.status, old.worker_id, old.queue, (SELECT count(*) FROM cancelled) AS changed,
       EXISTS (SELECT 1 FROM task_queues q WHERE q.queue = old.queue) AS coordinated,
       CASE WHEN old.status = 'running' AND $3::text IS NOT NULL
            THEN pg_notify($3, to_json(ARRAY[old.id::text, old.worker_id])::text)
       END AS notified
FROM old;

-- name: purge_tasks
-- The tasks' own purge: succeeded and cancelled tasks (both finished for good); dead ones
-- are kept for a redrive.
DELETE FROM agent_tasks
WHERE status IN ('succeeded', 'cancelled') AND updated_at < now() - make_interval(secs => $1);

-- name: request_cancel
-- $3 a channel or NULL, $4 the reason characters the notification carries. The first
-- request's reason is kept (the no-op update only returns the row). The notification is
-- built from the kept row, in this same statement, so it is sent on commit together with
-- the write (one round trip); to_json of a text array writes what orjson writes.
WITH c AS (
    INSERT INTO cancel_requests AS c (session_id, reason) VALUES ($1, $2)
    ON CONFLICT (session_id) DO UPDATE SET session_id = c.session_id
    RETURNING session_id, reason, requested_at
)
SELECT session_id, reason, requested_at,
       CASE WHEN $3::text IS NOT NULL
            THEN pg_notify($3, to_json(ARRAY[session_id, left(reason, $4::int)])::text)
       END AS notified
FROM c;

-- name: get_cancel
SELECT session_id, reason, requested_at FROM cancel_requests WHERE session_id = $1;

-- name: clear_cancel
DELETE FROM cancel_requests WHERE session_id = $1;

-- name: notify
-- A notifying commit: serialized with every other one on the server (see the header).
SELECT pg_notify($1, $2);

-- name: acquire_leadership
-- $1 role name. A session-level advisory lock, run on a dedicated connection: it is held
-- until released or until that connection ends. The two-key form keeps these locks apart
-- from the one-key migration lock; 1634957678 spells "asyn".
SELECT pg_try_advisory_lock(1634957678, hashtext($1));

-- name: release_leadership
SELECT pg_advisory_unlock(1634957678, hashtext($1));

-- name: journal_webhook_events
INSERT INTO webhook_journal (endpoint, owner, body)
SELECT $1, $2, x.body FROM unnest($3::text[]) WITH ORDINALITY AS x(body, ord)
ORDER BY x.ord
RETURNING id;

-- name: delete_webhook_events
DELETE FROM webhook_journal WHERE id = ANY($1::bigint[]);

-- name: claim_webhook_orphans
-- Events their owner did not batch within the age limit (it crashed, or lost its storage):
-- taken over by this owner, oldest first, skipping rows another claimer holds.
UPDATE webhook_journal j SET owner = $2, claimed_at = now()
WHERE j.id IN (
    SELECT id FROM webhook_journal
    WHERE endpoint = ANY($1::text[]) AND claimed_at < now() - make_interval(secs => $3)
    ORDER BY id LIMIT $4
    FOR UPDATE SKIP LOCKED
)
RETURNING j.id, j.endpoint, j.body;

-- name: record_webhook_attempts
INSERT INTO webhook_attempts (endpoint, webhook_id, outbox_id, attempted_at, status, error, ok)
SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::timestamptz[], $5::int[],
                     $6::text[], $7::boolean[]);

-- name: list_webhook_attempts
-- Newest first. $2: only webhook-ids that no attempt delivered; $3: one webhook-id.
SELECT a.* FROM webhook_attempts a
WHERE ($1::text IS NULL OR a.endpoint = $1)
  AND ($3::text IS NULL OR a.webhook_id = $3)
  AND (NOT $2 OR NOT EXISTS (
        SELECT 1 FROM webhook_attempts s WHERE s.webhook_id = a.webhook_id AND s.ok))
ORDER BY a.id DESC
LIMIT $4;

-- name: purge_webhook_attempts
DELETE FROM webhook_attempts WHERE attempted_at < now() - make_interval(secs => $1);

-- ---------------------------------------------------------------- login attempts (auth)
-- Every statement reads and writes the row in one UPDATE or upsert, so two logins that
-- race see each other's reservation (the row lock serializes them); times are the
-- database's clock, shared by the fleet.

-- name: reserve_login_attempt
-- $1 scope, $2 key, $3 limit, $4 window_s. Reserves one attempt (in_flight + 1) unless the
-- key is locked or failures + in_flight already reach the limit; `granted` says which.
-- A window that ended starts over, its leftover in_flight (crashed holders) included.
INSERT INTO login_attempts AS a (scope, key, window_start, in_flight, granted, updated_at)
VALUES ($1, $2, extract(epoch FROM statement_timestamp()), 1, true,
        extract(epoch FROM statement_timestamp()))
ON CONFLICT (scope, key) DO UPDATE SET
    window_start = CASE WHEN a.window_start + $4 <= EXCLUDED.updated_at
                        THEN EXCLUDED.updated_at ELSE a.window_start END,
    failures = CASE WHEN a.window_start + $4 <= EXCLUDED.updated_at THEN 0 ELSE a.failures END,
    in_flight = CASE WHEN a.window_start + $4 <= EXCLUDED.updated_at THEN 0 ELSE a.in_flight END
        + CASE WHEN a.locked_until <= EXCLUDED.updated_at
                AND CASE WHEN a.window_start + $4 <= EXCLUDED.updated_at THEN 0
                         ELSE a.failures + a.in_flight END < $3
               THEN 1 ELSE 0 END,
    granted = a.locked_until <= EXCLUDED.updated_at
        AND CASE WHEN a.window_start + $4 <= EXCLUDED.updated_at THEN 0
                 ELSE a.failures + a.in_flight END < $3,
    updated_at = EXCLUDED.updated_at
RETURNING granted, window_start, locked_until, updated_at AS now;

-- name: release_login_attempt
-- $1 scope, $2 key, $3 the reservation's window_start: give the attempt back uncounted
-- (only if its window is still current: a new window already dropped it).
UPDATE login_attempts
SET in_flight = GREATEST(in_flight - 1, 0), updated_at = extract(epoch FROM statement_timestamp())
WHERE scope = $1 AND key = $2 AND window_start = $3;

-- name: succeed_login_attempt
-- $1 scope, $2 key, $3 window_start: release the attempt and forget the key's failures,
-- lockout and lockout growth (the other attempts in flight stay counted).
UPDATE login_attempts
SET in_flight = CASE WHEN window_start = $3 THEN GREATEST(in_flight - 1, 0) ELSE in_flight END,
    failures = 0, locked_until = 0, next_lockout_s = 0, last_failure = 0,
    updated_at = extract(epoch FROM statement_timestamp())
WHERE scope = $1 AND key = $2;

-- name: fail_login_attempt
-- $1 scope, $2 key, $3 window_start, $4 limit, $5 window_s, $6 lockout_base_s,
-- $7 lockout_factor, $8 lockout_max_s, $9 forget_after_s. The attempt turns from in flight
-- into a failure; the limit-th failure locks the key for next_lockout_s (the base after
-- forget_after_s without a failure), and the next lockout grows by the factor.
WITH t AS (SELECT extract(epoch FROM statement_timestamp())::double precision AS n)
UPDATE login_attempts a SET
    window_start = CASE WHEN a.window_start + $5 <= t.n THEN t.n ELSE a.window_start END,
    in_flight = CASE WHEN a.window_start + $5 <= t.n THEN 0
                     WHEN a.window_start = $3 THEN GREATEST(a.in_flight - 1, 0)
                     ELSE a.in_flight END,
    failures = CASE
        WHEN a.locked_until > t.n
            THEN CASE WHEN a.window_start + $5 <= t.n THEN 0 ELSE a.failures END
        WHEN CASE WHEN a.window_start + $5 <= t.n THEN 0 ELSE a.failures END + 1 >= $4 THEN 0
        ELSE CASE WHEN a.window_start + $5 <= t.n THEN 0 ELSE a.failures END + 1 END,
    locked_until = CASE
        WHEN a.locked_until <= t.n
         AND CASE WHEN a.window_start + $5 <= t.n THEN 0 ELSE a.failures END + 1 >= $4
        THEN t.n + LEAST($8, CASE WHEN a.next_lockout_s <= 0 OR t.n - a.last_failure > $9
                                  THEN $6 ELSE a.next_lockout_s END)
        ELSE a.locked_until END,
    locked_at = CASE
        WHEN a.locked_until <= t.n
         AND CASE WHEN a.window_start + $5 <= t.n THEN 0 ELSE a.failures END + 1 >= $4
        THEN t.n ELSE a.locked_at END,
    next_lockout_s = CASE
        WHEN a.locked_until <= t.n
         AND CASE WHEN a.window_start + $5 <= t.n THEN 0 ELSE a.failures END + 1 >= $4
        THEN LEAST($8, $7 * CASE WHEN a.next_lockout_s <= 0 OR t.n - a.last_failure > $9
                                 THEN $6 ELSE a.next_lockout_s END)
        WHEN t.n - a.last_failure > $9 THEN 0
        ELSE a.next_lockout_s END,
    last_failure = t.n,
    updated_at = t.n
FROM t
WHERE a.scope = $1 AND a.key = $2
RETURNING a.locked_at = t.n AS tripped;

-- name: purge_login_attempts
-- Rows idle for $1 seconds whose lockout is over (their growth is forgotten by then).
DELETE FROM login_attempts
WHERE updated_at < extract(epoch FROM statement_timestamp()) - $1
  AND locked_until <= extract(epoch FROM statement_timestamp());

-- ---------------------------------------------------------------- partitioned stream_events
-- The opt-in layout of migration 0009 (storage.stream_partitioning, storage/_partitions.py):
-- stream_events PARTITION BY RANGE (started_at), keyed (session_id, seq, started_at), where
-- started_at is the session's anchor (stream_anchors). A driver on that layout runs the
-- _p_* variants below in place of the plain queries of the same name without the prefix.

-- name: _p_append_stream_events
-- append_stream_events on the partitioned layout: the same fence, then each accepted
-- session's anchor, read FOR SHARE (a partition drop deleting it waits for this append, or
-- this append sees it gone), or inserted by the session's first append (ON CONFLICT DO
-- UPDATE returns the anchor a concurrent first append committed: every writer of a session
-- uses one started_at, so the key (session_id, seq, started_at) is as unique as
-- (session_id, seq)). Events carry their session's started_at: one partition per session.
-- $6, $7: the notification sent with the insert, as in append_stream_events.
WITH e AS (
    SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::text[], $5::json[])
        AS e(session_id, seq, epoch, kind, payload)
), f AS (
    SELECT DISTINCT session_id, epoch FROM e
), held AS (
    SELECT l.session_id, l.token FROM session_leases l
    WHERE l.session_id IN (SELECT session_id FROM f)
    ORDER BY l.session_id
    FOR SHARE
), ok AS (
    SELECT f.session_id, f.epoch FROM f LEFT JOIN held h ON h.session_id = f.session_id
    WHERE CASE WHEN h.session_id IS NOT NULL THEN f.epoch = h.token
               ELSE f.epoch >= coalesce((
                   SELECT s.epoch FROM stream_events s WHERE s.session_id = f.session_id
                   ORDER BY s.seq DESC LIMIT 1), 0)
          END
), known AS (
    SELECT a.session_id, a.started_at FROM stream_anchors a
    WHERE a.session_id IN (SELECT session_id FROM ok)
    ORDER BY a.session_id
    FOR SHARE
), fresh AS (
    INSERT INTO stream_anchors AS a (session_id, started_at)
    SELECT DISTINCT ok.session_id, now() FROM ok
    WHERE ok.session_id NOT IN (SELECT session_id FROM known)
    ORDER BY 1
    ON CONFLICT (session_id) DO UPDATE SET started_at = a.started_at
    RETURNING a.session_id, a.started_at
), anchor AS (
    SELECT session_id, started_at FROM known UNION ALL SELECT session_id, started_at FROM fresh
), ins AS (
    INSERT INTO stream_events (session_id, seq, epoch, kind, payload, started_at)
    SELECT e.session_id, e.seq, e.epoch, e.kind, e.payload, anchor.started_at
    FROM e JOIN ok USING (session_id, epoch) JOIN anchor USING (session_id)
    ON CONFLICT (session_id, seq, started_at) DO UPDATE SET
        epoch = EXCLUDED.epoch, kind = EXCLUDED.kind, payload = EXCLUDED.payload,
        created_at = now()
    WHERE stream_events.epoch < EXCLUDED.epoch
    RETURNING 1
), refused AS (
    SELECT f.session_id, f.epoch FROM f
    WHERE NOT EXISTS (SELECT 1 FROM ok WHERE ok.session_id = f.session_id AND ok.epoch = f.epoch)
), sent AS (
    SELECT pg_notify($6, n.payload) FROM unnest($7::text[]) WITH ORDINALITY AS n(payload, i)
    WHERE NOT EXISTS (SELECT 1 FROM refused)
    ORDER BY n.i
)
SELECT (SELECT count(*) FROM ins) AS stored,
       (SELECT array_agg(session_id ORDER BY session_id, epoch) FROM refused) AS refused_ids,
       (SELECT array_agg(epoch ORDER BY session_id, epoch) FROM refused) AS refused_epochs,
       (SELECT count(*) FROM sent) AS notified;

-- name: _p_load_stream_events
-- The anchor's started_at prunes the scan to the session's one partition.
SELECT session_id, epoch, seq, kind, payload, created_at FROM stream_events
WHERE session_id = $1 AND seq > $2
  AND started_at = (SELECT a.started_at FROM stream_anchors a WHERE a.session_id = $1)
ORDER BY seq LIMIT $3;

-- name: _p_last_stream_seq
SELECT coalesce(max(seq), 0) FROM stream_events
WHERE session_id = $1
  AND started_at = (SELECT a.started_at FROM stream_anchors a WHERE a.session_id = $1);

-- name: _p_purge_stream_events_batch
-- purge_stream_events_batch on the partitioned layout: a ctid is only unique within one
-- partition, so rows are named by (tableoid, ctid) (the plain query's bare ctids would
-- also delete the rows at the same places of every other partition).
DELETE FROM stream_events
WHERE (tableoid, ctid) IN (
    SELECT tableoid, ctid FROM stream_events
    WHERE created_at < now() - make_interval(secs => $1)
    LIMIT $2
    FOR UPDATE SKIP LOCKED
);

-- name: _stream_layout
-- 'p' when stream_events is partitioned, 'r' when plain, NULL before the first migration.
SELECT c.relkind::text FROM pg_class c WHERE c.oid = to_regclass('stream_events');

-- name: _stream_partitions
-- The partitions of stream_events (none when it is plain), default one included.
SELECT c.relname::text AS name FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
WHERE i.inhparent = to_regclass('stream_events') ORDER BY c.relname;

-- name: _partition_stream_events
-- Converts the plain stream_events into the partitioned layout, keeping its rows (each
-- session anchored at its first stored event), in the caller's transaction, under the
-- migration lock. The copied rows land in the default partition; the maintenance leader's
-- next round moves them into ranged partitions.
LOCK TABLE stream_events IN ACCESS EXCLUSIVE MODE;
ALTER TABLE stream_events RENAME TO stream_events_plain;
ALTER INDEX stream_events_pkey RENAME TO stream_events_plain_pkey;
ALTER INDEX stream_events_created_brin RENAME TO stream_events_plain_created_brin;
CREATE TABLE stream_events (
    session_id  text NOT NULL,
    seq         bigint NOT NULL,
    epoch       bigint NOT NULL,
    kind        text NOT NULL,
    payload     json NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    started_at  timestamptz NOT NULL,
    PRIMARY KEY (session_id, seq, started_at)
) PARTITION BY RANGE (started_at);
CREATE INDEX stream_events_created_brin ON stream_events USING brin (created_at);
CREATE TABLE stream_events_default PARTITION OF stream_events DEFAULT;
DELETE FROM stream_anchors;
INSERT INTO stream_anchors (session_id, started_at)
    SELECT session_id, min(created_at) FROM stream_events_plain GROUP BY session_id;
INSERT INTO stream_events (session_id, seq, epoch, kind, payload, created_at, started_at)
    SELECT p.session_id, p.seq, p.epoch, p.kind, p.payload, p.created_at, a.started_at
    FROM stream_events_plain p JOIN stream_anchors a USING (session_id);
DROP TABLE stream_events_plain;

-- name: _default_partition_slots
-- $1 partition width in seconds: the ranges (as Unix seconds of an anchor in each) of the
-- rows waiting in the default partition for their ranged partition.
SELECT min(extract(epoch FROM started_at))::float8 AS at FROM stream_events_default
GROUP BY floor(extract(epoch FROM started_at) / $1);

-- name: _move_into_partition
-- {name}, {lower}, {upper}: fill a new, not yet attached partition with the default
-- partition's rows of its range (so attaching it finds none left there).
WITH moved AS (
    DELETE FROM stream_events_default
    WHERE started_at >= '{lower}'::timestamptz AND started_at < '{upper}'::timestamptz
    RETURNING session_id, seq, epoch, kind, payload, created_at, started_at
)
INSERT INTO {name} (session_id, seq, epoch, kind, payload, created_at, started_at)
SELECT session_id, seq, epoch, kind, payload, created_at, started_at FROM moved;

-- name: _delete_partition_anchors
-- The anchors of a partition's range, locked in session order (as appends lock them).
DELETE FROM stream_anchors WHERE session_id IN (
    SELECT session_id FROM stream_anchors
    WHERE started_at >= $1 AND started_at < $2
    ORDER BY session_id
    FOR UPDATE
);

-- name: _partition_is_live
-- {name}: whether the partition holds an event stored less than $1 seconds ago (BRIN).
SELECT EXISTS (
    SELECT 1 FROM {name} WHERE created_at >= clock_timestamp() - make_interval(secs => $1)
);

-- name: record_periodic_tick
-- $1 schedule, $2 tick time. Returns a row only when this call recorded the tick; a
-- concurrent transaction recording the same tick makes this one wait for its outcome.
INSERT INTO periodic_ticks (schedule, tick_at) VALUES ($1, $2)
ON CONFLICT (schedule, tick_at) DO NOTHING
RETURNING schedule;

-- name: set_periodic_tick_task
UPDATE periodic_ticks SET task_id = $3 WHERE schedule = $1 AND tick_at = $2;

-- name: last_periodic_ticks
-- Each named schedule's latest recorded tick (the primary key serves each max).
SELECT s.schedule, t.tick_at
FROM unnest($1::text[]) AS s(schedule)
CROSS JOIN LATERAL (
    SELECT max(tick_at) AS tick_at FROM periodic_ticks p WHERE p.schedule = s.schedule
) t
WHERE t.tick_at IS NOT NULL;

-- name: purge_periodic_ticks
-- Ticks recorded more than $1 seconds ago, except each schedule's latest.
DELETE FROM periodic_ticks p
WHERE p.recorded_at < now() - make_interval(secs => $1)
  AND EXISTS (SELECT 1 FROM periodic_ticks q
              WHERE q.schedule = p.schedule AND q.tick_at > p.tick_at);

-- ---------------------------------------------------------------- operator views and audit
-- Cold reads for the dashboard (orchestrator/dashboard.py) and its audit log (0013).

-- name: list_jobs
SELECT * FROM {jobs} WHERE status = $1 ORDER BY id DESC LIMIT $2;

-- name: list_queued_tasks
-- $1 queue names, $2 rows per queue: each queue's next queued tasks in claim order (what a
-- claim takes first), one bounded walk of agent_tasks_claimable per queue, queues in $1's order.
SELECT t.* FROM unnest($1::text[]) WITH ORDINALITY AS q(name, ord)
CROSS JOIN LATERAL (
    SELECT * FROM agent_tasks a
    WHERE a.queue = q.name AND a.status = 'queued'
    ORDER BY a.priority DESC, a.run_after, a.id
    LIMIT $2
) t
ORDER BY q.ord, t.priority DESC, t.run_after, t.id;

-- name: list_leases
SELECT session_id, holder, token, expires_at FROM session_leases
WHERE expires_at > now() ORDER BY session_id LIMIT $1;

-- name: record_audit
INSERT INTO operator_audit (actor, action, target, outcome, detail)
VALUES ($1, $2, $3, $4, $5)
RETURNING *;

-- name: list_audit
SELECT * FROM operator_audit ORDER BY id DESC LIMIT $1;

-- ---------------------------------------------------------------- instance presence
-- Each runtime instance's live subscribers per session, for the dashboard (0015). The
-- database's clock decides seen_at, expires_at and liveness, whatever the instances' clocks.

-- name: publish_presence
-- $1 instance id, $2 host, $3 pid, $4 ttl seconds, $5 counts (JSON).
INSERT INTO instance_presence AS p (instance_id, host, pid, seen_at, expires_at, counts)
VALUES ($1, $2, $3, now(), now() + make_interval(secs => $4), $5)
ON CONFLICT (instance_id) DO UPDATE
SET host = EXCLUDED.host, pid = EXCLUDED.pid, seen_at = EXCLUDED.seen_at,
    expires_at = EXCLUDED.expires_at, counts = EXCLUDED.counts
RETURNING *;

-- name: list_presence
SELECT * FROM instance_presence WHERE expires_at > now() ORDER BY instance_id LIMIT $1;

-- name: withdraw_presence
DELETE FROM instance_presence WHERE instance_id = $1;

-- name: purge_presence
DELETE FROM instance_presence WHERE expires_at <= now();
