-- Schema version 7: a run's device is its `runs.device` column alone; it was also stored
-- as a param. Queries still show and filter `device` (from the column).
DELETE FROM params WHERE key = 'device';
