"""`taskpool worker --fair-share`: the options and their variables reach the pool, and
a bad weight is a usage error before anything is opened."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from taskpool import NodeInfo, Status, TaskSpec
from tests.acceptance.test_cli import cli, cli_json, worker
from tests.helpers import eventually, open_store


async def test_a_worker_shares_its_slot_by_the_weights_it_was_given(database: str) -> None:
    """`worker --fair-share --max-parallel 1` with TASKPOOL_FAIR_SHARE_WEIGHT=A=3: 9 tasks
    of A queued before 3 of B start A, B, A, A, A, B, A, A, A, B, A, A (every claim finds
    nothing running, so the fair clock alone decides, by weight)."""
    async with open_store(database) as store:
        a = await store.submit_many([TaskSpec.build(["true"], project="A")] * 9)
        b = await store.submit_many([TaskSpec.build(["true"], project="B")] * 3)
    project = {**dict.fromkeys(a, "A"), **dict.fromkeys(b, "B")}
    with worker(
        database, "--fair-share", "--max-parallel", "1", env={"TASKPOOL_FAIR_SHARE_WEIGHT": "A=3"}
    ) as proc:

        async def all_done() -> bool:
            async with open_store(database) as store:
                statuses = await store.statuses(list(project))
            return all(s is Status.SUCCEEDED for s in statuses.values())

        await eventually(all_done)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    async with open_store(database) as store:
        events = [e for i in project for e in await store.events(i)]
    starts = sorted((e.id, project[e.task_id]) for e in events if e.to_status is Status.RUNNING)
    assert "".join(p for _, p in starts) == "ABAAABAAABAA"


async def test_a_bad_weight_is_a_usage_error(tmp_path: Path) -> None:
    """A weight that is not a number above 0, by flag or by variable, exits 2 naming it
    and the form wanted; no database is created."""
    db = str(tmp_path / "never.db")
    for args, env in [
        (["--fair-share-weight", "A=0"], {}),
        (["--fair-share-weight", "A"], {}),
        ([], {"TASKPOOL_FAIR_SHARE_WEIGHT": "A=2,B=-1"}),
    ]:
        result = cli(db, "worker", *args, check=False, env=env)
        assert result.returncode == 2
        assert "wants PROJECT=WEIGHT with a weight above 0 (e.g. batch=3)" in result.stderr
        if env:
            assert "from TASKPOOL_FAIR_SHARE_WEIGHT='A=2,B=-1'" in result.stderr
    assert not Path(db).exists()


async def test_nodes_say_how_each_node_shares_its_slots(database: str) -> None:
    """`nodes` gives each node's fair share in words, and `--json` as registered:
    null when off, {} for every project 1, else the weights."""
    now = time.time()
    weights = {"off": None, "even": {}, "weighted": {"a": 3.0, "b": 0.5}}
    async with open_store(database) as store:
        for i, (node_id, fair_share) in enumerate(weights.items()):
            await store.register_node(
                NodeInfo(
                    node_id, "h", os.getpid(), now, now + i, now, None, 2, fair_share=fair_share
                )
            )
    text = cli(database, "nodes").stdout
    shown = [line.strip() for line in text.splitlines() if "fair share" in line]
    assert shown == [
        "fair share: off",
        "fair share: on (every project 1)",
        "fair share: on (a=3, b=0.5, others 1)",
    ]
    assert {n["id"]: n["fair_share"] for n in cli_json(database, "nodes")} == weights


async def test_a_fair_worker_shows_its_weights_in_nodes(database: str) -> None:
    """What `worker --fair-share-weight` was given is what `nodes` shows of it."""
    with worker(database, "--fair-share-weight", "batch=3") as proc:

        async def registered() -> bool:
            async with open_store(database) as store:
                return bool(await store.list_nodes(alive=True))

        await eventually(registered)
        assert "fair share: on (batch=3, others 1)" in cli(database, "nodes").stdout
        [node] = cli_json(database, "nodes")
        assert node["fair_share"] == {"batch": 3.0}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
