"""`taskpool web`: the dashboard (`taskpool.web`) served alone on a store.

Read-only unless a token is given (`--token` or `TASKPOOL_WEB_TOKEN`): then a sign-in
form asks for it, and API callers send `Authorization: Bearer <token>`. It binds
127.0.0.1 by default; put it behind the host's own TLS and auth to reach it from
elsewhere. To mount the dashboard in your own app instead, see `taskpool.web.create_app`.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from ._options import UsageError, option

if TYPE_CHECKING:
    from ._options import Commands

#: The shortest token accepted (`taskpool.web.create_app` refuses shorter ones).
MIN_TOKEN_CHARS = 16


def _port(text: str) -> int:
    number = int(text)
    if not 0 < number <= 65535:
        raise argparse.ArgumentTypeError(f"not a port: {text!r}")
    return number


def add_commands(commands: Commands) -> None:
    web = commands.add_parser("web", help="serve the dashboard on the store")
    web.set_defaults(run=cmd_web)
    option(web, "--host", "TASKPOOL_WEB_HOST", "address to bind", default="127.0.0.1")
    option(web, "--port", "TASKPOOL_WEB_PORT", "port to listen on", type=_port, default=8080)
    option(
        web,
        "--token",
        "TASKPOOL_WEB_TOKEN",
        f"operators' token ({MIN_TOKEN_CHARS}+ characters); without one the dashboard is read-only",
        secret=True,
    )


async def cmd_web(args: argparse.Namespace) -> None:
    if args.token is not None and len(args.token) < MIN_TOKEN_CHARS:
        raise UsageError(f"--token must be at least {MIN_TOKEN_CHARS} characters")
    from ..web import serve_async  # the `web` extra: its absence is named by main

    print(
        f"taskpool dashboard on http://{args.host}:{args.port}/"
        + (" (operators sign in with the token)" if args.token else " (read-only)"),
        flush=True,
    )
    await serve_async(args.db, args.host, args.port, token=args.token)
