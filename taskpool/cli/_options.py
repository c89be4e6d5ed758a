"""What every command's options share: each option's `TASKPOOL_*` variable, its help
line with its default and that variable, the global options every subcommand also
accepts, sizes and resource limits as an operator writes them, and the client of `--db`.

Precedence, as operators expect it: the command line, then the variable, then the
built-in default. A variable's value is converted and checked like the flag's
(`TASKPOOL_MAX_PARALLEL=abc` is a usage error naming the variable); a repeatable
option's variable holds a comma-separated list, which the flag replaces when given.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from .._client import Client
from .._redact import redact

if TYPE_CHECKING:
    #: What each command module adds its commands to.
    Commands = argparse._SubParsersAction[argparse.ArgumentParser]

ENV_PREFIX = "TASKPOOL_"
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


def open_client(args: argparse.Namespace, *, create: bool = False, **options: Any) -> Client:
    """A client of the store `--db` names; only with `create` may it make a new database."""
    return Client(args.db, create=create, **options)


class _FromEnv(str):
    """A default read from a variable: converted by argparse only when the flag is not
    given, and named in the error should it not convert."""

    variable: str


def _from_env(variable: str) -> _FromEnv | None:
    raw = os.environ.get(variable)
    if raw is None:
        return None
    value = _FromEnv(raw)
    value.variable = variable
    return value


def _converter(kind: Callable[[str], Any], *, many: bool) -> Callable[[str], Any]:
    """`kind` for the flag's own values; for a variable's value, the same conversion
    (each comma-separated item when `many`) with the variable named in its error."""

    def convert(text: str) -> Any:
        if not isinstance(text, _FromEnv):
            return _checked(kind, text)
        try:
            if many:
                return [_checked(kind, item.strip()) for item in text.split(",") if item.strip()]
            return _checked(kind, text)
        except argparse.ArgumentTypeError as exc:
            raise argparse.ArgumentTypeError(f"from {text.variable}={text!r}: {exc}") from None

    convert.__name__ = getattr(kind, "__name__", "value")
    return convert


def _checked(kind: Callable[[str], Any], text: str) -> Any:
    try:
        return kind(text)
    except argparse.ArgumentTypeError:
        raise
    except ValueError:
        what = "an integer" if kind is int else "a number" if kind is float else "valid"
        raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None


def choice(values: Sequence[str]) -> Callable[[str], str]:
    """A converter accepting one of `values` (checked for a variable's value too,
    which argparse's `choices` never sees)."""

    def convert(text: str) -> str:
        if text not in values:
            raise argparse.ArgumentTypeError(
                f"invalid choice: {text!r} (choose from {', '.join(values)})"
            )
        return text

    return convert


def flag_value(text: str) -> bool:
    """A boolean variable's value: 1/true/yes/on or 0/false/no/off."""
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {text!r} (1/0, true/false, yes/no, on/off)")


class _Flag(argparse.Action):
    """`--x` sets True, `--no-x` False: so a variable that turned it on can be turned
    off for one command. Its help is ours (argparse's own adds a default of its own)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        negated = [f"--no-{s[2:]}" for s in option_strings if s.startswith("--")]
        super().__init__([*option_strings, *negated], dest, nargs=0, **kwargs)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, not (option_string or "").startswith("--no-"))

    def format_usage(self) -> str:
        return " | ".join(self.option_strings)


class _Append(argparse.Action):
    """A repeatable option; given on the command line, it replaces the variable's list
    (argparse's own `append` would add to it)."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        current = getattr(namespace, self.dest, None)
        items = [] if current is self.default or not isinstance(current, list) else current
        setattr(namespace, self.dest, [*items, values])


def env_name(command: str | None, flag: str) -> str:
    """`TASKPOOL_<COMMAND>_<FLAG>`: `submit --timeout` is TASKPOOL_SUBMIT_TIMEOUT."""
    parts = [command, flag.lstrip("-")] if command else [flag.lstrip("-")]
    return ENV_PREFIX + "_".join(parts).replace("-", "_").upper()


def _shown(value: Any, *, secret: bool) -> str:
    if isinstance(value, list):
        value = ",".join(map(str, value)) or None
    if value is None:
        return "none"
    text = redact(str(value)) if secret else str(value)
    return text.replace("%", "%%")  # argparse %-formats help lines


def option(
    parser: argparse._ActionsContainer,
    flag: str,
    variable: str,
    help: str,
    *,
    short: str | None = None,
    type: Callable[[str], Any] = str,
    default: Any = None,
    kind: str = "value",
    secret: bool = False,
    suppress_default: bool = False,
    **kwargs: Any,
) -> argparse.Action:
    """An option settable by `variable` (its full name, `TASKPOOL_...`), with its
    default and variable on its help line. `kind`: "value", "flag" (`--x/--no-x`) or
    "append" (repeatable; the variable holds a comma-separated list).
    `suppress_default`: leave the namespace alone unless given (a global option
    repeated on a subcommand); `secret`: the help shows the value redacted."""
    from_env = _from_env(variable)
    many = kind == "append"
    if kind == "flag":
        type, default = flag_value, bool(default)
    elif many:
        default = [] if default is None else default
    shown = f"{_shown(default, secret=secret)}; env {variable}"
    if from_env is not None:
        shown = f"{_shown(from_env, secret=secret)} from {variable}"
    names = [flag] if short is None else [short, flag]
    action_class: Any = {"flag": _Flag, "append": _Append, "value": "store"}[kind]
    action: argparse.Action = parser.add_argument(
        *names,
        action=action_class,
        type=_converter(type, many=many),
        default=argparse.SUPPRESS
        if suppress_default
        else (from_env if from_env is not None else default),
        help=f"{help} [default: {shown}]",
        **kwargs,
    )
    action.env_variable = variable  # type: ignore[attr-defined]
    return action


def add_global_options(parser: argparse.ArgumentParser, *, on_subcommand: bool) -> None:
    """--db, --json, --show-env: on the main parser, and again on each subcommand
    (`taskpool ls --json`), where they change nothing unless given."""
    group: argparse._ActionsContainer = parser
    if on_subcommand:
        group = parser.add_argument_group("global options (also before the command)")
    option(
        group,
        "--db",
        "TASKPOOL_DB",
        "SQLite file or postgresql:// URL",
        default="taskpool.db",
        secret=True,
        suppress_default=on_subcommand,
    )
    option(
        group,
        "--json",
        "TASKPOOL_JSON",
        "print JSON instead of text",
        kind="flag",
        suppress_default=on_subcommand,
    )
    option(
        group,
        "--show-env",
        "TASKPOOL_SHOW_ENV",
        "show tasks' env values (masked otherwise: they may be secrets)",
        kind="flag",
        suppress_default=on_subcommand,
    )


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


def limit_options(
    parser: argparse.ArgumentParser, prefix: str, variable: Callable[[str], str]
) -> None:
    """--memory-max, --pids-max, --cpu-max; `variable` names each one's variable."""
    specs: list[tuple[str, str, Callable[[str], Any]]] = [
        ("--memory-max", "memory, e.g. 512M: OOM-killed past it", parse_size),
        ("--pids-max", "processes at once: forks past it fail", int),
        ("--cpu-max", "CPUs, e.g. 0.5", float),
    ]
    for flag, text, kind in specs:
        option(parser, flag, variable(flag), prefix + text, type=kind)


class UsageError(Exception):
    """Options that cannot work together, said in the CLI's own terms: exit 2, as
    argparse's own usage errors."""


def positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    """`kind`, refusing zero and below."""

    def convert(text: str) -> Any:
        value = _checked(kind, text)
        if not (value > 0 and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
        return value

    convert.__name__ = getattr(kind, "__name__", "value")
    return convert


def non_negative(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    """`kind`, refusing below zero."""

    def convert(text: str) -> Any:
        value = _checked(kind, text)
        if not (value >= 0 and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
        return value

    convert.__name__ = getattr(kind, "__name__", "value")
    return convert
