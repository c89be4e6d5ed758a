"""The guard's wire protocol: every message between the pool and its guard process is
built by one function here and read by one function here, so both sides agree on
names and fields.

One JSON object per line, both ways, on one Unix socket pair (the guard's stdin). Pool
to guard, named by their `op`: `watch` (which may carry the leader's pidfd, sent with
its first byte as SCM_RIGHTS), `renew`, `forget`, `ping`, `close`. Guard to pool,
named by their first field: `ready`, `kill` (written *before* the signals are sent, so
a pool that sees its leader die can already read who killed it), `pong`, `closed`.
A bad line is logged by the guard and ignored. Writes never block either side: what
the socket does not take now is kept and sent at the next call (the pool) or when the
socket is writable (the guard).

Standard library only, and little of it: the guard process imports this module.
"""

from __future__ import annotations

import json
import math
import os

TYPE_CHECKING = False
if TYPE_CHECKING:  # annotations only: the guard process imports as little as it can
    from collections.abc import Container, Iterable, Mapping
    from typing import Any

#: Largest message either side accepts; a renewal of 100,000 attempts is ~6 MB.
MAX_LINE_BYTES = 32 * 1024 * 1024
#: Attempt keys longer than this are refused (a marker is ~45 characters).
MAX_KEY_CHARS = 512
#: Linux's largest possible pid (PID_MAX_LIMIT on 64-bit).
PID_MAX_LIMIT = 4 * 1024 * 1024

# Requests (pool to guard), by their "op".
WATCH = "watch"
RENEW = "renew"
FORGET = "forget"
PING = "ping"
CLOSE = "close"
# Replies (guard to pool), by the field that names them.
READY = "ready"
KILL = "kill"
PONG = "pong"
CLOSED = "closed"


