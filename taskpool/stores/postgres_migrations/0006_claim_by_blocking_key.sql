-- taskpool schema for PostgreSQL, version 6: claims without a cluster-wide lock.
--
-- Version 2's claim held one advisory lock for the whole cluster until COMMIT, and its
-- candidate query, once PostgreSQL switched it to a generic plan, sorted every waiting
-- row. This claim is still one statement (run outside any explicit transaction, so
-- what it locks is released at its own commit, never across a round trip to the
-- client), still a restatement of plan_claims (taskpool/_rules.py; checked by
-- tests/integration/test_claim_differential.py), but it serializes only what must be:
--
-- * the claiming node's own claims (a blocking advisory lock on the node): its count
--   of running tasks is then exact, and other nodes never wait on it;
-- * each blocking key of a task it is about to claim, with try-locks that never wait
--   (so no deadlock): its project when the node limits that project, its template
--   (shared for a template_parallel task, exclusive otherwise), each of its named
--   locks. Every claim of a task with that key holds that lock, so after taking it a
--   fresh statement (READ COMMITTED: a new snapshot per statement) sees every claim
--   of the key committed before, and none is in flight: the claim re-checks its
--   choice there. A task with no key needs only its row (FOR UPDATE SKIP LOCKED, and
--   still waiting). A claim that loses a race on a key or a row says so
--   (`contended`); the store then claims again at once, so a skip is a short delay,
--   never a task left behind.
--
-- A node that gives no limit for a project does not count its running tasks, so its
-- claims need not wait on that project's lock: in any order, it would decide the same.
--
-- Every query has a good generic plan (PL/pgSQL caches plans per connection, and
-- switches to a generic one after five calls): the queue is read through indexes in
-- queue order with constant limits, never sorted.

DROP FUNCTION taskpool_claim(BIGINT, TEXT, INTEGER, JSONB, DOUBLE PRECISION);

-- Each (project, template) group's waiting tasks in queue order, for when the front of
-- the queue is all blocked: the claim then visits the head of each group instead of
-- every blocked row. Templates are never empty (TaskSpec), so '' stands for none.
CREATE INDEX taskpool_tasks_waiting_groups
    ON taskpool_tasks (project, (coalesce(template, '')), priority DESC, id)
    WHERE status = 'waiting';

-- The advisory lock key of one blocking key. A collision of two names only makes
-- their claims exclude each other: never unsafe.
CREATE FUNCTION taskpool_lock_key(p_kind TEXT, p_name TEXT) RETURNS BIGINT
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT hashtextextended('taskpool ' || p_kind || ' ' || p_name, 0)
$$;

-- Try to take every blocking key of one task; false as soon as one is held elsewhere.
CREATE FUNCTION taskpool_try_keys(
    p_project TEXT, p_template TEXT, p_template_parallel BOOLEAN, p_locks TEXT[],
    p_project_limits JSONB
) RETURNS BOOLEAN LANGUAGE plpgsql AS $$
DECLARE
    v_lock TEXT;
BEGIN
    IF p_project_limits ? p_project
       AND NOT pg_try_advisory_xact_lock(taskpool_lock_key('project', p_project)) THEN
        RETURN false;
    END IF;
    IF p_template IS NOT NULL THEN
        IF p_template_parallel THEN
            IF NOT pg_try_advisory_xact_lock_shared(taskpool_lock_key('template', p_template)) THEN
                RETURN false;
            END IF;
        ELSIF NOT pg_try_advisory_xact_lock(taskpool_lock_key('template', p_template)) THEN
            RETURN false;
        END IF;
    END IF;
    FOREACH v_lock IN ARRAY p_locks LOOP
        IF NOT pg_try_advisory_xact_lock(taskpool_lock_key('lock', v_lock)) THEN
            RETURN false;
        END IF;
    END LOOP;
    RETURN true;
END;
$$;

