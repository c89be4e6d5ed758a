"""What a pool tells the outside: structured log records and Prometheus metrics."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from taskpool import Status, TaskSpec
from taskpool.metrics import PrometheusMetrics
from tests.helpers import eventually, fast_pool, open_store

ROOT = Path(__file__).resolve().parents[2]


async def test_metrics_count_every_way_an_attempt_ends(db: Path) -> None:
    """Attempts started and ended are counted by outcome; the running gauge returns to 0."""
    registry = CollectorRegistry()
    async with fast_pool(db, metrics=PrometheusMetrics(registry)) as pool:
        ids = [
            await pool.submit(["true"]),
            await pool.submit(["sh", "-c", "exit 2"]),
            await pool.submit(["sh", "-c", "kill -9 $$"]),
            await pool.submit(["sleep", "600"], timeout_s=0.2),
            await pool.submit(["no-such-program"]),
        ]
        for task_id in ids:
            await pool.wait(task_id)

    def sample(name: str, **labels: str) -> float | None:
        value = registry.get_sample_value(f"taskpool_{name}", labels)
        return None if value is None else float(value)

    assert sample("attempts_started_total", project="default") == 5
    for outcome in ("exited_ok", "exited_error", "killed", "timed_out", "spawn_failed"):
        assert sample("attempts_ended_total", project="default", outcome=outcome) == 1
    assert sample("attempt_duration_seconds_count", project="default") == 5
    assert sample("running_attempts") == 0
    assert sample("crashes_total") == 0


async def test_log_records_carry_structured_fields(
    db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Each attempt's start and end is a record whose `taskpool` fields say what happened."""
    caplog.set_level(logging.INFO, logger="taskpool")
    async with fast_pool(db) as pool:
        task = await pool.submit(["sh", "-c", "exit 4"], project="ops")
        await pool.wait(task)
        node = pool.node_id
    fields = [r.taskpool for r in caplog.records if hasattr(r, "taskpool")]
    ended = next(f for f in fields if f["event"] == "attempt_ended")
    assert ended["task_id"] == task
    assert ended["node_id"] == node
    assert ended["project"] == "ops"
    assert ended["outcome"] == "exited_error"
    assert ended["exit_code"] == 4
    assert ended["reason"] == "exited with code 4"
    assert [f["event"] for f in fields][:2] == ["node_started", "attempt_started"]
    assert fields[0]["containment"] in ("cgroup", "process-group")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_worker_serves_metrics_and_json_logs(tmp_path: Path) -> None:
    """`taskpool worker --metrics-port P --log-format json`: scrape, and parse every line."""
    db = str(tmp_path / "tasks.db")
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "taskpool",
            "--db",
            db,
            "worker",
            "--metrics-port",
            str(port),
            "--log-format",
            "json",
        ],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        async with open_store(db) as store:
            task = await store.submit(TaskSpec.build(["echo", "hi"]))

            async def done() -> bool:
                return (await store.get(task)).status is Status.SUCCEEDED

            await eventually(done)

        def scrape() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                return str(r.read().decode())

        text = scrape()
        assert 'taskpool_attempts_ended_total{outcome="exited_ok",project="default"} 1.0' in text
        proc.terminate()
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    records = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    events = [r.get("event") for r in records]
    assert "attempt_ended" in events
    ended = next(r for r in records if r.get("event") == "attempt_ended")
    assert ended["task_id"] == task
    assert ended["level"] == "info"
