"""`taskpool why ID` and the why line of `taskpool show`, run as real processes
against both backends."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time

from taskpool import Limits, NodeInfo, TaskSpec
from tests.acceptance.test_cli import cli as run_cli
from tests.helpers import open_store


def cli(database: str, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI as a process, its exit code checked by the test itself."""
    return run_cli(database, *args, check=False)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


async def test_why_names_the_holder_in_text_json_and_show(database: str) -> None:
    async with open_store(database) as store:
        now = time.time()
        await store.register_node(
            NodeInfo("cli-node-1", "web-1", os.getpid(), now, now, now, None, 2)
        )
        holder = await store.submit(TaskSpec.build(["sleep", "600"], template="apply-prod"))
        [claim] = await store.claim("cli-node-1", Limits(max_parallel=2), lease_ttl_s=600)
        assert claim.task.id == holder
        waiter = await store.submit(TaskSpec.build(["true"], template="apply-prod"))
        free = await store.submit(TaskSpec.build(["true"]))

    held = (
        rf"template 'apply-prod' is held by task {holder}"
        r" \(running on node cli-node on host web-1 for [0-9][^)]* s\)"
    )
    text = ok(cli(database, "why", str(waiter)))
    assert re.fullmatch(rf"task {waiter} is waiting:\n  {held}\n", text), text
    shown = ok(cli(database, "show", str(waiter)))
    assert re.search(rf"^  why: {held}$", shown, re.MULTILINE), shown

    data = json.loads(ok(cli(database, "--json", "why", str(waiter))))
    assert data["id"] == waiter
    assert data["status"] == "waiting"
    [reason] = data["reasons"]
    assert reason["kind"] == "template"
    assert reason["subject"] == "apply-prod"
    assert [h["task_id"] for h in reason["holders"]] == [holder]
    assert [(h["node_id"], h["host"]) for h in reason["holders"]] == [("cli-node-1", "web-1")]

    assert ok(cli(database, "why", str(free))) == (
        f"task {free} is waiting; nothing holds it: a node will claim it at its next claim\n"
    )
    assert ok(cli(database, "why", str(holder))) == f"task {holder} is not waiting: it is running\n"
    assert "why:" not in ok(cli(database, "show", str(holder)))
    missing = cli(database, "why", "9999")
    assert missing.returncode == 1
    assert "TaskNotFound: no task 9999" in missing.stderr


async def test_why_says_the_only_live_node_shares_its_slot_fairly(database: str) -> None:
    """`why`, `show` and `--json` on a task waiting for a full node that shares its slot
    fairly (every project 1): the weight of its project is in the reason's text."""
    async with open_store(database) as store:
        now = time.time()
        await store.register_node(
            NodeInfo("fair-node-1", "web-1", os.getpid(), now, now, now, None, 1, fair_share={})
        )
        holder = await store.submit(TaskSpec.build(["sleep", "600"], project="batch"))
        [claim] = await store.claim("fair-node-1", Limits(max_parallel=1), lease_ttl_s=600)
        assert claim.task.id == holder
        waiter = await store.submit(TaskSpec.build(["true"], project="web"))

    reason = (
        "every node is full (1/1 on web-1); web-1 shares slots fairly across projects"
        " (every project 1): project 'web' weighs 1, so another project's task may start first"
    )
    assert ok(cli(database, "why", str(waiter))) == f"task {waiter} is waiting:\n  {reason}\n"
    assert f"\n  why: {reason}\n" in ok(cli(database, "show", str(waiter)))
    [data] = json.loads(ok(cli(database, "--json", "why", str(waiter))))["reasons"]
    assert (data["kind"], data["text"]) == ("nodes_full", reason)
