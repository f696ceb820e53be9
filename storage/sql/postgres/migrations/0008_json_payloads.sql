-- asyncstore schema, version 8 (Postgres): payloads are kept as JSON text (`json`), not
-- `jsonb`, so every value round-trips exactly as on SQLite: jsonb rewrote numbers (1e16
-- came back as an int, 5.942375405004405e16 as a different int, -0.0 as 0.0) and sorted
-- object keys. No query reads inside a payload (no jsonb operator or index on these
-- columns), so nothing else changes. Rows written before this migration keep the text
-- jsonb had already normalized.
ALTER TABLE chat_messages ALTER COLUMN content TYPE json USING content::json;
ALTER TABLE stream_events ALTER COLUMN payload TYPE json USING payload::json;
ALTER TABLE agent_tasks ALTER COLUMN payload TYPE json USING payload::json;
ALTER TABLE outbox ALTER COLUMN payload TYPE json USING payload::json;
