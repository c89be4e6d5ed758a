-- Cancels that land at once: when a cancel is asked of a running task, NOTIFY its
-- owning node (the payload is the node's id) on `taskpool_cancel`, delivered at
-- commit. Each pool LISTENs and reacts to its own id only; the heartbeat's renewal
-- stays the fallback. A trigger of its own, beside `taskpool_log_transition`.
CREATE FUNCTION taskpool_notify_cancel() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('taskpool_cancel', NEW.owner_node);
    RETURN NULL;
END;
$$;

CREATE TRIGGER taskpool_tasks_cancel AFTER UPDATE OF cancel_requested ON taskpool_tasks
    FOR EACH ROW
    WHEN (NEW.status = 'running' AND NEW.owner_node IS NOT NULL
          AND NEW.cancel_requested IS NOT NULL
          AND NEW.cancel_requested IS DISTINCT FROM OLD.cancel_requested)
    EXECUTE FUNCTION taskpool_notify_cancel();
