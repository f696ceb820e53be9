-- asyncstore schema, version 11 (Postgres): `cancelled`, a terminal status of agent tasks
-- (cancel_task). A cancelled task is never claimed again (the claim takes queued and
-- running rows only), its idempotency key is free again (the unique index covers queued
-- and running rows only), and it is purged with the succeeded ones. The constraint is
-- replaced by name; NOT VALID then VALIDATE keeps the scan of existing rows out of the
-- strongest lock's way (every existing row already satisfies the wider rule).
ALTER TABLE agent_tasks DROP CONSTRAINT agent_tasks_status_check;
ALTER TABLE agent_tasks ADD CONSTRAINT agent_tasks_status_check
    CHECK (status IN ('queued', 'running', 'succeeded', 'dead', 'cancelled')) NOT VALID;
ALTER TABLE agent_tasks VALIDATE CONSTRAINT agent_tasks_status_check;
CREATE INDEX agent_tasks_cancelled ON agent_tasks (updated_at) WHERE status = 'cancelled';
