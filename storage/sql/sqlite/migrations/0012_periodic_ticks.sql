-- asyncstore schema, version 12 (SQLite): the ticks of periodic schedules, as on Postgres.
-- tick_at is the tick as whole microseconds since the Unix epoch (exact, so two runners
-- computing the same tick write the same key); recorded_at is epoch seconds.
CREATE TABLE periodic_ticks (
    schedule     TEXT NOT NULL,
    tick_at      INTEGER NOT NULL,
    task_id      INTEGER,
    recorded_at  REAL NOT NULL,
    PRIMARY KEY (schedule, tick_at)
);
