"""`taskpool schedule add|ls|pause|resume|rm|next`, run as real processes against
both backends."""

from __future__ import annotations

import json
import subprocess
import time

from taskpool._scheduler import schedules_of
from tests.acceptance.test_cli import cli as run_cli
from tests.helpers import open_store


def cli(database: str, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI as a process, its exit code checked by the test itself."""
    return run_cli(database, *args, check=False)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


async def test_schedule_commands_add_list_pause_resume_next_and_remove(database: str) -> None:
    added = ok(
        cli(database, "schedule", "add", "--name", "drift", "--cron", "0 3 * * *", "--tz",
            "Europe/Berlin", "--overlap", "cancel_previous", "--", "terraform", "plan")
    )  # fmt: skip
    assert "drift" in added
    assert "cron '0 3 * * *' (Europe/Berlin)" in added
    ok(
        cli(
            database,
            "schedule",
            "add",
            "--name",
            "beat",
            "--every",
            "60",
            "--misfire",
            "skip",
            "--",
            "true",
        )
    )
    listed = json.loads(ok(cli(database, "--json", "schedule", "ls")))
    assert [s["name"] for s in listed] == ["beat", "drift"]
    assert listed[1]["overlap"] == "cancel_previous"
    assert listed[1]["spec"]["argv"] == ["terraform", "plan"]
    assert listed[0]["misfire"] == "skip"
    assert "paused" in ok(cli(database, "schedule", "pause", "beat"))
    assert json.loads(ok(cli(database, "--json", "schedule", "ls")))[0]["paused"] is True
    assert "active" in ok(cli(database, "schedule", "resume", "beat"))
    fires = json.loads(ok(cli(database, "--json", "schedule", "next", "drift", "-n", "3")))
    assert len(fires) == 3
    # 03:00 Berlin on successive days: 24 hours apart, 23 or 25 across a DST change.
    assert {fires[1] - fires[0], fires[2] - fires[1]} <= {82_800, 86_400, 90_000}
    ok(cli(database, "schedule", "rm", "beat"))
    assert [s["name"] for s in json.loads(ok(cli(database, "--json", "schedule", "ls")))] == [
        "drift"
    ]
    taken = cli(database, "schedule", "add", "--name", "drift", "--every", "5", "--", "true")
    assert taken.returncode == 1
    assert "exists" in taken.stderr
    missing = cli(database, "schedule", "rm", "nope")
    assert missing.returncode == 1
    assert "no schedule 'nope'" in missing.stderr


async def test_ls_and_show_name_the_schedule_that_submitted_a_task(database: str) -> None:
    """A run fired by the scheduler step has its schedule's name in `ls`'s schedule
    column and a `schedule:` line in `show`, and its name and tick in their JSON; a
    task submitted by hand has none."""
    ok(cli(database, "schedule", "add", "--name", "beat", "--every", "60", "--", "echo", "hi"))
    by_hand = int(ok(cli(database, "submit", "--", "true")))
    async with open_store(database) as store:
        [fired] = await schedules_of(store).fire_due(time.time() + 61)
    run = fired.task_id
    assert run is not None

    lines = {int(line.split()[0]): line for line in ok(cli(database, "ls")).splitlines()}
    assert lines[run].split()[:4] == [str(run), "waiting", "default", "beat"]
    assert lines[by_hand].split()[:4] == [str(by_hand), "waiting", "default", "-"]
    listed = {t["id"]: t for t in json.loads(ok(cli(database, "--json", "ls")))}
    assert listed[run]["schedule"] == {"name": "beat", "tick": fired.tick}
    assert listed[run]["spec"]["argv"] == ["echo", "hi"]
    assert listed[by_hand]["schedule"] is None

    shown = ok(cli(database, "show", str(run)))
    tick = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(fired.tick))
    assert f"  schedule: beat (tick {tick})" in shown.splitlines()
    assert "schedule:" not in ok(cli(database, "show", str(by_hand)))
    exact = json.loads(ok(cli(database, "--json", "show", str(run))))
    assert exact["schedule"] == {"name": "beat", "tick": fired.tick}
    assert exact["task"]["id"] == run
