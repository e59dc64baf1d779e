-- Schema version 6: the database's identity, written once when the schema reaches this
-- version. A spool (records a busy or full database could not take) names the database
-- it belongs to by this id, so it is never replayed into another database that later
-- took the same path or URL.
CREATE TABLE meta (
    key    TEXT PRIMARY KEY,
    value  TEXT NOT NULL
);
INSERT INTO meta (key, value) VALUES ('database_id', md5(random()::text || clock_timestamp()::text || pg_backend_pid()::text));
