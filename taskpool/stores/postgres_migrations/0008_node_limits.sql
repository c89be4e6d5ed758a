-- taskpool schema, version 8: each node's project limits as configured when it
-- started (a JSON object, project -> running tasks at most), so that the reason a
-- waiting task is held can name a project's limit. Nodes of older versions read '{}'.

ALTER TABLE taskpool_nodes ADD COLUMN project_limits JSONB NOT NULL DEFAULT '{}';
