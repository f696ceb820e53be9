-- asyncstore schema, version 4 (SQLite): the lease rows behind open_leadership(). SQLite has
-- no session-level lock that outlives a statement without blocking every writer, so the
-- role is a row with an expiry, taken and renewed in a BEGIN IMMEDIATE transaction.

CREATE TABLE maintenance_leaders (
    name        TEXT PRIMARY KEY,
    holder      TEXT NOT NULL,
    expires_at  REAL NOT NULL
);
