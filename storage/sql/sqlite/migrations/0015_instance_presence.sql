-- asyncstore schema, version 15 (SQLite): instance presence; same columns and meaning as
-- the Postgres version (seen_at and expires_at are epoch seconds of the writer's clock,
-- counts the JSON text of session id to count).
CREATE TABLE instance_presence (
    instance_id  TEXT PRIMARY KEY,
    host         TEXT NOT NULL,
    pid          INTEGER NOT NULL,
    seen_at      REAL NOT NULL,
    expires_at   REAL NOT NULL,
    counts       TEXT NOT NULL
);
