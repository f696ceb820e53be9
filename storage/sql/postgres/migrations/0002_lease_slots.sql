-- asyncstore schema, version 2 (Postgres): numbered lease slots for a global cap on running
-- sessions, and wake-up flags so a release notifies remote waiters only when there are some.

ALTER TABLE session_leases ADD COLUMN contended boolean NOT NULL DEFAULT false;

CREATE TABLE lease_slot_pools (
    pool     text PRIMARY KEY,
    waiting  boolean NOT NULL DEFAULT false
);

-- A slot is free when its expires_at has passed; it carries the token of the lease it is
-- bound to, and is renewed and released together with that lease.
CREATE TABLE lease_slots (
    pool        text NOT NULL,
    slot        integer NOT NULL,
    token       bigint NOT NULL DEFAULT 0,
    expires_at  timestamptz NOT NULL DEFAULT '-infinity',
    PRIMARY KEY (pool, slot)
);
CREATE INDEX lease_slots_token ON lease_slots (token);
