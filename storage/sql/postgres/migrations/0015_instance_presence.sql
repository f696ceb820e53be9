-- asyncstore schema, version 15 (Postgres): instance presence. Each runtime instance
-- upserts one row every runtime.presence_interval_s with its live stream subscribers per
-- session (counts: a JSON object of session id to count), so an operator dashboard in any
-- process can sum them over the fleet. A row counts until expires_at (the database's
-- clock): a killed instance drops out on its own; a clean close deletes its row, and the
-- maintenance leader deletes expired ones.
CREATE TABLE instance_presence (
    instance_id  text PRIMARY KEY,
    host         text NOT NULL,
    pid          integer NOT NULL,
    seen_at      timestamptz NOT NULL,
    expires_at   timestamptz NOT NULL,
    counts       json NOT NULL
);
