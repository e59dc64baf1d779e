-- Schema version 4 (PostgreSQL twin of sqlite/0004): attachments are summaries not printed.
ALTER TABLE summaries ADD COLUMN printed BIGINT NOT NULL DEFAULT 1;
