-- The queue by blocking group: a claim whose head of the queue is crowded with blocked
-- tasks (a project at its limit, a template running) lists the groups with a loose
-- index scan and reads only those that may run, never the rows of a blocked one.
CREATE INDEX tasks_waiting_group ON tasks (project, template, template_parallel, priority DESC, id)
    WHERE status = 'waiting';
