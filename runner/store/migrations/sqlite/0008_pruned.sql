-- Schema version 8: runs and stage runs may be `pruned` (stopped early by a study's pruner).
-- SQLite cannot alter a CHECK constraint; widening one is the documented case of editing the
-- stored schema text (https://sqlite.org/lang_altertable.html, "otheralter"): the on-disk
-- format does not change and every existing row still satisfies the looser check. Creating
-- and dropping a table afterwards bumps the schema cookie, so every connection reloads it.
PRAGMA writable_schema = ON;
UPDATE sqlite_master
   SET sql = replace(sql, '''interrupted'')', '''interrupted'', ''pruned'')')
 WHERE type = 'table' AND name IN ('runs', 'stage_runs');
PRAGMA writable_schema = OFF;
CREATE TABLE _schema_bump (x INTEGER);
DROP TABLE _schema_bump;
