-- asyncstore schema, version 9 (Postgres): the anchor table of the opt-in partitioned
-- stream_events layout (storage.stream_partitioning, issue 17). A partitioned table's unique
-- key must include its partition key, so the partitioned stream_events is keyed
-- (session_id, seq, started_at) and partitioned by started_at, the time the session's
-- first event was stored, the same on every event of a session: so (session_id, seq) stays
-- unique and every event of a session lives in one partition. The anchor row is where every
-- writer reads that time (inserted once per session by the first append, unique per
-- session: concurrent first appends agree on it). It is deleted with its partition. On the
-- plain layout (the default) the table stays empty and unused.
CREATE TABLE stream_anchors (
    session_id  text PRIMARY KEY,
    started_at  timestamptz NOT NULL
);
-- The partition drop deletes the anchors of its range.
CREATE INDEX stream_anchors_started ON stream_anchors (started_at);
