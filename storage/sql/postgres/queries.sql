-- Named queries of the Postgres driver. Values are always bind parameters.

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
FROM s, unnest($2::text[], $3::jsonb[]) WITH ORDINALITY AS m(role, content, ord)
RETURNING session_id, seq, role, content, created_at;

-- name: load_messages
SELECT session_id, seq, role, content, created_at FROM chat_messages
WHERE session_id = $1 AND seq > $2 ORDER BY seq LIMIT $3;

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
-- Returns the count written and the refused (session, epoch) pairs.
WITH e AS (
    SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::text[], $5::jsonb[])
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
)
SELECT (SELECT count(*) FROM ins) AS stored,
       (SELECT array_agg(session_id ORDER BY session_id, epoch) FROM refused) AS refused_ids,
       (SELECT array_agg(epoch ORDER BY session_id, epoch) FROM refused) AS refused_epochs;

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

-- name: enqueue_tasks
-- Rows with an idempotency key that matches an unfinished task return that task (the no-op
-- update makes RETURNING include it). Identity values follow the ORDER BY, so new rows'
-- ids are in input order.
INSERT INTO agent_tasks (queue, payload, priority, run_after, idempotency_key, max_attempts)
SELECT x.queue, x.payload, x.priority, coalesce(x.run_after, now()), x.idempotency_key,
       x.max_attempts
FROM unnest($1::text[], $2::jsonb[], $3::int[], $4::timestamptz[], $5::text[], $6::int[])
     WITH ORDINALITY AS x(queue, payload, priority, run_after, idempotency_key, max_attempts, ord)
ORDER BY x.ord
ON CONFLICT (queue, idempotency_key)
    WHERE idempotency_key IS NOT NULL AND status IN ('queued', 'running')
    DO UPDATE SET idempotency_key = EXCLUDED.idempotency_key
RETURNING *;

-- name: claim_tasks
-- A running task whose lease expired with no attempts left is dead-lettered, not re-run.
WITH picked AS (
    SELECT id FROM agent_tasks
    WHERE queue = $1 AND status IN ('queued', 'running') AND run_after <= now()
    ORDER BY priority DESC, run_after, id
    LIMIT $3
    FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE agent_tasks t SET
        status = CASE WHEN t.status = 'running' AND t.attempts >= t.max_attempts
                      THEN 'dead' ELSE 'running' END,
        last_error = CASE WHEN t.status = 'running' AND t.attempts >= t.max_attempts
                          THEN 'lease expired on the last attempt' ELSE t.last_error END,
        attempts = CASE WHEN t.status = 'running' AND t.attempts >= t.max_attempts
                        THEN t.attempts ELSE t.attempts + 1 END,
        worker_id = $2,
        lease_token = nextval('claim_tokens'),
        run_after = now() + make_interval(secs => $4),
        updated_at = now()
    FROM picked WHERE t.id = picked.id
    RETURNING t.*
)
SELECT * FROM claimed WHERE status = 'running' ORDER BY priority DESC, id;

-- name: heartbeat_tasks
UPDATE agent_tasks t SET run_after = now() + make_interval(secs => $3), updated_at = now()
FROM unnest($1::bigint[], $2::bigint[]) AS c(id, token)
WHERE t.id = c.id AND t.lease_token = c.token AND t.status = 'running'
RETURNING t.id;

-- name: complete_tasks
UPDATE agent_tasks t SET status = 'succeeded', updated_at = now()
FROM unnest($1::bigint[], $2::bigint[]) AS c(id, token)
WHERE t.id = c.id AND t.lease_token = c.token AND t.status = 'running'
RETURNING t.id;

-- name: fail_tasks
UPDATE agent_tasks t SET
    status = CASE WHEN t.attempts >= t.max_attempts THEN 'dead' ELSE 'queued' END,
    run_after = coalesce(f.retry_at, now()),
    last_error = f.error,
    updated_at = now()
FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::timestamptz[])
     AS f(id, token, error, retry_at)
WHERE t.id = f.id AND t.lease_token = f.token AND t.status = 'running'
RETURNING t.id, t.status;

-- name: release_tasks
UPDATE agent_tasks t SET status = 'queued', run_after = now(),
    attempts = greatest(t.attempts - 1, 0), updated_at = now()
