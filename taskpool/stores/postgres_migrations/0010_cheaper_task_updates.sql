-- taskpool schema for PostgreSQL, version 10: cheaper writes of a task's row.
--
-- * A submission's event is logged once per statement, not once per row: one INSERT
--   of the statement's rows (a transition table, in id order) and one wake-up, so a
--   `submit_many` of 100,000 tasks runs no PL/pgSQL per task.
-- * The transition log's trigger ran PL/pgSQL for every UPDATE of a task, only to
--   return at once when neither status nor fence changed (recording a spawn, renewing
--   a lease, asking a cancel). It now runs only when one of them changes (a WHEN
--   condition, checked in C): the same function, so the same events and wake-ups.
-- * Pages of taskpool_tasks keep a fifth free (fillfactor), so that an update that
--   changes no indexed column (a spawn recorded, a lease renewed) can stay on its page
--   as a HOT update and write no index entry. Pages written before keep their layout.
DROP TRIGGER taskpool_tasks_log ON taskpool_tasks;

CREATE FUNCTION taskpool_log_submissions() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO taskpool_events (task_id, at, fence, node_id, from_status, to_status, reason)
    SELECT id, changed_at, NULL, NULL, NULL, status, reason FROM inserted ORDER BY id;
    -- As taskpool_log_transition says of an inserted row (only 'waiting' ones wake).
    IF EXISTS (SELECT FROM inserted WHERE status = 'waiting') THEN
        PERFORM taskpool_wake_work();
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER taskpool_tasks_log_insert AFTER INSERT ON taskpool_tasks
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION taskpool_log_submissions();

CREATE TRIGGER taskpool_tasks_log_change AFTER UPDATE ON taskpool_tasks
    FOR EACH ROW
    WHEN (OLD.status IS DISTINCT FROM NEW.status OR OLD.fence IS DISTINCT FROM NEW.fence)
    EXECUTE FUNCTION taskpool_log_transition();

ALTER TABLE taskpool_tasks SET (fillfactor = 80);
