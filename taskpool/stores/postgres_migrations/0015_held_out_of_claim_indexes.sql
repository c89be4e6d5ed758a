-- taskpool schema for PostgreSQL, version 15: held tasks out of the claim's indexes.
--
-- A task held for its run-after dependencies is waiting with not_before = 'Infinity'
-- (HELD_FOR_DEPENDENCIES, 0013) until they succeed. In the waiting indexes, every held
-- task queued ahead of a runnable one was read and stepped over by every claim: the
-- claim's cost grew with the number held. The indexes the claims walk now leave held
-- tasks out (their predicate says `not_before < 'Infinity'`), and every query that
-- walks them says so too, literally: the planner uses a partial index only for a query
-- whose WHERE implies the index's, and a generic plan can prove that only from the
-- literal. A held task enters them when it is released (its not_before restored), so
-- a claim never reads one, however many wait. A task in retry backoff (a finite
-- not_before still ahead) stays in them: it is stepped over, as before.
--
-- The indexes are replaced, not added to: a submit costs what it did (a held task's
-- costs it less). Both claims are restated with that one term added to the queries
-- that walk the queue (the rest as in 0006 and 0014); so is waiting_ahead
-- (stores/_postgres_reads.py), the other reader of waiting tasks in queue order.
-- The fair claim also reads the tasks it chose by `id = ANY (ids)`, no longer by a
-- join with unnest(ids): the join's plan, for a table of a thousand rows or so, was a
-- sequential scan of every row, held ones too.

DROP INDEX taskpool_tasks_waiting;
CREATE INDEX taskpool_tasks_waiting ON taskpool_tasks (priority DESC, id)
    WHERE status = 'waiting' AND not_before < 'Infinity';

DROP INDEX taskpool_tasks_waiting_groups;
CREATE INDEX taskpool_tasks_waiting_groups
    ON taskpool_tasks (project, (coalesce(template, '')), priority DESC, id)
    WHERE status = 'waiting' AND not_before < 'Infinity';

