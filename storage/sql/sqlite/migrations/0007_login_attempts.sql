-- asyncstore schema, version 7 (SQLite): the login attempt counts behind
-- auth.attempts.mode = "storage", shared by every process on this host. Same columns and
-- meaning as the Postgres version (times are epoch seconds of the writer's clock).
CREATE TABLE login_attempts (
    scope           TEXT NOT NULL,
    key             TEXT NOT NULL,
    window_start    REAL NOT NULL,
    failures        INTEGER NOT NULL DEFAULT 0,
    in_flight       INTEGER NOT NULL DEFAULT 0,
    granted         INTEGER NOT NULL DEFAULT 1,
    locked_until    REAL NOT NULL DEFAULT 0,
    locked_at       REAL NOT NULL DEFAULT 0,
    next_lockout_s  REAL NOT NULL DEFAULT 0,
    last_failure    REAL NOT NULL DEFAULT 0,
    updated_at      REAL NOT NULL,
    PRIMARY KEY (scope, key)
);

CREATE INDEX login_attempts_updated ON login_attempts (updated_at);
