-- taskpool schema for PostgreSQL, version 14: the fair claim.
--
-- A pool with `fair_share` claims through taskpool_claim_fair; every other claim still
-- goes through taskpool_claim (0006), untouched, so its plans and cost stay as they
-- were. This function restates plan_claims with fair_share (taskpool/_rules.py, over
-- windows as claim_fair_in_windows reads them; checked by
-- tests/integration/test_claim_differential.py): each free slot in turn goes to the
-- project with the fewest running attempts (live leases on every node, and those
-- chosen so far) per weight; among those tied there, to the project with the earliest
-- start tag on the fair clock (FairClock: start-time fair queuing over the slots given
-- before, kept in taskpool_fair_tags), then to the one whose first runnable task comes
-- first in the queue; within a project, queue order.
--
-- The locking protocol is taskpool_claim's, unchanged: the node's advisory lock, the
-- rows FOR UPDATE SKIP LOCKED, try-locks on blocking keys (taskpool_try_keys), a
-- re-check under them, `contended` when a race left slots free. The running count of a
-- project without a limit is read without its lock, as the plain claim does: two nodes
-- claiming at the same moment may each count without the other's choice, so fairness
-- holds per claim and, across racing nodes, within what they choose at once.
-- Exclusivity (limits, templates, locks) is enforced exactly as before. The tags it
-- writes lock their rows until commit, in project order (no deadlock): fair claims
-- giving slots to one project commit one after the other there.

-- Each project's start and finish tags of the latest slot a fair claim gave it; the
-- clock's `now` is the greatest start tag.
CREATE TABLE taskpool_fair_tags (
    project    TEXT PRIMARY KEY,
    start_tag  DOUBLE PRECISION NOT NULL,
    finish_tag DOUBLE PRECISION NOT NULL
);

-- What the attempts holding a live lease occupy, every project counted (plan_claims'
-- Occupancy in fair mode); otherwise taskpool_occupancy.
CREATE FUNCTION taskpool_fair_occupancy(
    p_node TEXT, p_now DOUBLE PRECISION,
    OUT node_running INTEGER, OUT counts JSONB, OUT exclusive TEXT[], OUT any_template TEXT[],
    OUT held TEXT[]
) LANGUAGE plpgsql AS $$
BEGIN
    SELECT coalesce(sum(per.n) FILTER (WHERE per.owner_node = p_node), 0),
           coalesce((SELECT jsonb_object_agg(p.project, p.n) FROM (
               SELECT project, count(*) AS n FROM taskpool_tasks
                WHERE status = 'running' AND lease_expires_at >= p_now
                GROUP BY project) AS p), '{}')
      INTO node_running, counts
      FROM (SELECT owner_node, count(*) AS n FROM taskpool_tasks
             WHERE status = 'running' AND lease_expires_at >= p_now
             GROUP BY owner_node) AS per;
    SELECT coalesce(array_agg(DISTINCT template) FILTER (
               WHERE template IS NOT NULL AND NOT template_parallel), '{}'),
           coalesce(array_agg(DISTINCT template) FILTER (WHERE template IS NOT NULL), '{}'),
           coalesce((SELECT array_agg(DISTINCT lock_name) FROM taskpool_tasks r,
                         unnest(r.locks) AS lock_name
                      WHERE r.status = 'running' AND r.lease_expires_at >= p_now), '{}')
      INTO exclusive, any_template, held
      FROM taskpool_tasks WHERE status = 'running' AND lease_expires_at >= p_now;
END;
$$;

-- One waiting task as the fair claim weighs it.
CREATE TYPE taskpool_claim_candidate AS (
    id BIGINT, project TEXT, template TEXT, template_parallel BOOLEAN, locks TEXT[]
);

-- The fair claim. Rounds of: choose (windows of every project's head), take the chosen
-- tasks' rows and keys, re-check under them; as taskpool_claim. `p_weights` maps a
-- project to its weight (a project not listed weighs 1). Claimed tasks are returned in
-- the order they were given their slots.
CREATE FUNCTION taskpool_claim_fair(
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
              FROM unnest(v_kept) WITH ORDINALITY AS u(id, n)
              JOIN taskpool_tasks t ON t.id = u.id ORDER BY u.n
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
                  WHERE status = 'waiting'
                  ORDER BY project, coalesce(template, '') LIMIT 1)
                UNION ALL
                SELECT nxt.project, nxt.tkey FROM grp, LATERAL (
                    SELECT t.project, coalesce(t.template, '') AS tkey FROM taskpool_tasks t
                     WHERE t.status = 'waiting'
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
                     WHERE t.status = 'waiting' AND t.project = g.project
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
              FROM unnest(v_held_ids) WITH ORDINALITY AS u(id, n)
              JOIN taskpool_tasks t ON t.id = u.id ORDER BY u.n
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
          FROM unnest(v_kept) WITH ORDINALITY AS u(id, n)
          JOIN taskpool_tasks t ON t.id = u.id ORDER BY u.n
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