def _encode(message: Mapping[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


class Lines:
    """Splits a byte stream into lines, dropping one that grows past MAX_LINE_BYTES."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._skipping = False  # inside a line too long to keep

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        lines = []
        while True:
            end = self._buf.find(b"\n")
            if end < 0:
                break
            line = bytes(self._buf[:end])
            del self._buf[: end + 1]
            if self._skipping:
                self._skipping = False  # the tail of the dropped line
                continue
            lines.append(line)
        if len(self._buf) > MAX_LINE_BYTES:
            self._buf.clear()
            self._skipping = True
            lines.append(b"")  # reported as a bad (empty) message
        return lines


# -- pool to guard: built by the pool ------------------------------------------------
def watch(
    key: str,
    *,
    pid: int | None,
    ticks: int | None,
    cgroup: str | None,
    deadline: float,
    with_pidfd: bool,
) -> bytes:
    return _encode(
        {
            "op": WATCH,
            "key": key,
            "pid": pid,
            "ticks": ticks,
            "cgroup": cgroup,
            "deadline": deadline,
            "pidfd": with_pidfd,
        }
    )


def renew(deadlines: Mapping[str, float]) -> bytes:
    return _encode({"op": RENEW, "deadlines": dict(deadlines)})


def forget(key: str) -> bytes:
    return _encode({"op": FORGET, "key": key})


def ping(seq: int) -> bytes:
    return _encode({"op": PING, "seq": seq})


def close() -> bytes:
    return _encode({"op": CLOSE})


# -- pool to guard: read by the guard, which trusts nothing it reads -----------------
# Plain classes, not dataclasses, on the guard's side: `dataclasses` imports `inspect`,
# which would double the guard's start time and add megabytes to each node.
class BadMessage(ValueError):
    pass


class Watch:
    """A checked `watch` request."""

    __slots__ = ("cgroup", "deadline", "key", "pid", "ticks")

    def __init__(
        self, key: str, pid: int | None, ticks: int | None, cgroup: str | None, deadline: float
    ) -> None:
        self.key = key
        self.pid = pid
        self.ticks = ticks
        self.cgroup = cgroup
        self.deadline = deadline


def read_request(line: bytes) -> dict[str, Any]:
    """A request as a JSON object; its `op` says which reader below checks the rest."""
    try:
        message = json.loads(line)
    except (ValueError, RecursionError) as exc:
        raise BadMessage("not JSON") from exc
    if not isinstance(message, dict):
        raise BadMessage("not an object")
    return message


def carries_pidfd(request: Mapping[str, Any]) -> bool:
    """Whether a `watch` says a pidfd was sent with it (taken even if the rest is bad)."""
    return request.get("pidfd") is True


def read_watch(request: Mapping[str, Any], *, refused_pids: Container[int]) -> Watch:
    key = _key(request.get("key"))
    pid = request.get("pid")
    if pid is None and request.get("cgroup") is None:
        raise BadMessage("neither a pid nor a cgroup")
    if pid is not None and (
        isinstance(pid, bool) or not isinstance(pid, int) or not 1 < pid <= PID_MAX_LIMIT
    ):
        raise BadMessage("pid is not a process id")
    if pid in refused_pids:
        raise BadMessage("pid is the guard's or the pool's")
    ticks = request.get("ticks")
    if ticks is not None and (isinstance(ticks, bool) or not isinstance(ticks, int)):
        raise BadMessage("ticks is not an integer")
    cgroup = request.get("cgroup")
    if cgroup is not None and (
        not isinstance(cgroup, str)
        or not os.path.isabs(cgroup)
        or "\0" in cgroup
        or ".." in cgroup.split("/")
    ):
        raise BadMessage("cgroup is not an absolute path")
    deadline = _number(request.get("deadline"), "deadline")
    return Watch(key, pid, ticks, cgroup, deadline)


def read_renew(request: Mapping[str, Any]) -> dict[str, float]:
    deadlines = request.get("deadlines")
    if not isinstance(deadlines, dict):
        raise BadMessage("deadlines is not an object")
    # Checked whole before any is applied: a bad message changes nothing.
    return {key: _number(value, "deadline") for key, value in deadlines.items()}


def read_forget(request: Mapping[str, Any]) -> str:
    return _key(request.get("key"))


def read_ping(request: Mapping[str, Any]) -> object:
    return request.get("seq")  # echoed back as it came


def _number(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadMessage(f"{what} is not a number")
    try:
        number = float(value)  # an int too large for a float raises
    except OverflowError as exc:
        raise BadMessage(f"{what} is out of range") from exc
    if not math.isfinite(number):
        raise BadMessage(f"{what} is not finite")
    return number


def _key(value: object) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_KEY_CHARS:
        raise BadMessage("key is not a short non-empty string")
    return value


# -- guard to pool: built by the guard -----------------------------------------------
def ready(pid: int) -> bytes:
    return _encode({READY: pid})


def kill(key: str, *, at: float, deadline: float, why: str, targets: Iterable[str]) -> bytes:
    targets = list(targets)
    return _encode({KILL: key, "at": at, "deadline": deadline, "why": why, "targets": targets})


def pong(seq: object, now: float) -> bytes:
    return _encode({PONG: seq, "now": now})


def closed(killed: int) -> bytes:
    return _encode({CLOSED: killed})


# -- guard to pool: read by the pool, which trusts its own guard ---------------------
class Kill:
    """A `kill` report: the guard killed attempt `key` (or is about to: sent first)."""

    __slots__ = ("at", "deadline", "key", "targets", "why")

    def __init__(
        self, key: str, at: float, deadline: float, why: str, targets: tuple[str, ...]
    ) -> None:
        self.key = key
        self.at = at  # the guard's time.monotonic() when it decided
        self.deadline = deadline
        self.why = why
        self.targets = targets


def read_reply(line: bytes) -> tuple[str, Any] | None:
    """`(kind, value)` of a reply: `(KILL, Kill)`, `(PONG, (seq, now))`, `(READY, pid)`,
    `(CLOSED, attempts killed)`; None for an unknown reply. Raises ValueError, TypeError
    or KeyError on a malformed one (which its own guard never sends)."""
    message = json.loads(line)
    if KILL in message:
        return KILL, Kill(
            message[KILL],
            message["at"],
            message["deadline"],
            message["why"],
            tuple(message["targets"]),
        )
    if PONG in message:
        return PONG, (message[PONG], message["now"])
    if READY in message:
        return READY, message[READY]
    if CLOSED in message:
        return CLOSED, message[CLOSED]
    return None
