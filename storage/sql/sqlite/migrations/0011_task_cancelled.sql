-- asyncstore schema, version 11 (SQLite): `cancelled`, a terminal status of agent tasks,
-- the same semantics as Postgres version 11. SQLite cannot alter a CHECK constraint, and a
-- table rebuild would have to name every column (and drop any a later or parallel
-- migration added), so the stored table definition is edited in place, the documented way
-- for a change that only widens a constraint (sqlite.org/lang_altertable.html, "other
-- kinds of table schema changes"): every existing row satisfies the wider rule. RESET
-- reloads this connection's schema; the CREATE INDEX after it bumps the schema cookie, so
-- every other open connection reloads it too before its next statement.
PRAGMA writable_schema = ON;
UPDATE sqlite_master
SET sql = replace(sql, '''succeeded'', ''dead'')', '''succeeded'', ''dead'', ''cancelled'')')
WHERE type = 'table' AND name = 'agent_tasks';
PRAGMA writable_schema = RESET;
CREATE INDEX agent_tasks_cancelled ON agent_tasks (updated_at) WHERE status = 'cancelled';
