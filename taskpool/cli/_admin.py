"""The commands on the store as a whole rather than one task: nodes, stale."""

from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING

from .._explain import fair_share_text
from ._format import emit, field, when
from ._options import env_name, open_client, option, positive

if TYPE_CHECKING:
    from ._options import Commands


def add_commands(commands: Commands) -> None:
    nodes = commands.add_parser("nodes", help="pools that have registered, newest last")
    nodes.set_defaults(run=cmd_nodes)

    stale = commands.add_parser("stale", help="what looks stuck: expired leases, silent nodes")
    stale.set_defaults(run=cmd_stale)
    option(
        stale,
        "--older-than",
        env_name("stale", "--older-than-s"),
        "heartbeat age that counts as silent, s",
        type=positive(float),
        default=60.0,
    )


async def cmd_nodes(args: argparse.Namespace) -> None:
    async with open_client(args) as client:
        nodes = await client.nodes()
    now = time.time()
    lines = [
        f"{field(n.id)}  {field(n.host)}:{n.pid}  max {n.max_parallel}  "
        + (
            f"stopped {when(n.stopped_at)}"
            if n.stopped_at is not None
            else f"heartbeat {now - n.heartbeat_at:.0f} s ago"
        )
        + f"\n    containment: {field(n.containment or 'unknown')}"
        + f"\n    fair share: {field(fair_share_text(n.fair_share))}"
        for n in nodes
    ]
    emit(args, nodes, "\n".join(lines) or "no nodes")


async def cmd_stale(args: argparse.Namespace) -> None:
    async with open_client(args) as client:
        report = await client.stale(older_than_s=args.older_than)
    now = report.at
    lines = [
        f"task {t.id}: lease expired {now - (t.lease_expires_at or now):.0f} s ago, owner "
        f"{field(t.owner_node or '-')}"
        for t in report.expired_leases
    ]
    lines += [
        f"node {field(n.id)} ({field(n.host)}:{n.pid}): no heartbeat for"
        f" {now - n.heartbeat_at:.0f} s"
        for n in report.silent_nodes
    ]
    emit(
        args,
        {"expired_leases": report.expired_leases, "silent_nodes": report.silent_nodes},
        "\n".join(lines) or "nothing stale",
    )
