-- taskpool schema, version 10: fair sharing's turns. Each project's latest turn (higher
-- is more recent), written by claims of pools with `fair_share` for the projects they
-- gave slots to; read by them to break ties between projects with as many running per
-- weight (taskpool/_rules.py, plan_claims). Other claims neither read nor write it.

CREATE TABLE fair_turns (
    project TEXT PRIMARY KEY,
    turn    INTEGER NOT NULL
);
