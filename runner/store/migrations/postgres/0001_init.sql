-- huse-run results database, schema version 1 (PostgreSQL). The same tables, columns and
-- view as migrations/sqlite/0001_init.sql; integers are BIGINT and reals DOUBLE PRECISION
-- so both backends hold the same values.
CREATE TABLE experiments (
    id          BIGSERIAL PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    file        TEXT NOT NULL,
    created_at  TEXT NOT NULL
);

CREATE TABLE runs (
    id            BIGSERIAL PRIMARY KEY,
    experiment_id BIGINT NOT NULL REFERENCES experiments(id),
    name          TEXT NOT NULL,
    status        TEXT NOT NULL CHECK (status IN ('running', 'succeeded', 'failed', 'interrupted')),
    started_at    TEXT NOT NULL,
    ended_at      TEXT,
    duration_s    DOUBLE PRECISION,
    config_yaml   TEXT NOT NULL,
    sweep_point   TEXT NOT NULL DEFAULT '',
    seed          BIGINT NOT NULL,
    device        TEXT NOT NULL,
    git_commit    TEXT,
    error         TEXT,
    host          TEXT,
    pid           BIGINT
);
CREATE INDEX runs_experiment ON runs(experiment_id, status);

CREATE TABLE params (
    run_id     BIGINT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    key        TEXT NOT NULL,
    value      TEXT NOT NULL,
    value_num  DOUBLE PRECISION,
    PRIMARY KEY (run_id, key)
);
CREATE INDEX params_key ON params(key, value_num);

CREATE TABLE stage_runs (
    id          BIGSERIAL PRIMARY KEY,
    run_id      BIGINT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    stage       TEXT NOT NULL,
    kind        TEXT NOT NULL,
    version     TEXT NOT NULL,
    source      TEXT NOT NULL,
    cache_key   TEXT NOT NULL,
    cached      BIGINT NOT NULL,
    status      TEXT NOT NULL CHECK (status IN ('succeeded', 'failed', 'skipped', 'interrupted')),
    started_at  TEXT,
    ended_at    TEXT,
    duration_s  DOUBLE PRECISION,
    output_dir  TEXT,
    error       TEXT
);
CREATE INDEX stage_runs_run ON stage_runs(run_id);

CREATE TABLE metrics (
    id      BIGSERIAL PRIMARY KEY,
    run_id  BIGINT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    stage   TEXT NOT NULL,
    key     TEXT NOT NULL,
    step    BIGINT NOT NULL,
    value   DOUBLE PRECISION   -- NULL stands for NaN or an infinity
);
CREATE INDEX metrics_run_key ON metrics(run_id, key, step);

CREATE TABLE artifacts (
    run_id  BIGINT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    stage   TEXT NOT NULL,
    name    TEXT NOT NULL,
    path    TEXT NOT NULL,
    bytes   BIGINT,
    PRIMARY KEY (run_id, stage, name)
);

-- The last value (highest step) of every metric of every run.
CREATE VIEW final_metrics AS
SELECT m.run_id, m.stage, m.key, m.step, m.value
FROM metrics m
WHERE m.id = (SELECT m2.id FROM metrics m2
              WHERE m2.run_id = m.run_id AND m2.key = m.key
              ORDER BY m2.step DESC, m2.id DESC LIMIT 1);
