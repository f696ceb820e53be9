-- asyncstore schema, version 6 (SQLite): the journal of durable webhook events. Each
-- fired event is committed here first (one row per event, group-committed), so fire() can
-- answer "queued" at once; the batcher then writes whole batches to the outbox and deletes
-- the events it batched. Rows whose owner did not batch them in time are claimed again.

CREATE TABLE webhook_journal (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    endpoint    TEXT NOT NULL,
    owner       TEXT NOT NULL,
    body        TEXT NOT NULL,
    claimed_at  REAL NOT NULL,
    created_at  REAL NOT NULL
);

CREATE INDEX webhook_journal_claimed ON webhook_journal (endpoint, claimed_at);
