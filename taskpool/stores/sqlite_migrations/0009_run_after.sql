-- taskpool schema, version 9: run-after dependencies (`TaskSpec.after`).
--
-- A task that runs after others is an ordinary waiting task held back by a start
-- time no clock reaches (not_before = +Infinity: `HELD_FOR_DEPENDENCIES`), so the
-- claim, which takes only `not_before <= now`, needs no change. The time its caller
-- asked for waits in after_not_before; after_ids is `after` as submitted (a JSON list
-- of ids), what the task reads back. task_after holds the edges the triggers follow.
--
-- The release and the cascade are the database's, in the transaction of the status
-- change, so no code path can forget them:
-- * a task that succeeds releases each held dependant whose dependencies have now all
--   succeeded (its asked not_before is restored);
-- * a task that ends otherwise (failed, timed_out, stalled, cancelled, lost; a failure
--   that is retried goes back to waiting and ends nothing) cancels every waiting task
--   that runs after it, directly or down a chain, in one statement (SQLite triggers do
--   not recurse), each with a reason naming the dependency (taskpool/_reasons.py:
--   a direct dependant names it, one further down names the lowest of its own
--   dependencies below it, and it); tasks_log_transition logs each as any cancel.
--   Every task below it is waiting or was cancelled already (none can have run: it
--   never succeeded), so the chain is walked whatever the statuses met on the way.
-- Dependencies exist when a task is submitted, so no cycle can form.

ALTER TABLE tasks ADD COLUMN after_ids TEXT;
ALTER TABLE tasks ADD COLUMN after_not_before REAL;

CREATE TABLE task_after (
    task_id  INTEGER NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    after_id INTEGER NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    PRIMARY KEY (task_id, after_id)
) WITHOUT ROWID;
CREATE INDEX task_after_dependency ON task_after (after_id);

CREATE TRIGGER tasks_release_dependants AFTER UPDATE OF status ON tasks
WHEN NEW.status = 'succeeded' AND OLD.status IS NOT 'succeeded'
    AND EXISTS (SELECT 1 FROM task_after WHERE after_id = NEW.id)
BEGIN
    UPDATE tasks SET not_before = coalesce(after_not_before, 0)
     WHERE id IN (SELECT task_id FROM task_after WHERE after_id = NEW.id)
       AND status = 'waiting' AND not_before = 9e999
       AND NOT EXISTS (
           SELECT 1 FROM task_after a JOIN tasks d ON d.id = a.after_id
            WHERE a.task_id = tasks.id AND d.status <> 'succeeded');
END;

CREATE TRIGGER tasks_cancel_dependants AFTER UPDATE OF status ON tasks
WHEN NEW.status IN ('failed', 'timed_out', 'stalled', 'cancelled', 'lost')
    AND OLD.status IS NOT NEW.status
    AND EXISTS (SELECT 1 FROM task_after WHERE after_id = NEW.id)
BEGIN
    UPDATE tasks SET
        status = 'cancelled',
        lease_expires_at = NULL,
        exit_code = NULL,
        changed_at = NEW.changed_at,
        finished_at = NEW.changed_at,
        reason = CASE
            WHEN EXISTS (SELECT 1 FROM task_after r
                          WHERE r.task_id = tasks.id AND r.after_id = NEW.id)
            THEN 'dependency ' || NEW.id || ' ' || CASE NEW.status
                WHEN 'failed' THEN 'failed' WHEN 'timed_out' THEN 'timed out'
                WHEN 'stalled' THEN 'stalled' WHEN 'cancelled' THEN 'was cancelled'
                ELSE 'was lost' END
            ELSE 'dependency ' || (
                SELECT min(p.after_id) FROM task_after p
                 WHERE p.task_id = tasks.id AND p.after_id IN (
                     WITH RECURSIVE below(id) AS (
                         SELECT task_id FROM task_after WHERE after_id = NEW.id
                         UNION
                         SELECT a.task_id FROM task_after a JOIN below b ON a.after_id = b.id)
                     SELECT id FROM below))
                || ' was cancelled: dependency ' || NEW.id || ' ' || CASE NEW.status
                WHEN 'failed' THEN 'failed' WHEN 'timed_out' THEN 'timed out'
                WHEN 'stalled' THEN 'stalled' WHEN 'cancelled' THEN 'was cancelled'
                ELSE 'was lost' END
        END
     WHERE status = 'waiting' AND id IN (
         WITH RECURSIVE below(id) AS (
             SELECT task_id FROM task_after WHERE after_id = NEW.id
             UNION
             SELECT a.task_id FROM task_after a JOIN below b ON a.after_id = b.id)
         SELECT id FROM below);
END;

-- SQLite fires the triggers of one event newest first: the transition log is made
-- anew (as version 1 wrote it) after the two above, so that a task's own event is
-- logged before those of the dependants its change releases or cancels.
DROP TRIGGER tasks_log_transition;
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
