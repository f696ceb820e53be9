-- asyncstore schema, version 13 (Postgres): the operator audit log. Every action taken
-- from the dashboard (a retry, a redrive, a resend), allowed or refused, is one row here:
-- who (actor), what (action), on what (target), how it ended (outcome), and any detail.
CREATE TABLE operator_audit (
    id          bigserial PRIMARY KEY,
    created_at  timestamptz NOT NULL DEFAULT now(),
    actor       text NOT NULL,
    action      text NOT NULL,
    target      text NOT NULL,
    outcome     text NOT NULL,
    detail      text NOT NULL DEFAULT ''
);

-- The dashboard lists dead-lettered tasks newest first. Partial: rows only enter it when
-- they die, so the queue's hot path (claim, complete) never writes this index.
CREATE INDEX agent_tasks_dead ON agent_tasks (id) WHERE status = 'dead';
