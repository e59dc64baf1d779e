-- Text summaries a stage publishes as a `*.md` output (e.g. evaluate's tables.md),
-- kept in the database so `huse-run show` can print them after the cache is gone.
CREATE TABLE summaries (
    run_id  INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    stage   TEXT NOT NULL,
    name    TEXT NOT NULL,
    text    TEXT NOT NULL,
    PRIMARY KEY (run_id, stage, name)
);
