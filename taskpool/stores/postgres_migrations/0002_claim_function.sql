-- The claim, in one round trip: a restatement in PL/pgSQL of the blocking policy
-- whose oracle is plan_claims (taskpool/_rules.py), run inside the database under the
-- cluster-wide claim lock, so the lock is held for one statement and the commit
-- instead of several round trips. tests/integration/test_claim_differential.py checks
-- that it chooses what plan_claims chooses, in the same order; the claim reason it
-- formats is taskpool/_decisions.py's claim_reason.
--
-- Candidates certainly blocked by what already runs are filtered in the query (an
-- index walk in C; taskpool/_rules.py's Prefilter says the same in Python); the loop
-- only resolves conflicts among the tasks it picks.
CREATE FUNCTION taskpool_claim(
    p_lock BIGINT, p_node TEXT, p_max_parallel INTEGER, p_project_limits JSONB,
    p_lease_ttl_s DOUBLE PRECISION
) RETURNS SETOF taskpool_tasks LANGUAGE plpgsql AS $$
DECLARE
    v_now DOUBLE PRECISION;
    v_node_running INTEGER;
    v_counts JSONB;
    v_full TEXT[];
    v_exclusive TEXT[];
    v_any TEXT[];
    v_held TEXT[];
    v_chosen BIGINT[] := '{}';
    v_limit INTEGER;
    c RECORD;
BEGIN
    PERFORM pg_advisory_xact_lock(p_lock);
    v_now := extract(epoch FROM clock_timestamp());

    SELECT count(*) FILTER (WHERE owner_node = p_node),
           coalesce(array_agg(DISTINCT template) FILTER (
               WHERE template IS NOT NULL AND NOT template_parallel), '{}'),
           coalesce(array_agg(DISTINCT template) FILTER (WHERE template IS NOT NULL), '{}')
      INTO v_node_running, v_exclusive, v_any
      FROM taskpool_tasks WHERE status = 'running' AND lease_expires_at >= v_now;
    IF v_node_running >= p_max_parallel THEN
        RETURN;
    END IF;
    SELECT coalesce(jsonb_object_agg(project, n), '{}') INTO v_counts
      FROM (SELECT project, count(*) AS n FROM taskpool_tasks
             WHERE status = 'running' AND lease_expires_at >= v_now GROUP BY project) AS per;
    SELECT coalesce(array_agg(DISTINCT lock_name), '{}') INTO v_held
      FROM taskpool_tasks, unnest(locks) AS lock_name
     WHERE status = 'running' AND lease_expires_at >= v_now;
    SELECT coalesce(array_agg(key), '{}') INTO v_full
      FROM jsonb_each_text(p_project_limits)
     WHERE coalesce((v_counts ->> key)::int, 0) >= value::int;

    FOR c IN
        SELECT id, project, template, template_parallel, locks FROM taskpool_tasks
         WHERE status = 'waiting' AND not_before <= v_now
           AND NOT (project = ANY (v_full))
           AND (template IS NULL OR NOT (template = ANY (v_exclusive)))
           AND (template IS NULL OR template_parallel OR NOT (template = ANY (v_any)))
           AND NOT (locks && v_held)
         ORDER BY priority DESC, id
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
        v_chosen := v_chosen || c.id;
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

    RETURN QUERY
    WITH claimed AS (
        UPDATE taskpool_tasks SET status = 'running', fence = fence + 1,
               attempts_used = attempts_used + 1, owner_node = p_node,
               lease_expires_at = v_now + p_lease_ttl_s, started_at = v_now,
               changed_at = v_now, pid = NULL, pid_started_at = NULL, exit_code = NULL,
               reason = format('claimed by node %s (attempt %s of %s)', p_node,
                               attempts_used + 1, max_attempts)
         WHERE id = ANY (v_chosen)
        RETURNING *
    ), attempt AS (
        INSERT INTO taskpool_attempts (task_id, fence, node_id, claimed_at)
        SELECT id, fence, p_node, v_now FROM claimed
    )
    SELECT * FROM claimed ORDER BY array_position(v_chosen, claimed.id);
END;
$$;