-- taskpool_claim (0006), its queue walks over the new indexes.
CREATE OR REPLACE FUNCTION taskpool_claim(
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
                              FROM taskpool_tasks
                             WHERE status = 'waiting' AND not_before < 'Infinity'
                             ORDER BY priority DESC, id LIMIT 128) AS q) AS w
             WHERE w.passes OR w.n = 128;
        ELSIF v_stage = 2 THEN
            -- The front was blocked: the first waiting tasks the prefilter keeps, found
            -- from the head of each (project, template) group, skipping the groups
            -- blocked as a whole (a full project, an exclusive template) in one step.
            OPEN v_cursor FOR
            WITH RECURSIVE grp(project, tkey) AS (
                (SELECT project, coalesce(template, '') FROM taskpool_tasks
                  WHERE status = 'waiting' AND not_before < 'Infinity'
                  ORDER BY project, coalesce(template, '') LIMIT 1)
                UNION ALL
                SELECT nxt.project, nxt.tkey FROM grp, LATERAL (
                    SELECT t.project, coalesce(t.template, '') AS tkey FROM taskpool_tasks t
                     WHERE t.status = 'waiting' AND t.not_before < 'Infinity'
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
                 WHERE t.status = 'waiting' AND t.not_before < 'Infinity'
                   AND t.project = g.project
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

-- taskpool_claim_fair (0014), its queue walks over the new indexes.
CREATE OR REPLACE FUNCTION taskpool_claim_fair(
    p_node TEXT, p_max_parallel INTEGER, p_project_limits JSONB, p_weights JSONB,
    p_lease_ttl_s DOUBLE PRECISION
) RETURNS TABLE (task taskpool_tasks, contended BOOLEAN) LANGUAGE plpgsql AS $$
DECLARE
    v_now DOUBLE PRECISION;
    v_at DOUBLE PRECISION;
    v_node_running INTEGER;
    v_counts JSONB;              -- running attempts per project, every project
    v_exclusive TEXT[];
    v_any TEXT[];
    v_held TEXT[];
    v_full TEXT[];
    v_kept BIGINT[] := '{}';     -- locked and re-checked: this claim's, in slot order
    v_chosen BIGINT[] := '{}';   -- chosen in this round, in slot order, not locked yet
    v_locked BIGINT[];
    v_held_ids BIGINT[];
    v_keyed BOOLEAN;
    v_skipped BIGINT[] := '{}';  -- rows or keys another claim held
    v_lost BOOLEAN := false;
    v_lost_any BOOLEAN := false;
    v_round INTEGER := 1;
    v_n INTEGER;                 -- tasks read per project in this window
    v_cands taskpool_claim_candidate[];
    v_incomplete TEXT[];         -- projects the window may show only the first part of
    v_seen TEXT[];               -- projects whose first runnable candidate was seen
    v_best INTEGER;
    v_best_share DOUBLE PRECISION;
    v_share DOUBLE PRECISION;
    v_picked INTEGER;
    v_limit INTEGER;
    v_finish0 JSONB;             -- each project's finish tag, as read at the start
    v_clock0 DOUBLE PRECISION;   -- the clock's now, as read at the start
    v_finish JSONB;              -- the same, with this claim's slots so far
    v_clock DOUBLE PRECISION;
    v_start DOUBLE PRECISION;    -- a candidate's start tag
    v_best_start DOUBLE PRECISION;
    v_tags JSONB;                -- project -> [start tag, finish tag] of its latest slot
    c taskpool_claim_candidate;
    i INTEGER;
BEGIN
    PERFORM pg_advisory_xact_lock(taskpool_lock_key('node', p_node));
    v_now := extract(epoch FROM clock_timestamp());
    SELECT * INTO v_node_running, v_counts, v_exclusive, v_any, v_held
      FROM taskpool_fair_occupancy(p_node, v_now);
    SELECT coalesce(jsonb_object_agg(project, finish_tag), '{}'), coalesce(max(start_tag), 0)
      INTO v_finish0, v_clock0 FROM taskpool_fair_tags;

    LOOP  -- one round per iteration
        -- The clock with the slots this claim holds already (FairClock.given).
        v_finish := v_finish0;
        v_clock := v_clock0;
        FOR c IN
            SELECT t.id, t.project, t.template, t.template_parallel, t.locks
              FROM taskpool_tasks t WHERE t.id = ANY (v_kept)
               ORDER BY array_position(v_kept, t.id)
        LOOP
            v_clock := greatest(v_clock, coalesce((v_finish ->> c.project)::double precision, 0));
            v_finish := jsonb_set(v_finish, ARRAY[c.project], to_jsonb(v_clock
                + 1.0::double precision
                  / coalesce((p_weights ->> c.project)::double precision, 1)));
        END LOOP;
        -- Choose: claim_fair_in_windows, one window per iteration.
        LOOP
            EXIT WHEN v_node_running >= p_max_parallel;
            v_full := '{}';
            IF p_project_limits <> '{}' THEN
                SELECT coalesce(array_agg(key), '{}') INTO v_full
                  FROM jsonb_each_text(p_project_limits)
                 WHERE coalesce((v_counts ->> key)::int, 0) >= value::int;
            END IF;
            v_n := least(64, 2 * (p_max_parallel - v_node_running) + 2);
            -- Each project's first v_n tasks the prefilter keeps: those of each
            -- (project, template) group, from the group's head in the index, skipping
            -- the groups blocked whole, cut to the project's first v_n.
            WITH RECURSIVE grp(project, tkey) AS (
                (SELECT project, coalesce(template, '') FROM taskpool_tasks
                  WHERE status = 'waiting' AND not_before < 'Infinity'
                  ORDER BY project, coalesce(template, '') LIMIT 1)
                UNION ALL
                SELECT nxt.project, nxt.tkey FROM grp, LATERAL (
                    SELECT t.project, coalesce(t.template, '') AS tkey FROM taskpool_tasks t
                     WHERE t.status = 'waiting' AND t.not_before < 'Infinity'
                       AND (t.project, coalesce(t.template, '')) > (grp.project, grp.tkey)
                     ORDER BY t.project, coalesce(t.template, '') LIMIT 1) AS nxt
            ), heads AS (
                SELECT w.*, row_number() OVER (
                           PARTITION BY w.project ORDER BY w.priority DESC, w.id) AS rank
                  FROM (SELECT * FROM grp
                         WHERE NOT (grp.project = ANY (v_full))
                           AND NOT (grp.tkey = ANY (v_exclusive))) AS g,
                       LATERAL (
                    SELECT t.id, t.project, t.template, t.template_parallel, t.locks,
                           t.priority FROM taskpool_tasks t
                     WHERE t.status = 'waiting' AND t.not_before < 'Infinity'
                       AND t.project = g.project
                       AND coalesce(t.template, '') = g.tkey
                       AND t.not_before <= v_now
                       AND NOT (t.id = ANY (v_kept || v_chosen || v_skipped))
                       AND (t.template IS NULL OR t.template_parallel
                            OR NOT (t.template = ANY (v_any)))
                       AND NOT (t.locks && v_held)
                     ORDER BY t.priority DESC, t.id LIMIT v_n) AS w
            )
            SELECT coalesce(array_agg(ROW(h.id, h.project, h.template, h.template_parallel,
                                          h.locks)::taskpool_claim_candidate
                                      ORDER BY h.priority DESC, h.id), '{}'),
                   coalesce(array_agg(DISTINCT h.project) FILTER (WHERE h.rank = v_n), '{}')
              INTO v_cands, v_incomplete
              FROM heads AS h WHERE h.rank <= v_n;

            -- plan_claims' fair steps (_fair_steps in taskpool/_rules.py).
            v_picked := 0;
            LOOP
                EXIT WHEN v_node_running >= p_max_parallel;
                v_best := 0;
                v_seen := '{}';
                FOR i IN 1 .. cardinality(v_cands) LOOP
                    c := v_cands[i];
                    CONTINUE WHEN c.project = ANY (v_seen) OR c.id = ANY (v_chosen);
                    v_limit := (p_project_limits ->> c.project)::int;
                    CONTINUE WHEN v_limit IS NOT NULL
                        AND coalesce((v_counts ->> c.project)::int, 0) >= v_limit;
                    IF c.template IS NOT NULL THEN
                        CONTINUE WHEN c.template = ANY (v_exclusive);
                        CONTINUE WHEN NOT c.template_parallel AND c.template = ANY (v_any);
                    END IF;
                    CONTINUE WHEN c.locks && v_held;
                    v_seen := v_seen || c.project;
                    -- The same IEEE division as the rules' (count / weight).
                    v_share := coalesce((v_counts ->> c.project)::double precision, 0)
                             / coalesce((p_weights ->> c.project)::double precision, 1);
                    v_start := greatest(v_clock,
                        coalesce((v_finish ->> c.project)::double precision, 0));
                    -- A tie on both: the earlier head.
                    IF v_best = 0 OR v_share < v_best_share
                       OR (v_share = v_best_share AND v_start < v_best_start) THEN
                        v_best := i;
                        v_best_share := v_share;
                        v_best_start := v_start;
                    END IF;
                END LOOP;
                EXIT WHEN v_best = 0 OR NOT (v_incomplete <@ v_seen);
                c := v_cands[v_best];
                v_chosen := v_chosen || c.id;
                v_picked := v_picked + 1;
                v_node_running := v_node_running + 1;
                v_counts := jsonb_set(v_counts, ARRAY[c.project],
                    to_jsonb(coalesce((v_counts ->> c.project)::int, 0) + 1));
                v_clock := v_best_start;
                v_finish := jsonb_set(v_finish, ARRAY[c.project], to_jsonb(v_clock
                    + 1.0::double precision
                      / coalesce((p_weights ->> c.project)::double precision, 1)));
                IF c.template IS NOT NULL THEN
                    v_any := v_any || c.template;
                    IF NOT c.template_parallel THEN
                        v_exclusive := v_exclusive || c.template;
                    END IF;
                END IF;
                v_held := v_held || c.locks;
            END LOOP;
            EXIT WHEN v_picked = 0 OR cardinality(v_incomplete) = 0;
        END LOOP;

        EXIT WHEN cardinality(v_chosen) = 0;
        -- Take the chosen rows (still waiting), then their keys: as taskpool_claim.
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
        -- Re-check, under its locks and against a fresh read, what this claim holds, in
        -- the order its slots were given.
        SELECT * INTO v_node_running, v_counts, v_exclusive, v_any, v_held
          FROM taskpool_fair_occupancy(p_node, v_now);
        v_held_ids := v_kept || ARRAY(
            SELECT u.id FROM unnest(v_chosen) WITH ORDINALITY AS u(id, n)
             WHERE u.id = ANY (v_locked) ORDER BY u.n);
        v_kept := '{}';
        FOR c IN
            SELECT t.id, t.project, t.template, t.template_parallel, t.locks
              FROM taskpool_tasks t WHERE t.id = ANY (v_held_ids)
               ORDER BY array_position(v_held_ids, t.id)
        LOOP
            EXIT WHEN v_node_running >= p_max_parallel;
            v_limit := (p_project_limits ->> c.project)::int;
            CONTINUE WHEN v_limit IS NOT NULL
                AND coalesce((v_counts ->> c.project)::int, 0) >= v_limit;
            IF c.template IS NOT NULL THEN
                CONTINUE WHEN c.template = ANY (v_exclusive);
                CONTINUE WHEN NOT c.template_parallel AND c.template = ANY (v_any);
            END IF;
            CONTINUE WHEN c.locks && v_held;
            v_kept := v_kept || c.id;
            v_node_running := v_node_running + 1;
            v_counts := jsonb_set(v_counts, ARRAY[c.project],
                to_jsonb(coalesce((v_counts ->> c.project)::int, 0) + 1));
            IF c.template IS NOT NULL THEN
                v_any := v_any || c.template;
                IF NOT c.template_parallel THEN
                    v_exclusive := v_exclusive || c.template;
                END IF;
            END IF;
            v_held := v_held || c.locks;
        END LOOP;
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
    END LOOP;

    -- The tags of the projects given slots (fair_tags): each one's latest slot's start
    -- and finish, never moved back by a claim that read them before another committed.
    v_finish := v_finish0;
    v_clock := v_clock0;
    v_tags := '{}';
    FOR c IN
        SELECT t.id, t.project, t.template, t.template_parallel, t.locks
          FROM taskpool_tasks t WHERE t.id = ANY (v_kept)
           ORDER BY array_position(v_kept, t.id)
    LOOP
        v_clock := greatest(v_clock, coalesce((v_finish ->> c.project)::double precision, 0));
        v_finish := jsonb_set(v_finish, ARRAY[c.project], to_jsonb(v_clock
            + 1.0::double precision / coalesce((p_weights ->> c.project)::double precision, 1)));
        v_tags := jsonb_set(v_tags, ARRAY[c.project],
            jsonb_build_array(v_clock, v_finish -> c.project));
    END LOOP;
    INSERT INTO taskpool_fair_tags AS f (project, start_tag, finish_tag)
    SELECT key, (value ->> 0)::double precision, (value ->> 1)::double precision
      FROM jsonb_each(v_tags) ORDER BY key
    ON CONFLICT (project) DO UPDATE SET start_tag = greatest(f.start_tag, excluded.start_tag),
        finish_tag = greatest(f.finish_tag, excluded.finish_tag);

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
        RETURNING t AS claimed_row, t.id, t.fence
    ), attempt AS (
        INSERT INTO taskpool_attempts (task_id, fence, node_id, claimed_at)
        SELECT claimed.id, claimed.fence, p_node, v_at FROM claimed
    )
    SELECT claimed.claimed_row, false FROM claimed
     ORDER BY array_position(v_kept, claimed.id);
    IF v_lost_any AND v_node_running < p_max_parallel THEN
        task := NULL;
        contended := true;  -- slots left free because of a race: claim again
        RETURN NEXT;
    END IF;
END;
$$;
