-- asyncstore schema, version 4 (Postgres): no change. open_leadership() uses a session-level
-- advisory lock here; the SQLite dialect's version 4 adds the lease rows it uses instead.
-- Kept so both dialects share versions.
SELECT 1;
