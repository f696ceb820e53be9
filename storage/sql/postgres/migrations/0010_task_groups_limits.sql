-- asyncstore schema, version 10 (Postgres): ordering groups of agent tasks and fleet-wide
-- limits per task queue.
-- agent_tasks.group_key: a task's ordering group within its queue (NULL: ungrouped). The
-- coordinated claim (claim_limited_tasks) takes a group's tasks in id order, at most the
-- queue's max_per_group in flight per group.
-- task_queues: one row per coordinated queue (declared with set_queue_limits, or created by
-- the first enqueue of a grouped task). Every coordinated claim of the queue first locks
-- this row (FOR UPDATE), then reads the queue in a new statement, whose snapshot includes
-- every claim that committed before it got the lock: the count of running tasks, the
-- group state and the start log are never older than the last committed claim.
-- start_times / start_counts: the claims inside the rate window (Unix time, tasks started),
-- one entry per claim, the sliding log the start-rate limit is checked against. waiting: a claim was
-- refused by a limit with due tasks left; the next finish notifies the queue's channel.
ALTER TABLE agent_tasks ADD COLUMN group_key text;
CREATE TABLE task_queues (
    queue           text PRIMARY KEY,
    max_running     integer CHECK (max_running IS NULL OR max_running >= 1),
    max_per_second  double precision CHECK (max_per_second IS NULL OR max_per_second > 0),
    max_per_group   integer NOT NULL DEFAULT 1 CHECK (max_per_group >= 1),
    start_times     double precision[] NOT NULL DEFAULT '{}',
    start_counts    integer[] NOT NULL DEFAULT '{}',
    waiting         boolean NOT NULL DEFAULT false,
    woke            boolean NOT NULL DEFAULT false,  -- the last wake found a refusal
    updated_at      timestamptz NOT NULL DEFAULT now()
);
-- A group's open tasks in id order (the group rule); partial, so ungrouped rows are never
-- in it. No index of the running rows: it cost the unlimited claim about 8% (an index
-- insert per claimed row); the coordinated claim counts its queue's running rows through
-- agent_tasks_claimable instead (queue bound, run_after filtered in the index).
CREATE INDEX agent_tasks_group_open ON agent_tasks (queue, group_key, id)
    WHERE group_key IS NOT NULL AND status IN ('queued', 'running');
