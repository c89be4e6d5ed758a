-- taskpool schema, version 16: each node's fair sharing as configured when it started
-- (`TaskPool(fair_share=...)`): NULL when off, else a JSON object of project -> weight
-- (a project not listed weighs 1; '{}': every project 1), so that `taskpool nodes` and
-- the reason a waiting task is held can say a node shares its slots fairly. Nodes of
-- older versions read NULL (off): they did not record it.

ALTER TABLE taskpool_nodes ADD COLUMN fair_share JSONB;
