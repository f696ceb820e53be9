-- asyncstore schema, version 5 (SQLite). The Postgres dialect's version 5 also adds the
-- outbox_groups rows that serialize concurrent claims of one (channel, account) group;
-- SQLite has one writer, so a claim's BEGIN IMMEDIATE transaction already sees every
-- committed claim and needs none.
-- A claim leaves a group alone while any of its messages is in flight, whatever its id (a
-- redriven message behind in-flight ones): this index of the in-flight rows answers that per
-- group without walking its pending backlog.
CREATE INDEX outbox_sending_group ON outbox (channel, account) WHERE status = 'sending';
