-- asyncstore schema, version 1 (SQLite). Times are unix seconds (REAL); JSON is TEXT.

CREATE TABLE counters (
    name   TEXT PRIMARY KEY,
    value  INTEGER NOT NULL
);
INSERT INTO counters (name, value) VALUES ('lease_tokens', 0), ('claim_tokens', 0);

CREATE TABLE chat_sessions (
    session_id  TEXT PRIMARY KEY,
    last_seq    INTEGER NOT NULL DEFAULT 0,
    created_at  REAL NOT NULL,
    updated_at  REAL NOT NULL
);

CREATE TABLE chat_messages (
    session_id  TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    role        TEXT NOT NULL,
    content     TEXT NOT NULL,
    created_at  REAL NOT NULL,
    PRIMARY KEY (session_id, seq)
) WITHOUT ROWID;

CREATE TABLE stream_events (
    session_id  TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    epoch       INTEGER NOT NULL,
    kind        TEXT NOT NULL,
    payload     TEXT NOT NULL,
    created_at  REAL NOT NULL,
    PRIMARY KEY (session_id, seq)
);
CREATE INDEX stream_events_created ON stream_events (created_at);

CREATE TABLE session_leases (
    session_id  TEXT PRIMARY KEY,
    holder      TEXT NOT NULL,
    token       INTEGER NOT NULL,
    expires_at  REAL NOT NULL
);

CREATE TABLE agent_tasks (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    queue            TEXT NOT NULL,
    payload          TEXT NOT NULL,
    priority         INTEGER NOT NULL DEFAULT 0,
    status           TEXT NOT NULL DEFAULT 'queued'
                     CHECK (status IN ('queued', 'running', 'succeeded', 'dead')),
    attempts         INTEGER NOT NULL DEFAULT 0,
    max_attempts     INTEGER NOT NULL,
    run_after        REAL NOT NULL,
    lease_token      INTEGER,
    worker_id        TEXT,
    idempotency_key  TEXT,
    last_error       TEXT,
    created_at       REAL NOT NULL,
    updated_at       REAL NOT NULL
);
CREATE INDEX agent_tasks_claimable ON agent_tasks (queue, priority DESC, run_after, id)
    WHERE status IN ('queued', 'running');
CREATE UNIQUE INDEX agent_tasks_idempotency ON agent_tasks (queue, idempotency_key)
    WHERE idempotency_key IS NOT NULL AND status IN ('queued', 'running');
CREATE INDEX agent_tasks_succeeded ON agent_tasks (updated_at) WHERE status = 'succeeded';

CREATE TABLE outbox (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    channel       TEXT NOT NULL,
    account       TEXT NOT NULL,
    payload       TEXT NOT NULL,
    status        TEXT NOT NULL DEFAULT 'pending'
                  CHECK (status IN ('pending', 'sending', 'sent', 'dead')),
    attempts      INTEGER NOT NULL DEFAULT 0,
    max_attempts  INTEGER NOT NULL,
    run_after     REAL NOT NULL,
    lease_token   INTEGER,
    worker_id     TEXT,
    last_error    TEXT,
    created_at    REAL NOT NULL,
    updated_at    REAL NOT NULL
);
CREATE INDEX outbox_open ON outbox (id) WHERE status IN ('pending', 'sending');
CREATE INDEX outbox_open_group ON outbox (channel, account, id)
    WHERE status IN ('pending', 'sending');

CREATE TABLE cancel_requests (
    session_id    TEXT PRIMARY KEY,
    reason        TEXT NOT NULL,
    requested_at  REAL NOT NULL
);
