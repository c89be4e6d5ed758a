-- taskpool schema, version 4: per-task resource limits, and how each node contains
-- its attempts (a cgroup per attempt, or process groups), as it said at start.

ALTER TABLE tasks ADD COLUMN memory_max INTEGER;  -- bytes
ALTER TABLE tasks ADD COLUMN pids_max INTEGER;
ALTER TABLE tasks ADD COLUMN cpu_max REAL;        -- CPUs
ALTER TABLE nodes ADD COLUMN containment TEXT;
