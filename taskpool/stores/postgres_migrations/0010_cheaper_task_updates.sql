-- taskpool schema for PostgreSQL, version 10: cheaper writes of a task's row.
--
-- * The transition log's trigger ran PL/pgSQL for every UPDATE of a task, only to
--   return at once when neither status nor fence changed (recording a spawn, renewing
--   a lease, asking a cancel). It now runs only when one of them changes (a WHEN
--   condition, checked in C), and on every INSERT, as before: the same function, so
--   the same events and wake-ups.
-- * Pages of taskpool_tasks keep a fifth free (fillfactor), so that an update that
--   changes no indexed column (a spawn recorded, a lease renewed) can stay on its page
--   as a HOT update and write no index entry. Pages written before keep their layout.
DROP TRIGGER taskpool_tasks_log ON taskpool_tasks;

CREATE TRIGGER taskpool_tasks_log AFTER INSERT ON taskpool_tasks
    FOR EACH ROW EXECUTE FUNCTION taskpool_log_transition();

CREATE TRIGGER taskpool_tasks_log_change AFTER UPDATE ON taskpool_tasks
    FOR EACH ROW
    WHEN (OLD.status IS DISTINCT FROM NEW.status OR OLD.fence IS DISTINCT FROM NEW.fence)
    EXECUTE FUNCTION taskpool_log_transition();

ALTER TABLE taskpool_tasks SET (fillfactor = 80);
