-- Schema version 3.
-- The last value of a metric is per (run, stage, key): two stages of a run may log the same
-- key (both toy-scale stages log `mean`), and each keeps its own final value.
DROP VIEW final_metrics;
CREATE VIEW final_metrics AS
SELECT m.run_id, m.stage, m.key, m.step, m.value
FROM metrics m
WHERE m.id = (SELECT m2.id FROM metrics m2
              WHERE m2.run_id = m.run_id AND m2.stage = m.stage AND m2.key = m.key
              ORDER BY m2.step DESC, m2.id DESC LIMIT 1);
CREATE INDEX metrics_run_stage_key ON metrics(run_id, stage, key, step);

-- Records written from a spool (a journal of rows the database could not take at the
-- time), so a replay interrupted half-way never writes a record twice.
CREATE TABLE replayed (
    spool  TEXT NOT NULL,
    seq    INTEGER NOT NULL,
    PRIMARY KEY (spool, seq)
);
