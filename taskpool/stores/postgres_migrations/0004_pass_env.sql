-- taskpool schema for PostgreSQL, version 4: a task's secrets stay out of the database.
-- `pass_env` names variables the worker passes through from its own environment at
-- spawn time (names only, never values); `env` is now added to the inherited
-- environment instead of replacing it, unless `inherit_env` is false. Tasks stored
-- before this version meant "replace" by a non-NULL env: they keep that meaning.

ALTER TABLE taskpool_tasks
    ADD COLUMN pass_env TEXT[] NOT NULL DEFAULT '{}',
    ADD COLUMN inherit_env BOOLEAN NOT NULL DEFAULT TRUE;
UPDATE taskpool_tasks SET inherit_env = FALSE WHERE env IS NOT NULL;
