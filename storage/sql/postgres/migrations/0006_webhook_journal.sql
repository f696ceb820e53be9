-- asyncstore schema, version 6 (Postgres): the journal of durable webhook events. Each
-- fired event is committed here first (one row per event, group-committed), so fire() can
-- answer "queued" at once; the batcher then writes whole batches to the outbox and deletes
-- the events it batched. Rows whose owner did not batch them in time are claimed again.

CREATE TABLE webhook_journal (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    endpoint    text NOT NULL,
    owner       text NOT NULL,
    body        text NOT NULL,
    claimed_at  timestamptz NOT NULL DEFAULT now(),
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX webhook_journal_claimed ON webhook_journal (endpoint, claimed_at);

-- Every delivery attempt of a durable webhook (an outbox row of channel 'webhook'): the
-- delivery log behind `asyncstore webhooks log` and `resend`, purged with the outbox.
CREATE TABLE webhook_attempts (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    endpoint      text NOT NULL,
    webhook_id    text NOT NULL,
    outbox_id     bigint,
    attempted_at  timestamptz NOT NULL,
    status        integer,
    error         text NOT NULL DEFAULT '',
    ok            boolean NOT NULL
);

CREATE INDEX webhook_attempts_endpoint ON webhook_attempts (endpoint, id);
CREATE INDEX webhook_attempts_webhook_id ON webhook_attempts (webhook_id);
CREATE INDEX webhook_attempts_time ON webhook_attempts (attempted_at);
