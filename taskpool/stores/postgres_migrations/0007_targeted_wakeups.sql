-- taskpool schema for PostgreSQL, version 7: targeted wake-ups.
--
-- Version 1 NOTIFYed every node on every status change but a claim: every task's end
-- woke every node with a free slot to run a claim (1 + K commits per task for K nodes).
-- Now the payload says what happened, and a transaction NOTIFYs once at most
-- (PostgreSQL folds a transaction's identical notifications into one, and 'end' is
-- held back to commit and dropped if the transaction said 'work'):
--
--   'work'  work may have become claimable: a task was submitted or re-queued; a claim
--           filled its node, so it may have left claimable work to others; a running
--           task was lost (a rescue or a node settling an orphan: nobody claims in
--           that transaction what its end freed); or a node ended a task without
--           claiming (`PostgresStore.finish` calls `taskpool_wake_work`).
--   'end'   tasks ended and nothing else: a node ends its own task and claims in the
--           same transaction (`finish_and_claim`), so it took what the end freed as far
--           as it had room; had it filled up, its claim would have said 'work'.
--
-- Nodes claim on 'work' only, and only with a free slot; a client's waiters re-read
-- on either. What no notification covers (a retry's backoff running out, a claim
-- held back by a node's own project limits, a task cancelled while its dead node's
-- attempt is settled) waits for the pools' periodic claim, as before.

-- Say 'work' once for the whole transaction (the deferred 'end' then stays silent).
CREATE FUNCTION taskpool_wake_work() RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('taskpool.woke', true) IS DISTINCT FROM 'work' THEN
        PERFORM set_config('taskpool.woke', 'work', true);
        PERFORM pg_notify('taskpool_work', 'work');
    END IF;
END;
$$;

-- Whether a node runs as many live attempts as it has slots (an unknown node counts
-- as full: waking the others too often is safe, too rarely is not).
CREATE FUNCTION taskpool_node_is_full(p_node TEXT) RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    v_slots INTEGER;
BEGIN
    SELECT max_parallel INTO v_slots FROM taskpool_nodes WHERE id = p_node;
    IF v_slots IS NULL THEN
        RETURN true;
    END IF;
    RETURN (SELECT count(*) FROM taskpool_tasks
             WHERE owner_node = p_node AND status = 'running'
               AND lease_expires_at >= extract(epoch FROM clock_timestamp())) >= v_slots;
END;
$$;

-- The event log is written as in version 1; only the wake-ups change.
CREATE OR REPLACE FUNCTION taskpool_log_transition() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO taskpool_events (task_id, at, fence, node_id, from_status, to_status, reason)
        VALUES (NEW.id, NEW.changed_at, NULL, NULL, NULL, NEW.status, NEW.reason);
    ELSIF OLD.status IS DISTINCT FROM NEW.status OR OLD.fence IS DISTINCT FROM NEW.fence THEN
        INSERT INTO taskpool_events (task_id, at, fence, node_id, from_status, to_status, reason)
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
    ELSE
        RETURN NULL;
    END IF;
    IF NEW.status = 'waiting' THEN
        PERFORM taskpool_wake_work();
    ELSIF NEW.status = 'running' THEN
        -- A claim. Run as an AFTER trigger, at the end of the claim's statement, so
        -- the count sees every task the statement claimed.
        IF current_setting('taskpool.woke', true) IS DISTINCT FROM 'work'
           AND taskpool_node_is_full(NEW.owner_node) THEN
            PERFORM taskpool_wake_work();
        END IF;
    ELSIF NEW.status = 'lost' AND OLD.status = 'running' THEN
        PERFORM taskpool_wake_work();
    END IF;
    -- Any other end is said by taskpool_notify_end, at commit.
    RETURN NULL;
END;
$$;

CREATE FUNCTION taskpool_notify_end() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('taskpool.woke', true) IS DISTINCT FROM 'work' THEN
        PERFORM pg_notify('taskpool_work', 'end');
    END IF;
    RETURN NULL;
END;
$$;

-- Deferred to commit, so that it knows whether the transaction said 'work' meanwhile.
CREATE CONSTRAINT TRIGGER taskpool_tasks_ended AFTER UPDATE ON taskpool_tasks
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    WHEN (NEW.status NOT IN ('waiting', 'running') AND OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION taskpool_notify_end();
