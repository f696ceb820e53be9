-- asyncstore schema, version 2 (SQLite): numbered lease slots for a global cap on running
-- sessions, and wake-up flags so a release notifies waiters only when there are some.

ALTER TABLE session_leases ADD COLUMN contended INTEGER NOT NULL DEFAULT 0;

CREATE TABLE lease_slot_pools (
    pool     TEXT PRIMARY KEY,
    waiting  INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE lease_slots (
    pool        TEXT NOT NULL,
    slot        INTEGER NOT NULL,
    token       INTEGER NOT NULL DEFAULT 0,
    expires_at  REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (pool, slot)
);
CREATE INDEX lease_slots_token ON lease_slots (token);
