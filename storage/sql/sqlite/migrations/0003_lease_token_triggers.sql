-- asyncstore schema, version 3 (SQLite): the lease token counter advances inside the
-- statement that writes a token. acquire_lease_slot computes its token as the counter's
-- value + 1 inside its one INSERT ... ON CONFLICT statement; these triggers raise the counter
-- to every token written to session_leases, within that same statement (as nextval() does
-- inside the Postgres statement). Tokens taken with _next_token first (acquire_lease) leave
-- the counter as it is. Each trigger body stays on one line: migrations split at a ';' that
-- ends a line.

CREATE TRIGGER session_leases_token_inserted AFTER INSERT ON session_leases
BEGIN UPDATE counters SET value = NEW.token WHERE name = 'lease_tokens' AND value < NEW.token; END;

CREATE TRIGGER session_leases_token_updated AFTER UPDATE OF token ON session_leases
BEGIN UPDATE counters SET value = NEW.token WHERE name = 'lease_tokens' AND value < NEW.token; END;
