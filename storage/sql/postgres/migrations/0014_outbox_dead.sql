-- asyncstore schema, version 14 (Postgres): the dashboard lists dead-lettered outbox
-- messages newest first (with a redrive button). Partial: rows only enter it when they
-- die, so the outbox's hot path (claim, mark sent) never writes this index.
CREATE INDEX outbox_dead ON outbox (id) WHERE status = 'dead';
