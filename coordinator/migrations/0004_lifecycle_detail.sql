-- The agent's own words for its lifecycle's last change in this build (e.g. "startup script 'setup'
-- could not run: could not start /bin/bash in /workspace: No such file or directory"), which a
-- span's status and exit code cannot carry.
ALTER TABLE workspaces ADD COLUMN lifecycle_detail TEXT;
