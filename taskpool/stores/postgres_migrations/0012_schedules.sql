-- taskpool schema, version 12: durable schedules (taskpool._scheduler). A schedule's
-- row holds its next tick; the scheduler step takes due rows FOR UPDATE SKIP LOCKED,
-- fires them and moves next_fire_at in one transaction. taskpool_schedule_runs names
-- the run of each fired tick: its unique (schedule, fire_at) key refuses a tick
-- fired twice.

CREATE TABLE taskpool_schedules (
    name TEXT PRIMARY KEY,
    cron TEXT,
    tz TEXT NOT NULL DEFAULT 'UTC',
    every_s DOUBLE PRECISION,
    spec JSONB NOT NULL,
    overlap TEXT NOT NULL,
    misfire TEXT NOT NULL,
    misfire_bound INTEGER NOT NULL,
    grace_s DOUBLE PRECISION NOT NULL,
    paused BOOLEAN NOT NULL DEFAULT FALSE,
    next_fire_at DOUBLE PRECISION NOT NULL,
    last_fire_at DOUBLE PRECISION,
    last_task_id BIGINT,
    created_at DOUBLE PRECISION NOT NULL
);

CREATE INDEX taskpool_schedules_due ON taskpool_schedules (next_fire_at) WHERE NOT paused;

CREATE TABLE taskpool_schedule_runs (
    task_id BIGINT PRIMARY KEY REFERENCES taskpool_tasks (id) ON DELETE CASCADE,
    schedule TEXT NOT NULL,
    fire_at DOUBLE PRECISION NOT NULL,
    UNIQUE (schedule, fire_at)
);
