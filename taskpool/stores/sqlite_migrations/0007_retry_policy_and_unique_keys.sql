-- taskpool schema, version 7: a task's retry policy (jitter, a maximum delay, the
-- failures it retries on: a JSON list, NULL for every failure that retries by
-- default) and its deduplication key, unique among waiting and running tasks: a
-- submit with a key held by a live task is decided in the submit's transaction,
-- and this index makes a second live task with the key impossible whatever the code.

ALTER TABLE tasks ADD COLUMN retry_jitter REAL NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN retry_max_delay_s REAL NOT NULL DEFAULT 3600;
ALTER TABLE tasks ADD COLUMN retry_on TEXT;
ALTER TABLE tasks ADD COLUMN unique_key TEXT;
ALTER TABLE tasks ADD COLUMN on_conflict TEXT NOT NULL DEFAULT 'reject'
    CHECK (on_conflict IN ('reject', 'replace_waiting'));

CREATE UNIQUE INDEX tasks_unique_key_live ON tasks (unique_key)
    WHERE unique_key IS NOT NULL AND status IN ('waiting', 'running');
