-- taskpool schema, version 3: a task's secrets stay out of the database.
-- `pass_env` names variables the worker passes through from its own environment at
-- spawn time (names only, never values); `env` is now added to the inherited
-- environment instead of replacing it, unless `inherit_env` is 0. Tasks stored before
-- this version meant "replace" by a non-NULL env: they keep that meaning.

ALTER TABLE tasks ADD COLUMN pass_env TEXT NOT NULL DEFAULT '[]';  -- JSON list of names
ALTER TABLE tasks ADD COLUMN inherit_env INTEGER NOT NULL DEFAULT 1;
UPDATE tasks SET inherit_env = 0 WHERE env IS NOT NULL;
