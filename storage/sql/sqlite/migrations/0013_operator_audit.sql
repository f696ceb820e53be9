-- asyncstore schema, version 13 (SQLite): the operator audit log; same columns and meaning
-- as the Postgres version (created_at is epoch seconds of the writer's clock).
CREATE TABLE operator_audit (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at  REAL NOT NULL,
    actor       TEXT NOT NULL,
    action      TEXT NOT NULL,
    target      TEXT NOT NULL,
    outcome     TEXT NOT NULL,
    detail      TEXT NOT NULL DEFAULT ''
);

-- The dashboard lists dead-lettered tasks newest first. Partial: rows only enter it when
-- they die, so the queue's hot path (claim, complete) never writes this index.
CREATE INDEX agent_tasks_dead ON agent_tasks (id) WHERE status = 'dead';