-- What the attempts holding a live lease occupy (plan_claims' Occupancy), read by
-- statements that start after the caller took its locks.
CREATE FUNCTION taskpool_occupancy(
    p_node TEXT, p_project_limits JSONB, p_now DOUBLE PRECISION,
    OUT node_running INTEGER, OUT counts JSONB, OUT exclusive TEXT[], OUT any_template TEXT[],
    OUT held TEXT[]
) LANGUAGE plpgsql AS $$
DECLARE
    v_locked BOOLEAN;
BEGIN
    SELECT count(*) FILTER (WHERE owner_node = p_node),
           coalesce(array_agg(DISTINCT template) FILTER (
               WHERE template IS NOT NULL AND NOT template_parallel), '{}'),
           coalesce(array_agg(DISTINCT template) FILTER (WHERE template IS NOT NULL), '{}'),
           coalesce(bool_or(locks <> '{}'), false)
      INTO node_running, exclusive, any_template, v_locked
      FROM taskpool_tasks WHERE status = 'running' AND lease_expires_at >= p_now;
    counts := '{}';
    IF p_project_limits <> '{}' THEN
        SELECT coalesce(jsonb_object_agg(project, n), '{}') INTO counts
          FROM (SELECT project, count(*) AS n FROM taskpool_tasks
                 WHERE status = 'running' AND lease_expires_at >= p_now
                   AND p_project_limits ? project
                 GROUP BY project) AS per;
    END IF;
    held := '{}';
    IF v_locked THEN
        SELECT coalesce(array_agg(DISTINCT lock_name), '{}') INTO held
          FROM taskpool_tasks, unnest(locks) AS lock_name
         WHERE status = 'running' AND lease_expires_at >= p_now;
    END IF;
END;
$$;

-- The claim. Rounds of: choose (plan_claims over the queue, read a window at a time as
-- claim_in_windows does), take the chosen tasks' rows and keys, re-check under them.
-- Without a concurrent claim the first round's choice stands: plan_claims' choice. A
-- round that lost a race to another claim is followed by another (three at most),
-- which leaves out what the other claim holds.
CREATE FUNCTION taskpool_claim(
    p_node TEXT, p_max_parallel INTEGER, p_project_limits JSONB, p_lease_ttl_s DOUBLE PRECISION
) RETURNS TABLE (task taskpool_tasks, contended BOOLEAN) LANGUAGE plpgsql AS $$
DECLARE
    v_now DOUBLE PRECISION;      -- what leases and not_before are read against
    v_at DOUBLE PRECISION;       -- when the claim is written: after everything it read
    v_node_running INTEGER;
    v_counts JSONB;
    v_exclusive TEXT[];
    v_any TEXT[];
    v_held TEXT[];
    v_full TEXT[];
    v_kept BIGINT[] := '{}';     -- locked and re-checked: this claim's
    v_chosen BIGINT[] := '{}';   -- chosen in this round, not locked yet
    v_locked BIGINT[];
    v_held_ids BIGINT[];
    v_keyed BOOLEAN;
    v_skipped BIGINT[] := '{}';  -- rows or keys another claim held
    v_lost BOOLEAN := false;     -- this round lost a race
    v_lost_any BOOLEAN := false;
    v_round INTEGER := 1;
    v_stage INTEGER := 1;        -- 1: the front of the queue, 2: group heads, 3: re-check
    v_window INTEGER;
    v_read INTEGER;
    v_picked INTEGER;
    v_more BOOLEAN;
    v_limit INTEGER;
    v_cursor REFCURSOR;
    c RECORD;
BEGIN
    PERFORM pg_advisory_xact_lock(taskpool_lock_key('node', p_node));
    v_now := extract(epoch FROM clock_timestamp());
    SELECT * INTO v_node_running, v_counts, v_exclusive, v_any, v_held
      FROM taskpool_occupancy(p_node, p_project_limits, v_now);

    LOOP  -- one pass over a cursor per iteration
        v_full := '{}';
        IF p_project_limits <> '{}' THEN
            SELECT coalesce(array_agg(key), '{}') INTO v_full
              FROM jsonb_each_text(p_project_limits)
             WHERE coalesce((v_counts ->> key)::int, 0) >= value::int;
        END IF;
        v_window := least(64, 2 * (p_max_parallel - v_node_running) + 2);
        IF v_stage = 1 THEN
            -- The first 128 waiting tasks at most (a constant: the generic plan walks
            -- the index); those certainly blocked are dropped here, in C, all but the
            -- 128th, which says that the queue goes on.
            OPEN v_cursor FOR
            SELECT w.id, w.project, w.template, w.template_parallel, w.locks, w.passes,
                   w.n = 128 AS more
              FROM (SELECT q.*,
                           q.not_before <= v_now
                           AND NOT (q.id = ANY (v_kept || v_skipped))
                           AND NOT (q.project = ANY (v_full))
                           AND (q.template IS NULL OR NOT (q.template = ANY (v_exclusive)))
                           AND (q.template IS NULL OR q.template_parallel
                                OR NOT (q.template = ANY (v_any)))
                           AND NOT (q.locks && v_held) AS passes
                      FROM (SELECT id, project, template, template_parallel, locks,
                                   not_before,
                                   row_number() OVER (ORDER BY priority DESC, id) AS n
                              FROM taskpool_tasks WHERE status = 'waiting'
                             ORDER BY priority DESC, id LIMIT 128) AS q) AS w
             WHERE w.passes OR w.n = 128;
        ELSIF v_stage = 2 THEN
            -- The front was blocked: the first waiting tasks the prefilter keeps, found
            -- from the head of each (project, template) group, skipping the groups
            -- blocked as a whole (a full project, an exclusive template) in one step.
            OPEN v_cursor FOR
            WITH RECURSIVE grp(project, tkey) AS (
                (SELECT project, coalesce(template, '') FROM taskpool_tasks
                  WHERE status = 'waiting'
                  ORDER BY project, coalesce(template, '') LIMIT 1)
                UNION ALL
                SELECT nxt.project, nxt.tkey FROM grp, LATERAL (
                    SELECT t.project, coalesce(t.template, '') AS tkey FROM taskpool_tasks t
                     WHERE t.status = 'waiting'
                       AND (t.project, coalesce(t.template, '')) > (grp.project, grp.tkey)
                     ORDER BY t.project, coalesce(t.template, '') LIMIT 1) AS nxt
            )
            SELECT w.id, w.project, w.template, w.template_parallel, w.locks,
                   true AS passes, false AS more
              FROM (SELECT * FROM grp
                     WHERE NOT (grp.project = ANY (v_full))
                       AND NOT (grp.tkey = ANY (v_exclusive))) AS g,
                   LATERAL (
                SELECT t.id, t.project, t.template, t.template_parallel, t.locks,
                       t.priority FROM taskpool_tasks t
                 WHERE t.status = 'waiting' AND t.project = g.project
                   AND coalesce(t.template, '') = g.tkey
                   AND t.not_before <= v_now
                   AND NOT (t.id = ANY (v_kept || v_chosen || v_skipped))
                   AND (t.template IS NULL OR t.template_parallel
                        OR NOT (t.template = ANY (v_any)))
                   AND NOT (t.locks && v_held)
                 ORDER BY t.priority DESC, t.id LIMIT v_window) AS w
             ORDER BY w.priority DESC, w.id LIMIT v_window;
        ELSE
            -- Re-check, under its locks, what this claim holds.
            v_held_ids := v_kept || v_locked;
            OPEN v_cursor FOR
            SELECT id, project, template, template_parallel, locks,
                   true AS passes, false AS more
              FROM taskpool_tasks WHERE id = ANY (v_held_ids)
             ORDER BY priority DESC, id;
            v_kept := '{}';
        END IF;

        -- plan_claims' loop (taskpool/_rules.py) over what the cursor yields.
        v_read := 0;
        v_picked := 0;
        v_more := false;
        LOOP
            EXIT WHEN v_node_running >= p_max_parallel;
            FETCH v_cursor INTO c;
            EXIT WHEN NOT FOUND;
            v_read := v_read + 1;
            v_more := v_more OR c.more;
            CONTINUE WHEN NOT c.passes;
            v_limit := (p_project_limits ->> c.project)::int;
            CONTINUE WHEN v_limit IS NOT NULL
                AND coalesce((v_counts ->> c.project)::int, 0) >= v_limit;
            IF c.template IS NOT NULL THEN
                CONTINUE WHEN c.template = ANY (v_exclusive);
                CONTINUE WHEN NOT c.template_parallel AND c.template = ANY (v_any);
            END IF;
            CONTINUE WHEN c.locks && v_held;
            IF v_stage = 3 THEN
                v_kept := v_kept || c.id;
            ELSE
                v_chosen := v_chosen || c.id;
            END IF;
            v_picked := v_picked + 1;
            v_node_running := v_node_running + 1;
            IF v_limit IS NOT NULL THEN
                v_counts := jsonb_set(v_counts, ARRAY[c.project],
                    to_jsonb(coalesce((v_counts ->> c.project)::int, 0) + 1));
            END IF;
            IF c.template IS NOT NULL THEN
                v_any := v_any || c.template;
                IF NOT c.template_parallel THEN
                    v_exclusive := v_exclusive || c.template;
                END IF;
            END IF;
            v_held := v_held || c.locks;
        END LOOP;
        CLOSE v_cursor;

        IF v_stage = 3 THEN
            IF cardinality(v_kept) < cardinality(v_held_ids) THEN
                v_lost := true;  -- a claim committed in between took what it needed
                v_skipped := v_skipped || ARRAY(
                    SELECT unnest(v_held_ids) EXCEPT SELECT unnest(v_kept));
            END IF;
            v_lost_any := v_lost_any OR v_lost;
            EXIT WHEN NOT v_lost OR v_round >= 3;
            v_round := v_round + 1;
            v_lost := false;
            v_chosen := '{}';
            v_stage := 1;
            CONTINUE;
        END IF;
        IF v_node_running < p_max_parallel
           AND ((v_stage = 1 AND v_more) OR (v_stage = 2 AND v_picked > 0 AND v_read = v_window))
        THEN
            v_stage := 2;  -- the next window
            CONTINUE;
        END IF;

        EXIT WHEN cardinality(v_chosen) = 0;
        -- Take the chosen rows (still waiting: READ COMMITTED re-checks a row it locks
        -- against its newest version), then their keys.
        SELECT coalesce(array_agg(id), '{}'),
               coalesce(bool_or(p_project_limits ? project OR template IS NOT NULL
                                OR locks <> '{}'), false)
          INTO v_locked, v_keyed
          FROM (SELECT id, project, template, template_parallel, locks FROM taskpool_tasks
                 WHERE id = ANY (v_chosen) AND status = 'waiting'
                 ORDER BY priority DESC, id FOR UPDATE SKIP LOCKED) AS mine
         WHERE taskpool_try_keys(project, template, template_parallel, locks, p_project_limits);
        IF cardinality(v_locked) = cardinality(v_chosen) AND NOT v_keyed THEN
            v_kept := v_kept || v_chosen;  -- rows alone decide it: the choice stands
            EXIT;
        END IF;
        IF cardinality(v_locked) < cardinality(v_chosen) THEN
            v_lost := true;
            v_skipped := v_skipped || ARRAY(
                SELECT unnest(v_chosen) EXCEPT SELECT unnest(v_locked));
        END IF;
        -- A fresh read, begun after this claim took its locks, to re-check against.
        SELECT * INTO v_node_running, v_counts, v_exclusive, v_any, v_held
          FROM taskpool_occupancy(p_node, p_project_limits, v_now);
        v_stage := 3;
    END LOOP;

    -- Stamped after every read it made, so a claim never seems to start before the end
    -- of an attempt it saw ended.
    v_at := extract(epoch FROM clock_timestamp());
    RETURN QUERY
    WITH claimed AS (
        UPDATE taskpool_tasks AS t SET status = 'running', fence = fence + 1,
               attempts_used = attempts_used + 1, owner_node = p_node,
               lease_expires_at = v_at + p_lease_ttl_s, started_at = v_at,
               changed_at = v_at, pid = NULL, pid_started_at = NULL, exit_code = NULL,
               reason = format('claimed by node %s (attempt %s of %s)', p_node,
                               attempts_used + 1, max_attempts)
         WHERE id = ANY (v_kept)
        RETURNING t AS claimed_row, t.id, t.fence, t.priority
    ), attempt AS (
        INSERT INTO taskpool_attempts (task_id, fence, node_id, claimed_at)
        SELECT claimed.id, claimed.fence, p_node, v_at FROM claimed
    )
    SELECT claimed.claimed_row, false FROM claimed ORDER BY claimed.priority DESC, claimed.id;
    IF v_lost_any AND v_node_running < p_max_parallel THEN
        task := NULL;
        contended := true;  -- slots left free because of a race: claim again
        RETURN NEXT;
    END IF;
END;
$$;
