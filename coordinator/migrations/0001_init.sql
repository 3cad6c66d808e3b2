-- Portable SQL: integers for times (unix ms), text for words. PostgreSQL gets its own copy later.
CREATE TABLE settings (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE workspaces (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    owner TEXT,
    template TEXT NOT NULL,
    provisioner TEXT NOT NULL,
    status TEXT NOT NULL,
    status_reason TEXT NOT NULL,
    status_changed_at INTEGER NOT NULL,
    op TEXT,
    last_error TEXT,
    build INTEGER NOT NULL DEFAULT 0,
    build_started_at INTEGER,
    waiting_since INTEGER,
    lifecycle TEXT,
    token_hash TEXT,
    agent_instance INTEGER,
    events_acked INTEGER NOT NULL DEFAULT 0,
    logs_acked INTEGER NOT NULL DEFAULT 0,
    agent_version TEXT,
    agent_hostname TEXT,
    last_heartbeat_at INTEGER,
    created_at INTEGER NOT NULL
);
-- A deleted workspace's name can be used again.
CREATE UNIQUE INDEX workspaces_live_name ON workspaces (name) WHERE status <> 'deleted';
CREATE UNIQUE INDEX workspaces_token ON workspaces (token_hash);

CREATE TABLE transitions (
    id INTEGER PRIMARY KEY,
    workspace_id INTEGER NOT NULL REFERENCES workspaces (id),
    at INTEGER NOT NULL,
    from_status TEXT NOT NULL,
    to_status TEXT NOT NULL,
    reason TEXT NOT NULL
);
CREATE INDEX transitions_workspace ON transitions (workspace_id, id);

CREATE TABLE builds (
    workspace_id INTEGER NOT NULL REFERENCES workspaces (id),
    build INTEGER NOT NULL,
    started_at INTEGER NOT NULL,
    PRIMARY KEY (workspace_id, build)
);

CREATE TABLE spans (
    id INTEGER PRIMARY KEY,
    workspace_id INTEGER NOT NULL REFERENCES workspaces (id),
    build INTEGER NOT NULL,
    source TEXT NOT NULL,
    stage TEXT NOT NULL,
    name TEXT NOT NULL,
    started_at INTEGER NOT NULL,
    ended_at INTEGER NOT NULL,
    exit_code INTEGER,
    status TEXT NOT NULL
);
CREATE INDEX spans_workspace ON spans (workspace_id, build);

CREATE TABLE logs (
    id INTEGER PRIMARY KEY,
    workspace_id INTEGER NOT NULL REFERENCES workspaces (id),
    build INTEGER NOT NULL,
    source TEXT NOT NULL,
    stream TEXT NOT NULL,
    at INTEGER NOT NULL,
    line TEXT NOT NULL
);
CREATE INDEX logs_workspace ON logs (workspace_id, id);
