"""`taskpool worker --fair-share`: the options and their variables reach the pool, and
a bad weight is a usage error before anything is opened."""

from __future__ import annotations

import signal
from pathlib import Path

from taskpool import Status, TaskSpec
from tests.acceptance.test_cli import cli, worker
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
