-- asyncstore schema, version 1 (Postgres).

CREATE TABLE chat_sessions (
    session_id  text PRIMARY KEY,
    last_seq    bigint NOT NULL DEFAULT 0,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE chat_messages (
    session_id  text NOT NULL,
    seq         bigint NOT NULL,
    role        text NOT NULL,
    content     jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (session_id, seq)
);

CREATE TABLE stream_events (
    session_id  text NOT NULL,
    seq         bigint NOT NULL,
    epoch       bigint NOT NULL,
    kind        text NOT NULL,
    payload     jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (session_id, seq)
);
-- BRIN: purge-by-age needs only a coarse range index, and it costs almost nothing to insert.
CREATE INDEX stream_events_created_brin ON stream_events USING brin (created_at);

CREATE SEQUENCE lease_tokens;
CREATE TABLE session_leases (
    session_id  text PRIMARY KEY,
    holder      text NOT NULL,
    token       bigint NOT NULL,
    expires_at  timestamptz NOT NULL
);

CREATE SEQUENCE claim_tokens;
CREATE TABLE agent_tasks (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    queue            text NOT NULL,
    payload          jsonb NOT NULL,
    priority         integer NOT NULL DEFAULT 0,
    status           text NOT NULL DEFAULT 'queued'
                     CHECK (status IN ('queued', 'running', 'succeeded', 'dead')),
    attempts         integer NOT NULL DEFAULT 0,
    max_attempts     integer NOT NULL,
    run_after        timestamptz NOT NULL DEFAULT now(),
    lease_token      bigint,
    worker_id        text,
    idempotency_key  text,
    last_error       text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);
-- While running, run_after is the lease expiry, so one index serves new work and recovery.
CREATE INDEX agent_tasks_claimable ON agent_tasks (queue, priority DESC, run_after, id)
    WHERE status IN ('queued', 'running');
CREATE UNIQUE INDEX agent_tasks_idempotency ON agent_tasks (queue, idempotency_key)
    WHERE idempotency_key IS NOT NULL AND status IN ('queued', 'running');
CREATE INDEX agent_tasks_succeeded ON agent_tasks (updated_at) WHERE status = 'succeeded';

CREATE TABLE outbox (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    channel       text NOT NULL,
    account       text NOT NULL,
    payload       jsonb NOT NULL,
    status        text NOT NULL DEFAULT 'pending'
                  CHECK (status IN ('pending', 'sending', 'sent', 'dead')),
    attempts      integer NOT NULL DEFAULT 0,
    max_attempts  integer NOT NULL,
    run_after     timestamptz NOT NULL DEFAULT now(),
    lease_token   bigint,
    worker_id     text,
    last_error    text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX outbox_open ON outbox (id) WHERE status IN ('pending', 'sending');
CREATE INDEX outbox_open_group ON outbox (channel, account, id)
    WHERE status IN ('pending', 'sending');

CREATE TABLE cancel_requests (
    session_id    text PRIMARY KEY,
    reason        text NOT NULL,
    requested_at  timestamptz NOT NULL DEFAULT now()
);
