-- taskpool schema, version 1. Released migrations are immutable: add a new file.

CREATE TABLE nodes (
    id              TEXT PRIMARY KEY,
    host            TEXT NOT NULL,
    pid             INTEGER NOT NULL,
    pid_started_at  REAL NOT NULL,
    started_at      REAL NOT NULL,
    heartbeat_at    REAL NOT NULL,
    stopped_at      REAL,
    stop_reason     TEXT,
    max_parallel    INTEGER NOT NULL
);

CREATE TABLE tasks (
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
    status            TEXT NOT NULL CHECK (status IN ('waiting', 'running', 'succeeded',
                          'failed', 'timed_out', 'stalled', 'cancelled', 'lost')),
    argv              TEXT NOT NULL,              -- JSON list of strings
    cwd               TEXT,
    env               TEXT,                       -- JSON object, or NULL to inherit
    project           TEXT NOT NULL,
    template          TEXT,
    template_parallel INTEGER NOT NULL DEFAULT 0,
    locks             TEXT NOT NULL DEFAULT '[]', -- JSON list, mirrored in task_locks
    priority          INTEGER NOT NULL DEFAULT 0,
    submitted_at      REAL NOT NULL,
    not_before        REAL NOT NULL DEFAULT 0,
    timeout_s         REAL,
    stall_timeout_s   REAL,
    max_attempts      INTEGER NOT NULL DEFAULT 1,
    retry_backoff_s   REAL NOT NULL DEFAULT 1,
    attempts_used     INTEGER NOT NULL DEFAULT 0,
    fence             INTEGER NOT NULL DEFAULT 0, -- strictly increasing per task, one per claim
    owner_node        TEXT,
    lease_expires_at  REAL,
    pid               INTEGER,
    pid_started_at    REAL,
    started_at        REAL,
    finished_at       REAL,
    exit_code         INTEGER,
    reason            TEXT NOT NULL,              -- why the task is in its current status
    changed_at        REAL NOT NULL,              -- when it entered its current status
    cancel_requested  TEXT CHECK (cancel_requested IN ('graceful', 'force'))
);

-- The queue: walked in order by every claim, so claims never sort.
CREATE INDEX tasks_waiting ON tasks (priority DESC, id) WHERE status = 'waiting';
-- What occupies slots, and what each node owns.
CREATE INDEX tasks_running ON tasks (owner_node) WHERE status = 'running';
CREATE INDEX tasks_project ON tasks (project, status);

CREATE TABLE task_locks (
    task_id   INTEGER NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    lock_name TEXT NOT NULL,
    PRIMARY KEY (task_id, lock_name)
) WITHOUT ROWID;

CREATE TABLE attempts (
    task_id         INTEGER NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    fence           INTEGER NOT NULL,
    node_id         TEXT NOT NULL,
    claimed_at      REAL NOT NULL,
    pid             INTEGER,
    pid_started_at  REAL,
    finished_at     REAL,
    outcome         TEXT,
    exit_code       INTEGER,
    reason          TEXT,
    PRIMARY KEY (task_id, fence)
) WITHOUT ROWID;

CREATE TABLE output (
    task_id INTEGER NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    fence   INTEGER NOT NULL,
    seq     INTEGER NOT NULL,
    text    TEXT NOT NULL,
    PRIMARY KEY (task_id, fence, seq)
) WITHOUT ROWID;

CREATE TABLE events (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id     INTEGER NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    at          REAL NOT NULL,
    fence       INTEGER,
    node_id     TEXT,
    from_status TEXT,
    to_status   TEXT NOT NULL,
    reason      TEXT NOT NULL
);
CREATE INDEX events_task ON events (task_id, id);

-- Every status change is logged by the database itself, in the same statement that
-- makes it: no code path can change a status and forget the event.
CREATE TRIGGER tasks_log_submit AFTER INSERT ON tasks
BEGIN
    INSERT INTO events (task_id, at, fence, node_id, from_status, to_status, reason)
    VALUES (NEW.id, NEW.changed_at, NULL, NULL, NULL, NEW.status, NEW.reason);
END;

CREATE TRIGGER tasks_log_transition AFTER UPDATE OF status, fence ON tasks
WHEN OLD.status IS NOT NEW.status OR OLD.fence IS NOT NEW.fence
BEGIN
    INSERT INTO events (task_id, at, fence, node_id, from_status, to_status, reason)
    VALUES (
        NEW.id,
        NEW.changed_at,
        CASE WHEN NEW.status = 'running' THEN NEW.fence
             WHEN OLD.status = 'running' THEN OLD.fence END,
        CASE WHEN NEW.status = 'running' THEN NEW.owner_node ELSE OLD.owner_node END,
        OLD.status,
        NEW.status,
        NEW.reason
    );
END;
