-- taskpool schema, version 3: the store's identity, created once with the schema.
-- Every attempt's processes carry it (with task id and fence), so a pool touches
-- only processes of its own store even when another database on the host has the
-- same task ids.

CREATE TABLE taskpool_store_identity (
    singleton  INTEGER PRIMARY KEY CHECK (singleton = 1),
    store_id   TEXT NOT NULL
);

INSERT INTO taskpool_store_identity (singleton, store_id)
VALUES (1, replace(gen_random_uuid()::text, '-', ''));
