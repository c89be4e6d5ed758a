"""What a node says about leases: a refused result is reported as a lost lease, never
as the exit the runner saw; a tolerance longer than the lease is allowed but said."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import pytest

from tests.helpers import eventually, fast_pool, running


async def test_a_refused_result_is_reported_as_a_lost_lease(
    db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Another owner takes the task over while it runs; when it exits 0 its result is
    refused, and the log and metrics label say lease_lost, not exited_ok."""
    caplog.set_level(logging.INFO, logger="taskpool")
    release = db.parent / "release"
    async with fast_pool(db, lease_ttl_s=60) as pool:  # no renewal meanwhile
        task = await pool.submit(
            ["sh", "-c", f"while [ ! -e {release} ]; do sleep 0.02; done; exit 0"]
        )
        await running(pool, task)
        with sqlite3.connect(db) as conn:  # a takeover: a newer fence owns the task now
            conn.execute("UPDATE tasks SET fence = fence + 1 WHERE id = ?", (task,))
        release.touch()

        def ended() -> dict[str, object] | None:
            for record in caplog.records:
                fields = getattr(record, "taskpool", {})
                if fields.get("event") == "attempt_ended" and fields.get("task_id") == task:
                    return fields
            return None

        async def seen() -> dict[str, object] | None:
            return ended()

        fields = await eventually(seen)
    assert fields["outcome"] == "lease_lost"
    assert str(fields["reason"]).startswith("result refused (task ")
    assert str(fields["reason"]).endswith("the attempt had exited with code 0")


async def test_a_tolerance_longer_than_the_lease_is_said_at_start(
    db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Riding out a 30 s outage with a 6 s lease is allowed, but the pool says that its
    tasks will be stopped and handed back at lease expiry meanwhile."""
    caplog.set_level(logging.WARNING, logger="taskpool")
    fast_pool(db, lease_ttl_s=6, store_outage_tolerance_s=30)
    (record,) = [r for r in caplog.records if "store_outage_tolerance_s" in r.getMessage()]
    assert "running tasks are stopped before their lease runs out" in record.getMessage()
