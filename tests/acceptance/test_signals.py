"""Every stop is an orderly stop: a second signal hurries a worker's shutdown, never
skips it (DESIGN.md, invariant 13).

The worker runs as a real process with a drain and a grace period far longer than
the safety timeout, so a shutdown that waited for either would fail the test; its
tasks record their own pids, and the verdict is taken from those and the store.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from taskpool import SQLiteStore, Status, TaskSpec
from tests.acceptance.worker_process import TaskProcesses, Worker, recorded, sleeper
from tests.helpers import eventually

TERM, INT = signal.SIGTERM, signal.SIGINT


@pytest.mark.parametrize(
    "signals",
    [(TERM, TERM), (INT, INT), (TERM, INT, TERM)],
    ids=["SIGTERM-twice", "SIGINT-twice", "a-third-signal"],
)
async def test_a_second_signal_kills_the_tasks_and_hands_them_back(
    tmp_path: Path, signals: tuple[signal.Signals, ...]
) -> None:
    """A second signal during the drain SIGKILLs every task's group at once, hands the
    tasks back to waiting with their attempt refunded, and the worker exits 128 +
    that signal; a third one, right behind it, changes nothing."""
    db = tmp_path / "tasks.db"
    pidfiles = [tmp_path / f"pids-{i}" for i in range(2)]
    async with SQLiteStore(db) as store:
        ids = [await store.submit(TaskSpec.build(sleeper(p))) for p in pidfiles]
    tasks: list[TaskProcesses] = []
    with Worker(
        db,
        *("--max-parallel", "2", "--shutdown-drain", "600", "--kill-grace", "600"),
        stderr=tmp_path / "worker.err",
    ) as worker:
        try:
            tasks = [await recorded(p) for p in pidfiles]
            first, second, *more = signals
            worker.send(first)
            await worker.said(f"{first.name}, shutting down")
            worker.send(second)
            for extra in more:  # sent at once: it lands while the hurried stop runs
                worker.send(extra)
            code = await worker.exit_code()
        finally:
            for task in tasks:
                task.kill()
        err = worker.stderr
    # Two signals sent at once may arrive in either order: the first to arrive hurries
    # the stop and sets the exit status; the other finds it hurried already.
    (hurried_by,) = {s for s in (second, *more) if f"{s.name} again, stopping at once" in err}
    assert err.count("again, stopping at once") == 1, err
    assert err.count("already stopping at once") == len(more), err
    assert code == 128 + hurried_by, err
    for task in tasks:
        assert await task.gone()
    async with SQLiteStore(db) as store:
        for task_id in ids:
            info = await store.get(task_id)
            assert (info.status, info.attempts_used) == (Status.WAITING, 0), info
            assert "shut down (hurried); process group sent SIGKILL" in (info.reason or "")
            last = (await store.events(task_id))[-1]
            assert (last.from_status, last.to_status) == ("running", "waiting")
            assert last.reason == info.reason
        (node,) = await store.list_nodes()
        assert node.stopped_at is not None


async def test_the_next_worker_resumes_the_tasks_a_hurried_stop_handed_back(
    tmp_path: Path,
) -> None:
    """After a double SIGTERM the tasks are not lost: a new worker runs them again with
    their first attempt (max_attempts=1 would otherwise have made them `lost`)."""
    db = tmp_path / "tasks.db"
    pidfile = tmp_path / "pids"
    async with SQLiteStore(db) as store:
        task_id = await store.submit(
            TaskSpec.build(
                ["sh", "-c", 'test -e "$0" && exit 0; ' + sleeper(pidfile)[2], str(pidfile)]
            )
        )
    with Worker(db, "--shutdown-drain", "600", stderr=tmp_path / "first.err") as worker:
        task = await recorded(pidfile)
        try:
            worker.send(TERM)
            await worker.said("SIGTERM, shutting down")
            worker.send(TERM)
            assert await worker.exit_code() == 128 + TERM, worker.stderr
        finally:
            task.kill()
    assert await task.gone()
    with Worker(db, stderr=tmp_path / "second.err") as worker:

        async def succeeded() -> bool:
            async with SQLiteStore(db) as store:
                info = await store.get(task_id)
            assert not info.is_terminal or info.status is Status.SUCCEEDED, info
            return info.status is Status.SUCCEEDED

        await eventually(succeeded)
        worker.send(TERM)
        assert await worker.exit_code() == 0, worker.stderr
    async with SQLiteStore(db) as store:
        info = await store.get(task_id)
    assert info.attempts_used == 1
