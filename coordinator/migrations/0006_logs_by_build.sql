-- Logs are read one build at a time (`logs`, `logs --build N`): index them by build, so a read of
-- the current build does not scan the earlier builds kept for --keep-builds. This index serves
-- every query the old one did (they all start with the workspace).
CREATE INDEX logs_build ON logs (workspace_id, build, id);
DROP INDEX logs_workspace;
