-- taskpool schema, version 11: a task's retry policy (jitter, a maximum delay, the
-- failures it retries on: NULL for every failure that retries by default) and its
-- deduplication key, unique among waiting and running tasks: a submit with a key
-- held by a live task is decided in the submit's transaction (INSERT ... ON CONFLICT
-- on this index), so two nodes submitting one key at once store one task.

ALTER TABLE taskpool_tasks ADD COLUMN retry_jitter DOUBLE PRECISION NOT NULL DEFAULT 0;
ALTER TABLE taskpool_tasks ADD COLUMN retry_max_delay_s DOUBLE PRECISION NOT NULL DEFAULT 3600;
ALTER TABLE taskpool_tasks ADD COLUMN retry_on TEXT[];
ALTER TABLE taskpool_tasks ADD COLUMN unique_key TEXT;
ALTER TABLE taskpool_tasks ADD COLUMN on_conflict TEXT NOT NULL DEFAULT 'reject'
    CHECK (on_conflict IN ('reject', 'replace_waiting'));

CREATE UNIQUE INDEX taskpool_tasks_unique_key_live ON taskpool_tasks (unique_key)
    WHERE unique_key IS NOT NULL AND status IN ('waiting', 'running');
