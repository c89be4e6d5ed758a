-- taskpool schema for PostgreSQL, version 13: run-after dependencies (`TaskSpec.after`).
--
-- A task that runs after others is an ordinary waiting task held back by a start
-- time no clock reaches (not_before = 'Infinity': `HELD_FOR_DEPENDENCIES`), so
-- taskpool_claim, which takes only `not_before <= now`, needs no change. The time its
-- caller asked for waits in after_not_before; after_ids is `after` as submitted, what
-- the task reads back; taskpool_task_after holds the edges the trigger follows, and
-- has_dependants marks a task that has any, so that the trigger's WHEN (checked in C)
-- costs a task nobody runs after nothing.
--
-- The release and the cascade are the database's, in the transaction of the status
-- change, so no code path can forget them (taskpool_settle_dependants):
-- * a task that succeeds releases each held dependant whose dependencies have now all
--   succeeded (its asked not_before is restored) and says 'work' to the nodes;
-- * a task that ends otherwise (failed, timed_out, stalled, cancelled, lost; a failure
--   that is retried goes back to waiting and ends nothing) cancels every waiting task
--   that runs after it, directly or down a chain, in one statement, each with a reason
--   naming the dependency (taskpool/_reasons.py: a direct dependant names it, one
--   further down names the lowest of its own dependencies below it, and it); the log
--   trigger logs each as any cancel. Every task below it is waiting or was cancelled
--   already (none can have run: it never succeeded), so the chain is walked whatever
--   the statuses met on the way.
--
-- Concurrency (READ COMMITTED): the trigger locks the dependants it may change, in id
-- order, before it reads their dependencies in a statement of its own (a new
-- snapshot). Two dependencies of one task that succeed at once so check one after the
-- other, and the second sees the first's success. A submit locks the dependencies it
-- names (FOR NO KEY UPDATE, in id order, one statement) as it reads their statuses,
-- then sets has_dependants, so a dependency's end either waits for the submit's
-- commit, and its trigger sees the new edges, or commits first, and the submit reads
-- the end. Dependencies exist when a task is submitted, so no cycle can form, and a
-- dependant's id is above its dependencies': every lock here is taken in id order
-- (a submit's on its dependencies, a trigger's on the dependants above the task that
-- ended), so no cycle of lock waits can form either.

ALTER TABLE taskpool_tasks ADD COLUMN after_ids BIGINT[];
ALTER TABLE taskpool_tasks ADD COLUMN after_not_before DOUBLE PRECISION;
ALTER TABLE taskpool_tasks ADD COLUMN has_dependants BOOLEAN NOT NULL DEFAULT false;

CREATE TABLE taskpool_task_after (
    task_id  BIGINT NOT NULL REFERENCES taskpool_tasks (id) ON DELETE CASCADE,
    after_id BIGINT NOT NULL REFERENCES taskpool_tasks (id) ON DELETE CASCADE,
    PRIMARY KEY (task_id, after_id)
);
CREATE INDEX taskpool_task_after_dependency ON taskpool_task_after (after_id);

CREATE FUNCTION taskpool_settle_dependants() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    v_root TEXT;
BEGIN
    -- Fired again by the cascade's own cancels (triggers nest here): the outer call
    -- has cancelled everything below already.
    IF pg_trigger_depth() > 1 THEN
        RETURN NULL;
    END IF;
    IF NEW.status = 'succeeded' THEN
        PERFORM FROM taskpool_tasks t
          WHERE t.id IN (SELECT task_id FROM taskpool_task_after WHERE after_id = NEW.id)
            AND t.status = 'waiting' AND t.not_before = 'Infinity'
          ORDER BY t.id FOR UPDATE;
        UPDATE taskpool_tasks t SET not_before = coalesce(t.after_not_before, 0)
         WHERE t.id IN (SELECT task_id FROM taskpool_task_after WHERE after_id = NEW.id)
           AND t.status = 'waiting' AND t.not_before = 'Infinity'
           AND NOT EXISTS (
               SELECT FROM taskpool_task_after a JOIN taskpool_tasks d ON d.id = a.after_id
                WHERE a.task_id = t.id AND d.status <> 'succeeded');
        IF FOUND THEN
            PERFORM taskpool_wake_work();
        END IF;
        RETURN NULL;
    END IF;
    v_root := 'dependency ' || NEW.id || ' ' || CASE NEW.status
        WHEN 'failed' THEN 'failed' WHEN 'timed_out' THEN 'timed out'
        WHEN 'stalled' THEN 'stalled' WHEN 'cancelled' THEN 'was cancelled'
        ELSE 'was lost' END;
    PERFORM FROM taskpool_tasks t
      WHERE t.status = 'waiting' AND t.id IN (
          WITH RECURSIVE below(id) AS (
              SELECT task_id FROM taskpool_task_after WHERE after_id = NEW.id
              UNION
              SELECT a.task_id FROM taskpool_task_after a JOIN below b ON a.after_id = b.id)
          SELECT id FROM below)
      ORDER BY t.id FOR UPDATE;
    WITH RECURSIVE below(id) AS (
        SELECT task_id FROM taskpool_task_after WHERE after_id = NEW.id
        UNION
        SELECT a.task_id FROM taskpool_task_after a JOIN below b ON a.after_id = b.id)
    UPDATE taskpool_tasks t SET
        status = 'cancelled',
        lease_expires_at = NULL,
        exit_code = NULL,
        changed_at = NEW.changed_at,
        finished_at = NEW.changed_at,
        reason = CASE
            WHEN EXISTS (SELECT FROM taskpool_task_after r
                          WHERE r.task_id = t.id AND r.after_id = NEW.id)
            THEN v_root
            ELSE 'dependency ' || (
                SELECT min(p.after_id) FROM taskpool_task_after p
                 WHERE p.task_id = t.id AND p.after_id IN (SELECT id FROM below))
                || ' was cancelled: ' || v_root
        END
     WHERE t.status = 'waiting' AND t.id IN (SELECT id FROM below);
    RETURN NULL;
END;
$$;

-- Named to fire after taskpool_tasks_log_change (triggers of one event fire in name
-- order): the dependency's own event is logged before its dependants'.
CREATE TRIGGER taskpool_tasks_settle_dependants AFTER UPDATE ON taskpool_tasks
    FOR EACH ROW
    WHEN (NEW.has_dependants AND NEW.status IS DISTINCT FROM OLD.status
          AND NEW.status <> 'running' AND NEW.status <> 'waiting')
    EXECUTE FUNCTION taskpool_settle_dependants();
