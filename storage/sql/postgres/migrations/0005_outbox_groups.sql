-- asyncstore schema, version 5 (Postgres): one row per outbox (channel, account) group.
-- Every claim locks the rows of the groups it takes messages from (FOR UPDATE SKIP LOCKED)
-- and bumps their version. A claim compares the version its snapshot saw with the one it
-- locked: when another claim (or a redrive) of that group committed after this statement's
-- snapshot, the versions differ and the group is left for the next claim, so a claim never
-- decides on a group state older than the last committed claim. Rows are created by
-- enqueue_outbox (ON CONFLICT DO NOTHING), or by the first claim of a group whose messages
-- an older version wrote, and never deleted: one small row per group.
CREATE TABLE outbox_groups (
    channel  text NOT NULL,
    account  text NOT NULL,
    version  bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (channel, account)
);
INSERT INTO outbox_groups (channel, account)
SELECT DISTINCT channel, account FROM outbox
ON CONFLICT DO NOTHING;
-- A claim leaves a group alone while any of its messages is in flight, whatever its id (a
-- redriven message behind in-flight ones, or one a concurrent producer committed late): this
-- index of the in-flight rows answers that per group without walking its pending backlog.
CREATE INDEX outbox_sending_group ON outbox (channel, account) WHERE status = 'sending';
