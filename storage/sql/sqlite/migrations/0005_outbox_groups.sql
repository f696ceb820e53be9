-- asyncstore schema, version 5 (SQLite): no change. The Postgres dialect's version 5 adds
-- the outbox_groups rows that serialize concurrent claims of one (channel, account) group;
-- SQLite has one writer, so a claim's BEGIN IMMEDIATE transaction already sees every
-- committed claim. Kept so both dialects share versions.
SELECT 1;
