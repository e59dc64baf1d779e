-- Schema version 4: a stage output may be an attachment — text stored with the run for
-- reports (evaluate's gallery.json) but not printed with the summaries.
ALTER TABLE summaries ADD COLUMN printed INTEGER NOT NULL DEFAULT 1;
