-- Text summaries a stage publishes (PostgreSQL twin of sqlite/0002). `seq` keeps the
-- recording order that SQLite's rowid gives.
CREATE TABLE summaries (
    seq     BIGSERIAL,
    run_id  BIGINT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    stage   TEXT NOT NULL,
    name    TEXT NOT NULL,
    text    TEXT NOT NULL,
    PRIMARY KEY (run_id, stage, name)
);
