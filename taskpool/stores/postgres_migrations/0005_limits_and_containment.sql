-- taskpool schema, version 5: per-task resource limits, and how each node contains
-- its attempts (a cgroup per attempt, or process groups), as it said at start.

ALTER TABLE taskpool_tasks ADD COLUMN memory_max BIGINT;  -- bytes
ALTER TABLE taskpool_tasks ADD COLUMN pids_max INTEGER;
ALTER TABLE taskpool_tasks ADD COLUMN cpu_max DOUBLE PRECISION;  -- CPUs
ALTER TABLE taskpool_nodes ADD COLUMN containment TEXT;
