-- asyncstore schema, version 10 (SQLite): ordering groups of agent tasks and fleet-wide
-- limits per task queue, the same semantics as Postgres version 10. SQLite has one writer:
-- a coordinated claim's BEGIN IMMEDIATE transaction already sees every committed claim, so
-- the row is read, not locked. recent_starts is a JSON array of [Unix time,
-- tasks started] pairs, one per claim inside the rate window.
ALTER TABLE agent_tasks ADD COLUMN group_key TEXT;
CREATE TABLE task_queues (
    queue           TEXT PRIMARY KEY,
    max_running     INTEGER CHECK (max_running IS NULL OR max_running >= 1),
    max_per_second  REAL CHECK (max_per_second IS NULL OR max_per_second > 0),
    max_per_group   INTEGER NOT NULL DEFAULT 1 CHECK (max_per_group >= 1),
    recent_starts   TEXT NOT NULL DEFAULT '[]',
    waiting         INTEGER NOT NULL DEFAULT 0,
    updated_at      REAL NOT NULL
);
CREATE INDEX agent_tasks_group_open ON agent_tasks (queue, group_key, id)
    WHERE group_key IS NOT NULL AND status IN ('queued', 'running');
