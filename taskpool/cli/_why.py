"""`taskpool why ID`: what holds a waiting task, and the same answer for `show`.

The reasons are `Client.why`'s, from the claim's own rules (`taskpool._explain`);
here is only how the command line prints them.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from .._client import Client
from .._explain import READY_TEXT, WaitReason, describe
from .._models import Status, TaskInfo
from ._format import emit
from ._options import open_client

if TYPE_CHECKING:
    from ._options import Commands


def add_commands(commands: Commands) -> None:
    why = commands.add_parser("why", help="what holds a waiting task")
    why.set_defaults(run=cmd_why)
    why.add_argument("id", type=int)


def why_text(task: TaskInfo, reasons: list[WaitReason]) -> str:
    """One reason a line under the task, or why there is none."""
    if task.status is not Status.WAITING:
        return f"task {task.id} is not waiting: it is {task.status.value}"
    if not reasons:
        return f"task {task.id} is waiting; {READY_TEXT}"
    return "\n".join([f"task {task.id} is waiting:", *(f"  {r.text}" for r in reasons)])


async def why_line(client: Client, task: TaskInfo) -> list[str]:
    """`show`'s line for a waiting task (none for another)."""
    if task.status is not Status.WAITING:
        return []
    reasons = await client.why(task.id)
    return [f"  why: {describe(reasons)}"]


async def cmd_why(args: argparse.Namespace) -> None:
    async with open_client(args) as client:
        task = await client.get(args.id)
        reasons = await client.why(task.id)
    data = {"id": task.id, "status": task.status, "reasons": reasons}
    emit(args, data, why_text(task, reasons))
