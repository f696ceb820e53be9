-- asyncstore schema, version 3 (Postgres): no change. The SQLite dialect's version 3 adds
-- triggers that advance its lease token counter inside the acquiring statement; Postgres
-- already does that with nextval('lease_tokens'). Kept so both dialects share versions.
SELECT 1;
