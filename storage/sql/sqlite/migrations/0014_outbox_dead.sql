-- asyncstore schema, version 14 (SQLite): the dashboard's list of dead-lettered outbox
-- messages; same index and meaning as the Postgres version.
CREATE INDEX outbox_dead ON outbox (id) WHERE status = 'dead';
