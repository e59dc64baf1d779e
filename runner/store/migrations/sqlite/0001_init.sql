-- huse-run results database, schema version 1.
CREATE TABLE experiments (
    id          INTEGER PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    file        TEXT NOT NULL,
    created_at  TEXT NOT NULL
);

CREATE TABLE runs (
    id            INTEGER PRIMARY KEY,
    experiment_id INTEGER NOT NULL REFERENCES experiments(id),
    name          TEXT NOT NULL,
    status        TEXT NOT NULL CHECK (status IN ('running', 'succeeded', 'failed', 'interrupted')),
    started_at    TEXT NOT NULL,
    ended_at      TEXT,
    duration_s    REAL,
    config_yaml   TEXT NOT NULL,
    sweep_point   TEXT NOT NULL DEFAULT '',
    seed          INTEGER NOT NULL,
    device        TEXT NOT NULL,
    git_commit    TEXT,
    error         TEXT,
    host          TEXT,
    pid           INTEGER
);
CREATE INDEX runs_experiment ON runs(experiment_id, status);

CREATE TABLE params (
    run_id     INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    key        TEXT NOT NULL,
    value      TEXT NOT NULL,
    value_num  REAL,
    PRIMARY KEY (run_id, key)
);
CREATE INDEX params_key ON params(key, value_num);

CREATE TABLE stage_runs (
    id          INTEGER PRIMARY KEY,
    run_id      INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    stage       TEXT NOT NULL,
    kind        TEXT NOT NULL,
    version     TEXT NOT NULL,
    source      TEXT NOT NULL,
    cache_key   TEXT NOT NULL,
    cached      INTEGER NOT NULL,
    status      TEXT NOT NULL CHECK (status IN ('succeeded', 'failed', 'skipped', 'interrupted')),
    started_at  TEXT,
    ended_at    TEXT,
    duration_s  REAL,
    output_dir  TEXT,
    error       TEXT
);
CREATE INDEX stage_runs_run ON stage_runs(run_id);

CREATE TABLE metrics (
    id      INTEGER PRIMARY KEY,
    run_id  INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    stage   TEXT NOT NULL,
    key     TEXT NOT NULL,
    step    INTEGER NOT NULL,
    value   REAL            -- NULL stands for NaN or an infinity
);
CREATE INDEX metrics_run_key ON metrics(run_id, key, step);

CREATE TABLE artifacts (
    run_id  INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    stage   TEXT NOT NULL,
    name    TEXT NOT NULL,
    path    TEXT NOT NULL,
    bytes   INTEGER,
    PRIMARY KEY (run_id, stage, name)
);

-- The last value (highest step) of every metric of every run.
CREATE VIEW final_metrics AS
SELECT m.run_id, m.stage, m.key, m.step, m.value
FROM metrics m
WHERE m.id = (SELECT m2.id FROM metrics m2
              WHERE m2.run_id = m.run_id AND m2.key = m.key
              ORDER BY m2.step DESC, m2.id DESC LIMIT 1);
