-- taskpool schema, version 10: fair sharing's clock (taskpool/_rules.py, FairClock).
-- Each project's start and finish tags of the latest slot a claim of a pool with
-- `fair_share` gave it; such claims read them to order projects with as many running
-- per weight. Other claims neither read nor write them.

CREATE TABLE fair_tags (
    project    TEXT PRIMARY KEY,
    start_tag  REAL NOT NULL,
    finish_tag REAL NOT NULL
);
