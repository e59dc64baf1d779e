-- Schema version 3 (PostgreSQL twin of sqlite/0003): the last value of a metric is per
-- (run, stage, key); records replayed from a spool are noted so none is written twice.
DROP VIEW final_metrics;
CREATE VIEW final_metrics AS
SELECT m.run_id, m.stage, m.key, m.step, m.value
FROM metrics m
WHERE m.id = (SELECT m2.id FROM metrics m2
              WHERE m2.run_id = m.run_id AND m2.stage = m.stage AND m2.key = m.key
              ORDER BY m2.step DESC, m2.id DESC LIMIT 1);
CREATE INDEX metrics_run_stage_key ON metrics(run_id, stage, key, step);

CREATE TABLE replayed (
    spool  TEXT NOT NULL,
    seq    BIGINT NOT NULL,
    PRIMARY KEY (spool, seq)
);
