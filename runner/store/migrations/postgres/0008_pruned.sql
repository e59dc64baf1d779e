-- Schema version 8: runs and stage runs may be `pruned` (stopped early by a study's pruner).
ALTER TABLE runs DROP CONSTRAINT runs_status_check;
ALTER TABLE runs ADD CONSTRAINT runs_status_check CHECK (status IN ('running', 'succeeded', 'failed', 'interrupted', 'pruned'));
ALTER TABLE stage_runs DROP CONSTRAINT stage_runs_status_check;
ALTER TABLE stage_runs ADD CONSTRAINT stage_runs_status_check CHECK (status IN ('succeeded', 'failed', 'skipped', 'interrupted', 'pruned'));
