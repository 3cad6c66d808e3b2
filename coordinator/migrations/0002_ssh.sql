-- Users, their SSH keys, workspace grants and the audit log of brokered SSH connections.
CREATE TABLE users (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    token_hash TEXT UNIQUE,
    created_at INTEGER NOT NULL
);

CREATE TABLE user_keys (
    id INTEGER PRIMARY KEY,
    user_id INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    fingerprint TEXT NOT NULL UNIQUE,
    public_key TEXT NOT NULL,
    added_at INTEGER NOT NULL
);
CREATE INDEX user_keys_user ON user_keys (user_id);

CREATE TABLE grants (
    workspace_id INTEGER NOT NULL REFERENCES workspaces (id),
    user_name TEXT NOT NULL,
    granted_at INTEGER NOT NULL,
    PRIMARY KEY (workspace_id, user_name)
);

CREATE TABLE ssh_connections (
    id INTEGER PRIMARY KEY,
    user_name TEXT NOT NULL,
    workspace_name TEXT NOT NULL,
    via TEXT NOT NULL,
    peer TEXT NOT NULL,
    key_fingerprint TEXT,
    started_at INTEGER NOT NULL,
    ended_at INTEGER,
    bytes_up INTEGER NOT NULL DEFAULT 0,
    bytes_down INTEGER NOT NULL DEFAULT 0,
    outcome TEXT NOT NULL
);
CREATE INDEX ssh_connections_started ON ssh_connections (started_at);
