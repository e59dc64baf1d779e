-- Schema version 5: where a run's log is when it ran as a cluster job (SLURM), so `show`
-- and `status` can name it for a failed run.
ALTER TABLE runs ADD COLUMN log TEXT;
