-- taskpool schema, version 8: durable schedules (taskpool._scheduler). A schedule's
-- row holds its next tick; the scheduler step fires due ticks and moves
-- next_fire_at in one write transaction. schedule_runs names the run of each fired
-- tick: its unique (schedule, fire_at) key refuses a tick fired twice.

CREATE TABLE schedules (
    name TEXT PRIMARY KEY,
    cron TEXT,
    tz TEXT NOT NULL DEFAULT 'UTC',
    every_s REAL,
    spec TEXT NOT NULL,
    overlap TEXT NOT NULL,
    misfire TEXT NOT NULL,
    misfire_bound INTEGER NOT NULL,
    grace_s REAL NOT NULL,
    paused INTEGER NOT NULL DEFAULT 0,
    next_fire_at REAL NOT NULL,
    last_fire_at REAL,
    last_task_id INTEGER,
    created_at REAL NOT NULL
);

CREATE INDEX schedules_due ON schedules (next_fire_at) WHERE paused = 0;

CREATE TABLE schedule_runs (
    task_id INTEGER PRIMARY KEY REFERENCES tasks (id) ON DELETE CASCADE,
    schedule TEXT NOT NULL,
    fire_at REAL NOT NULL,
    UNIQUE (schedule, fire_at)
);
