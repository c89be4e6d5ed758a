-- taskpool schema, version 11: held tasks out of the claim's indexes.
-- A task held for its run-after dependencies is waiting with not_before = +Infinity
-- (HELD_FOR_DEPENDENCIES, 0009) until they succeed. In the waiting indexes, every held
-- task queued ahead of a runnable one was read and stepped over by every claim: the
-- claim's cost grew with the number held. The indexes the claim walks now leave held
-- tasks out, and every query that walks them says `not_before < 9e999` too, in those
-- very words: SQLite uses a partial index only for a query whose WHERE has each term of
-- the index's. A held task enters them when it is released (its not_before restored).
-- A task in retry backoff (a finite not_before still ahead) stays in them. The indexes
-- are replaced, not added to, so a submit costs what it did (a held task's, less).

DROP INDEX tasks_waiting;
CREATE INDEX tasks_waiting ON tasks (priority DESC, id)
    WHERE status = 'waiting' AND not_before < 9e999;

DROP INDEX tasks_waiting_group;
CREATE INDEX tasks_waiting_group ON tasks (project, template, template_parallel, priority DESC, id)
    WHERE status = 'waiting' AND not_before < 9e999;
