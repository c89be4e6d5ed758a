-- taskpool schema, version 6: each node's project limits as configured when it
-- started (a JSON object, project -> running tasks at most), so that the reason a
-- waiting task is held can name a project's limit. Nodes of older versions read '{}'.

ALTER TABLE nodes ADD COLUMN project_limits TEXT NOT NULL DEFAULT '{}';
