-- taskpool schema for PostgreSQL, version 1. Released migrations are immutable: add a
-- new file. Times are UNIX seconds (double precision) from the database's own clock,
-- so every node compares leases against one clock.

CREATE TABLE taskpool_nodes (
    id              TEXT PRIMARY KEY,
    host            TEXT NOT NULL,
    pid             INTEGER NOT NULL,
    pid_started_at  DOUBLE PRECISION NOT NULL,
    started_at      DOUBLE PRECISION NOT NULL,
    heartbeat_at    DOUBLE PRECISION NOT NULL,
    stopped_at      DOUBLE PRECISION,
    stop_reason     TEXT,
    max_parallel    INTEGER NOT NULL
);

CREATE TABLE taskpool_tasks (
    id                BIGSERIAL PRIMARY KEY,
    status            TEXT NOT NULL CHECK (status IN ('waiting', 'running', 'succeeded',
                          'failed', 'timed_out', 'stalled', 'cancelled', 'lost')),
    argv              TEXT[] NOT NULL,
    cwd               TEXT,
    env               JSONB,                      -- NULL: inherit the pool's environment
    project           TEXT NOT NULL,
    template          TEXT,
    template_parallel BOOLEAN NOT NULL DEFAULT FALSE,
    locks             TEXT[] NOT NULL DEFAULT '{}',
    priority          INTEGER NOT NULL DEFAULT 0,
    submitted_at      DOUBLE PRECISION NOT NULL,
    not_before        DOUBLE PRECISION NOT NULL DEFAULT 0,
    timeout_s         DOUBLE PRECISION,
    stall_timeout_s   DOUBLE PRECISION,
    max_attempts      INTEGER NOT NULL DEFAULT 1,
    retry_backoff_s   DOUBLE PRECISION NOT NULL DEFAULT 1,
    attempts_used     INTEGER NOT NULL DEFAULT 0,
    fence             BIGINT NOT NULL DEFAULT 0,  -- strictly increasing per task, one per claim
    owner_node        TEXT,
    lease_expires_at  DOUBLE PRECISION,
    pid               INTEGER,
    pid_started_at    DOUBLE PRECISION,
    started_at        DOUBLE PRECISION,
    finished_at       DOUBLE PRECISION,
    exit_code         INTEGER,
    reason            TEXT NOT NULL,              -- why the task is in its current status
    changed_at        DOUBLE PRECISION NOT NULL,  -- when it entered its current status
    cancel_requested  TEXT CHECK (cancel_requested IN ('graceful', 'force'))
);

-- The queue: walked in order by every claim, so claims never sort.
CREATE INDEX taskpool_tasks_waiting ON taskpool_tasks (priority DESC, id)
    WHERE status = 'waiting';
-- What occupies slots, and what each node owns.
CREATE INDEX taskpool_tasks_running ON taskpool_tasks (owner_node) WHERE status = 'running';
CREATE INDEX taskpool_tasks_project ON taskpool_tasks (project, status);

CREATE TABLE taskpool_attempts (
    task_id         BIGINT NOT NULL REFERENCES taskpool_tasks (id) ON DELETE CASCADE,
    fence           BIGINT NOT NULL,
    node_id         TEXT NOT NULL,
    claimed_at      DOUBLE PRECISION NOT NULL,
    pid             INTEGER,
    pid_started_at  DOUBLE PRECISION,
    finished_at     DOUBLE PRECISION,
    outcome         TEXT,
    exit_code       INTEGER,
    reason          TEXT,
    PRIMARY KEY (task_id, fence)
);

CREATE TABLE taskpool_output (
    task_id BIGINT NOT NULL REFERENCES taskpool_tasks (id) ON DELETE CASCADE,
    fence   BIGINT NOT NULL,
    seq     INTEGER NOT NULL,
    text    TEXT NOT NULL,
    PRIMARY KEY (task_id, fence, seq)
);

CREATE TABLE taskpool_events (
    id          BIGSERIAL PRIMARY KEY,
    task_id     BIGINT NOT NULL REFERENCES taskpool_tasks (id) ON DELETE CASCADE,
    at          DOUBLE PRECISION NOT NULL,
    fence       BIGINT,
    node_id     TEXT,
    from_status TEXT,
    to_status   TEXT NOT NULL,
    reason      TEXT NOT NULL
);
CREATE INDEX taskpool_events_task ON taskpool_events (task_id, id);

-- Every status change is logged by the database itself, in the statement that makes
-- it: no code path can change a status and forget the event. Every change but a claim
-- also wakes the nodes (delivered at commit): a new or re-queued task is work, an
-- ended one frees its template and locks and ends someone's wait.
CREATE FUNCTION taskpool_log_transition() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO taskpool_events (task_id, at, fence, node_id, from_status, to_status, reason)
        VALUES (NEW.id, NEW.changed_at, NULL, NULL, NULL, NEW.status, NEW.reason);
    ELSIF OLD.status IS DISTINCT FROM NEW.status OR OLD.fence IS DISTINCT FROM NEW.fence THEN
        INSERT INTO taskpool_events (task_id, at, fence, node_id, from_status, to_status, reason)
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
    ELSE
        RETURN NULL;
    END IF;
    IF NEW.status <> 'running' THEN
        PERFORM pg_notify('taskpool_work', '');
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER taskpool_tasks_log AFTER INSERT OR UPDATE ON taskpool_tasks
    FOR EACH ROW EXECUTE FUNCTION taskpool_log_transition();
