-- Bytes of log lines kept for each build, so the coordinator can cap a build's logs itself
-- (`--max-build-log-mib`) instead of trusting the agent's per-script cap.
ALTER TABLE builds ADD COLUMN log_bytes INTEGER NOT NULL DEFAULT 0;