FROM unnest($1::bigint[], $2::bigint[]) AS c(id, token)
WHERE t.id = c.id AND t.lease_token = c.token AND t.status = 'running'
RETURNING t.id;

-- name: dead_letter_tasks
-- A permanent failure or a cancelled task: dead now, whatever attempts are left.
UPDATE agent_tasks t SET status = 'dead', last_error = f.error, updated_at = now()
FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::timestamptz[])
     AS f(id, token, error, retry_at)
WHERE t.id = f.id AND t.lease_token = f.token AND t.status = 'running'
RETURNING t.id;

-- name: get_task
SELECT * FROM agent_tasks WHERE id = $1;

-- name: purge_tasks
DELETE FROM agent_tasks
WHERE status = 'succeeded' AND updated_at < now() - make_interval(secs => $1);

-- name: enqueue_outbox
INSERT INTO outbox (channel, account, payload, max_attempts)
SELECT x.channel, x.account, x.payload, x.max_attempts
FROM unnest($1::text[], $2::text[], $3::jsonb[], $4::int[])
     WITH ORDINALITY AS x(channel, account, payload, max_attempts, ord)
ORDER BY x.ord
RETURNING *;

-- name: claim_outbox
-- A message waits while an earlier one of its (channel, account) group is in flight under a
-- live claim or waiting for its retry, so each group is delivered in order. A claim also
-- takes a transaction advisory lock per group it picked: a concurrent claim, which cannot
-- see the first one's uncommitted rows yet, drops the rows of that group instead of taking
-- the rows behind a head that is being claimed (SKIP LOCKED alone would let it).
WITH picked AS (
    SELECT o.id, o.channel, o.account FROM outbox o
    WHERE o.status IN ('pending', 'sending') AND o.run_after <= now()
      AND ($3::text[] IS NULL OR o.channel = ANY($3::text[]))
      AND NOT EXISTS (
          SELECT 1 FROM outbox p
          WHERE p.channel = o.channel AND p.account = o.account AND p.id < o.id
            AND p.status IN ('pending', 'sending') AND p.run_after > now()
      )
    ORDER BY o.id
    LIMIT $2
    FOR UPDATE SKIP LOCKED
), grouped AS (
    SELECT id FROM picked
    WHERE pg_try_advisory_xact_lock(1869575778, hashtext(channel || chr(1) || account))
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
    FROM grouped WHERE o.id = grouped.id
    RETURNING o.*
)
SELECT * FROM claimed WHERE status = 'sending' ORDER BY id;

-- name: mark_outbox_sent
UPDATE outbox o SET status = 'sent', updated_at = now()
FROM unnest($1::bigint[], $2::bigint[]) AS c(id, token)
WHERE o.id = c.id AND o.lease_token = c.token AND o.status = 'sending'
RETURNING o.id;

-- name: fail_outbox
UPDATE outbox o SET
    status = CASE WHEN o.attempts >= o.max_attempts THEN 'dead' ELSE 'pending' END,
    run_after = coalesce(f.retry_at, now()),
    last_error = f.error,
    updated_at = now()
FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::timestamptz[])
     AS f(id, token, error, retry_at)
WHERE o.id = f.id AND o.lease_token = f.token AND o.status = 'sending'
RETURNING o.id, o.status;

-- name: redrive_outbox
UPDATE outbox SET status = 'pending', attempts = 0, run_after = now(), updated_at = now()
WHERE id = ANY($1::bigint[]) AND status = 'dead'
RETURNING id;

-- name: release_outbox
UPDATE outbox o SET status = 'pending', run_after = now(),
    attempts = greatest(o.attempts - 1, 0), updated_at = now()
FROM unnest($1::bigint[], $2::bigint[]) AS c(id, token)
WHERE o.id = c.id AND o.lease_token = c.token AND o.status = 'sending'
RETURNING o.id;

-- name: dead_letter_outbox
UPDATE outbox o SET status = 'dead', last_error = f.error, updated_at = now()
FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::timestamptz[])
     AS f(id, token, error, retry_at)
WHERE o.id = f.id AND o.lease_token = f.token AND o.status = 'sending'
RETURNING o.id;

-- name: get_outbox
SELECT * FROM outbox WHERE id = $1;

-- name: purge_outbox
DELETE FROM outbox WHERE status = 'sent' AND updated_at < now() - make_interval(secs => $1);

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
