-- asyncstore schema, version 7 (Postgres): the fleet-wide login attempt counts behind
-- auth.attempts.mode = "storage". One row per (scope, key): scope is 'account' or
-- 'address'. A fixed window starts at window_start (epoch seconds, database clock);
-- failures + in_flight never exceed the limit within one window, because a login reserves
-- its attempt (in_flight + 1) in the same statement that checks the count. locked_until is
-- the end of the current lockout; next_lockout_s the length of the next one (0: the base).
CREATE TABLE login_attempts (
    scope           text NOT NULL,
    key             text NOT NULL,
    window_start    double precision NOT NULL,
    failures        integer NOT NULL DEFAULT 0,
    in_flight       integer NOT NULL DEFAULT 0,
    granted         boolean NOT NULL DEFAULT true,
    locked_until    double precision NOT NULL DEFAULT 0,
    locked_at       double precision NOT NULL DEFAULT 0,
    next_lockout_s  double precision NOT NULL DEFAULT 0,
    last_failure    double precision NOT NULL DEFAULT 0,
    updated_at      double precision NOT NULL,
    PRIMARY KEY (scope, key)
);

CREATE INDEX login_attempts_updated ON login_attempts (updated_at);
