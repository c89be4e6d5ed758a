"""What every command's options share: defaults from `TASKPOOL_*` variables, sizes
and resource limits as an operator writes them, and the client of `--db`."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .._client import Client

if TYPE_CHECKING:
    #: What each command module adds its commands to.
    Commands = argparse._SubParsersAction[argparse.ArgumentParser]


def open_client(args: argparse.Namespace, *, create: bool = False, **options: Any) -> Client:
    """A client of the store `--db` names; only with `create` may it make a new database."""
    return Client(args.db, create=create, **options)


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"TASKPOOL_{name}", default)


def option(parser: argparse.ArgumentParser, flag: str, env: str, help: str, **kwargs: Any) -> None:
    """An option whose default comes from TASKPOOL_<env> when that is set."""
    default = _env(env)
    if default is not None:
        kwargs["default"] = kwargs.get("type", str)(default)
    parser.add_argument(flag, help=f"{help} [env TASKPOOL_{env}]", **kwargs)


_SIZE_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_size(text: str) -> int:
    """Bytes from `512M`, `1G`, `1.5GiB`, `1048576` (binary units)."""
    value = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = value[-1:] if value[-1:] in _SIZE_UNITS else ""
    try:
        number = float(value[: len(value) - len(unit)])
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512M, 2G)") from None
    if not number > 0:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512M, 2G)")
    return int(number * _SIZE_UNITS[unit])


def limit_options(parser: argparse.ArgumentParser, prefix: str, *, env: bool) -> None:
    """--memory-max, --pids-max, --cpu-max (for the worker also as TASKPOOL_* variables)."""
    specs: list[tuple[str, str, str, Callable[[str], Any]]] = [
        ("--memory-max", "MEMORY_MAX", "memory, e.g. 512M: OOM-killed past it", parse_size),
        ("--pids-max", "PIDS_MAX", "processes at once: forks past it fail", int),
        ("--cpu-max", "CPU_MAX", "CPUs, e.g. 0.5", float),
    ]
    for flag, name, text, kind in specs:
        if env:
            option(parser, flag, name, prefix + text, type=kind)
        else:
            parser.add_argument(flag, type=kind, help=prefix + text)
