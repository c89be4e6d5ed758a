"""The commands on the store as a whole rather than one task: nodes, stale."""

from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING

from ._format import emit, when
from ._options import open_client

if TYPE_CHECKING:
    from ._options import Commands


def add_commands(commands: Commands) -> None:
    nodes = commands.add_parser("nodes", help="pools that have registered, newest last")
    nodes.set_defaults(run=cmd_nodes)

    stale = commands.add_parser("stale", help="what looks stuck: expired leases, silent nodes")
    stale.set_defaults(run=cmd_stale)
    stale.add_argument(
        "--older-than", type=float, default=60.0, help="heartbeat age that counts as silent, s"
    )


async def cmd_nodes(args: argparse.Namespace) -> None:
    async with open_client(args) as client:
        nodes = await client.nodes()
    now = time.time()
    lines = [
        f"{n.id}  {n.host}:{n.pid}  max {n.max_parallel}  "
        + (
            f"stopped {when(n.stopped_at)}"
            if n.stopped_at is not None
            else f"heartbeat {now - n.heartbeat_at:.0f} s ago"
        )
        + f"\n    containment: {n.containment or 'unknown'}"
        for n in nodes
    ]
    emit(args, nodes, "\n".join(lines) or "no nodes")


async def cmd_stale(args: argparse.Namespace) -> None:
    async with open_client(args) as client:
        report = await client.stale(older_than_s=args.older_than)
    now = report.at
    lines = [
        f"task {t.id}: lease expired {now - (t.lease_expires_at or now):.0f} s ago, owner "
        f"{t.owner_node}"
        for t in report.expired_leases
    ]
    lines += [
        f"node {n.id} ({n.host}:{n.pid}): no heartbeat for {now - n.heartbeat_at:.0f} s"
        for n in report.silent_nodes
    ]
    emit(
        args,
        {"expired_leases": report.expired_leases, "silent_nodes": report.silent_nodes},
        "\n".join(lines) or "nothing stale",
    )
