-- asyncstore schema, version 12 (Postgres): the ticks of periodic schedules. One row per
-- (schedule, tick_at), written in the transaction that enqueues the tick's task, so a tick
-- is enqueued once however many runners try it (the primary key refuses the second).
-- task_id is the task the tick enqueued; the maintenance sweep deletes ticks past their
-- retention but keeps each schedule's latest, from which a restarted runner catches up.
CREATE TABLE periodic_ticks (
    schedule     text NOT NULL,
    tick_at      timestamptz NOT NULL,
    task_id      bigint,
    recorded_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (schedule, tick_at)
);
