"""The guard process: the program the pool's `Guard` (_guard.py) starts, one per node.

It watches attempts, each with a deadline the pool renews at every heartbeat, and
kills an attempt whose deadline passes without a renewal (how, without ever hitting a
recycled pid: _guard_kill.py), and every attempt it watches when the pool process dies.
It talks to the pool over the socket on its stdin (_guard_protocol.py), single-threaded,
driven by `poll`. What it does is also logged to its stderr (the pool's), one line each.

Noticing the pool's death. The guard holds a pidfd on the pool process and also sees
EOF on its socket; either one makes it kill everything it watches and exit.
`PR_SET_PDEATHSIG` is not used: it fires when the parent *thread* that forked the
guard exits (an executor thread, a loop in a thread), not when the pool process dies,
so it would either kill a live node's attempts or, were the signal fatal to the
guard, leave them unguarded. The pidfd also works when a child forked without exec
(multiprocessing's fork) keeps the pool's end of the socket open, which hides the EOF.

`close` is an orderly stop: the guard kills whatever is still watched (in a correct
pool nothing is: each runner forgets its attempt before it ends, so a kill at close is
a bug made visible, not a process left unbounded), reports it, and exits.

Limits. The guard is a backup: the pool's own self-fencing stays the first line. The
guard cannot act while it is stopped itself (a paused VM stops everything; a SIGSTOP
sent to the pool's process group misses it: it runs in its own session). A dead guard
kills nothing: the pool must check `alive` (at each heartbeat) and act. Without
cgroups, a leader that had exited (unreaped) when the pool died is reaped by init at
once, and its group is then skipped: survivors of such a group are left to the next
boot's reconciliation. Log lines are written after the kills they report, but with
blocking writes: a stderr that nobody reads (a full pipe) would delay later kills.

How it runs: the pool runs this file as a script (`python -I -S .../_guard_process.py
--pool-pid PID`, its socket on fd 0). It and the modules it imports use the standard
library only, so it starts in tens of milliseconds and takes a few MiB; as a script it
imports its sibling modules without running the package's `__init__` (which imports
the pool and its dependencies). `python -m taskpool._guard_process --pool-pid PID`
runs the same code.
"""

from __future__ import annotations

import sys

if __name__ == "__main__" and not __package__:
    # Run as a script: the relative imports below need the package, whose `__init__`
    # would import anyio and the whole pool. An empty stand-in for it lets this module
    # and its standard-library-only siblings be imported by their own names.
    import os.path

    _package = type(sys)("taskpool")
    _package.__path__ = [os.path.dirname(os.path.abspath(__file__))]
    sys.modules["taskpool"] = _package
    from taskpool._guard_process import main as _main

    sys.exit(_main())

import array
import collections
import contextlib
import json
import math
import os
import select
import signal
import socket
import time

from . import _guard_protocol as protocol
from ._guard_kill import (
    HAS_PIDFD,
    KillPlan,
    Watched,
    execute,
    pidfd_pid,
    plan_kill,
    start_ticks,
)

TYPE_CHECKING = False
if TYPE_CHECKING:  # annotations only: the guard process imports as little as it can
    from collections.abc import Callable, Iterable, Mapping
    from typing import Any

#: The longest the guard sleeps: poll() takes an int of milliseconds, and a deadline may
#: lie far in the future.
MAX_SLEEP_S = 3600.0
#: Without a pidfd on the pool, how often the guard checks that its parent lives.
PARENT_POLL_S = 0.5
# Why the guard killed an attempt (the `why` of its `kill` reports).
LEASE_EXPIRED = "lease deadline passed without a renewal"
POOL_DIED = "the pool process died"
#: A dying process closes its files before it turns into a zombie, so the guard often
#: sees this EOF before the pool's pidfd says it died; it does not wait to tell which.
POOL_HUNG_UP = "the pool closed the guard's socket (it died, or dropped the guard unclosed)"
GUARD_CLOSED = "the guard was closed"
_FD_SIZE = array.array("i").itemsize


class GuardProcess:
    """The guard's state and its loop: single-threaded, driven by `poll`."""

    def __init__(
        self,
        sock: socket.socket,
        pool_pid: int,
        pool_pidfd: int | None,
        log: Callable[[str], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.sock = sock
        self.pool_pid = pool_pid
        self.pool_pidfd = pool_pidfd
        self.log = log
        self.clock = clock
        self.watched: dict[str, Watched] = {}
        self.fds: collections.deque[int] = collections.deque()  # received, not yet claimed
        self.lines = protocol.Lines()
        self.outbox = bytearray()
        self.pings: list[object] = []
        self.closing = False
        self.peer_gone = False

    # Replies never block: what the socket does not take waits for POLLOUT.
    def reply(self, message: bytes) -> None:
        self.outbox += message
        self.flush()

    def flush(self) -> None:
        while self.outbox and not self.peer_gone:
            try:
                sent = self.sock.send(self.outbox)
            except BlockingIOError:
                return
            except OSError:  # the pool is gone; its death is handled by the loop
                self.peer_gone = True
                self.outbox.clear()
                return
            del self.outbox[:sent]

    def receive(self) -> bool:
        """Read and handle everything available; False at EOF (the pool's end closed)."""
        while True:
            try:
                data, ancdata, flags, _ = self.sock.recvmsg(
                    1 << 18, socket.CMSG_SPACE(64 * _FD_SIZE)
                )
            except BlockingIOError:
                return True
            except OSError:
                return False
            for level, kind, cdata in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds = array.array("i")
                    fds.frombytes(cdata[: len(cdata) - len(cdata) % _FD_SIZE])
                    self.fds.extend(fds)
            if flags & socket.MSG_CTRUNC:
                self.log("some pidfds were lost (control data truncated)")
            if not data:
                return False
            for line in self.lines.feed(data):
                try:
                    self.handle(line)
                except protocol.BadMessage as exc:
                    self.log(f"ignored a bad message ({exc}): {line[:120]!r}")
                except Exception as exc:  # the guard must outlive any input: never crash
                    self.log(f"ignored a message that failed ({exc!r}): {line[:120]!r}")

    def handle(self, line: bytes) -> None:
        request = protocol.read_request(line)
        op = request.get("op")
        if op == protocol.RENEW:
            for key, deadline in protocol.read_renew(request).items():
                watched = self.watched.get(key)
                if watched is not None:
                    watched.deadline = deadline
        elif op == protocol.WATCH:
            self.watch(request)
        elif op == protocol.FORGET:
            watched = self.watched.pop(protocol.read_forget(request), None)
            if watched is not None:
                self.release(watched)
        elif op == protocol.PING:
            self.pings.append(protocol.read_ping(request))
        elif op == protocol.CLOSE:
            self.closing = True
        else:
            raise protocol.BadMessage(f"unknown op {op!r}")

    def watch(self, request: Mapping[str, Any]) -> None:
        # A pidfd sent with this line arrived with (or before) its first byte; take it
        # first, so that a bad line never leaves its fd to be taken by the next one.
        pidfd = self.fds.popleft() if protocol.carries_pidfd(request) and self.fds else None
        try:
            w = protocol.read_watch(request, refused_pids=(os.getpid(), self.pool_pid))
            if pidfd is not None and pidfd_pid(pidfd) not in (w.pid, -1):
                raise protocol.BadMessage("the pidfd sent does not refer to pid")
        except protocol.BadMessage:
            if pidfd is not None:
                os.close(pidfd)
            raise
        # Sent while the leader was unreaped; if it has since been reaped and its pid
        # reused, the start time differs: never signal that group.
        seen_reaped = w.pid is not None and w.ticks is not None and start_ticks(w.pid) != w.ticks
        old = self.watched.pop(w.key, None)
        if old is not None:
            self.release(old)
        self.watched[w.key] = Watched(
            w.key, w.pid, w.ticks, pidfd, w.cgroup, w.deadline, seen_reaped
        )

    def release(self, watched: Watched) -> None:
        if watched.pidfd is not None:
            os.close(watched.pidfd)
            watched.pidfd = None

    def kill(self, victims: Iterable[Watched], why: str) -> None:
        """Decide, report, then kill: the report is in the pool's socket before any
        signal, so a pool that sees its leader die can read who killed it. Every kill is
        sent before anything is logged (stderr might be slow)."""
        victims = list(victims)
        now = self.clock()
        plans = []
        for w in victims:
            self.watched.pop(w.key, None)
            plan = plan_kill(w)
            plans.append(plan)
            self.reply(
                protocol.kill(w.key, at=now, deadline=w.deadline, why=why, targets=plan.describe())
            )
        done = [self._execute(plan) for plan in plans]
        for w, what in zip(victims, done, strict=True):
            late = now - w.deadline
            self.log(
                f"killed attempt {w.key}: {why}"
                + (f" (deadline passed {late:.3f} s ago)" if why == LEASE_EXPIRED else "")
                + f": {'; '.join(what)}"
            )
            self.release(w)

    def _execute(self, plan: KillPlan) -> list[str]:
        try:
            return execute(plan)
        except Exception as exc:  # one failed kill must not stop the others
            return [f"failed: {exc!r}"]

    def expire(self) -> None:
        now = self.clock()
        due = [w for w in self.watched.values() if w.deadline <= now]
        if due:
            self.kill(due, LEASE_EXPIRED)

    def timeout_ms(self) -> int:
        waits = [MAX_SLEEP_S]
        if self.watched:
            waits.append(max(0.0, min(w.deadline for w in self.watched.values()) - self.clock()))
        if self.pool_pidfd is None:
            waits.append(PARENT_POLL_S)
        # Round up: waking a millisecond early would only loop once more.
        return math.ceil(min(waits) * 1000)

    def pool_died(self, pidfd_fired: bool) -> bool:
        if self.pool_pidfd is not None:
            return pidfd_fired
        return os.getppid() != self.pool_pid  # reparented: the pool is gone

    def serve(self) -> int:
        self.reply(protocol.ready(os.getpid()))
        poller = select.poll()
        if self.pool_pidfd is not None:
            poller.register(self.pool_pidfd, select.POLLIN)
        while True:
            poller.register(self.sock, select.POLLIN | (select.POLLOUT if self.outbox else 0))
            events = dict(poller.poll(self.timeout_ms()))
            if events.get(self.sock.fileno(), 0) & select.POLLOUT:
                self.flush()
            if self.pool_died(self.pool_pidfd in events):
                # What the pool sent before it died is still in the socket: a watch
                # sent just before a SIGKILL must be read, or that attempt is missed.
                self.receive()
                self.kill(self.watched.values(), POOL_DIED)
                return 0
            if not self.receive():
                self.kill(self.watched.values(), POOL_HUNG_UP)
                return 0
            self.expire()  # after the messages: a renewal that arrived in time counts
            for seq in self.pings:
                self.reply(protocol.pong(seq, self.clock()))
            self.pings.clear()
            if self.closing:
                killed = len(self.watched)
                self.kill(self.watched.values(), GUARD_CLOSED)
                self.reply(protocol.closed(killed))
                self._flush_before_exit()
                return 0

    def _flush_before_exit(self) -> None:
        deadline = time.monotonic() + 1.0  # the pool is waiting for us; it reads
        while self.outbox and not self.peer_gone and time.monotonic() < deadline:
            select.select([], [self.sock], [], 0.05)
            self.flush()


def argv(pool_pid: int) -> list[str]:
    """The command line that starts the guard for the pool process `pool_pid`."""
    pool = ["--pool-pid", str(pool_pid)]
    here = os.path.abspath(__file__)
    if os.path.isfile(here):  # -I: no PYTHON* variables, no user site; -S: no site at all
        return [sys.executable, "-I", "-S", here, *pool]
    return [sys.executable, "-I", "-m", __name__, *pool]  # pragma: no cover - zipped


def main(args: list[str] | None = None) -> int:
    """The guard process: `--pool-pid PID`, its socket on fd 0."""
    args = sys.argv[1:] if args is None else args
    if len(args) != 2 or args[0] != "--pool-pid" or not args[1].isdigit():
        print("usage: _guard_process.py --pool-pid PID (socket on stdin)", file=sys.stderr)
        return 2
    pool_pid = int(args[1])
    me = os.getpid()

    # A worker logging JSON (`taskpool worker --log-format json`) wants every line so.
    as_json = os.environ.get("TASKPOOL_LOG_FORMAT") == "json"

    def log(text: str) -> None:
        line = f"taskpool guard {me}: {text}"
        if as_json:
            entry = {"ts": round(time.time(), 6), "level": "info", "logger": "taskpool.guard"}
            line = json.dumps({**entry, "message": line, "guard_pid": me})
        with contextlib.suppress(OSError, ValueError):
            print(line, file=sys.stderr, flush=True)

    # A terminal's Ctrl-C goes to the pool, which shuts down in order; not to us (we
    # run in our own session anyway).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    pool_pidfd = None
    if HAS_PIDFD:
        with contextlib.suppress(OSError):
            pool_pidfd = os.pidfd_open(pool_pid)
    # Checked after opening the pidfd: if our parent is still the pool now, the pidfd
    # is the pool's, not a process that reused its pid.
    if os.getppid() != pool_pid:
        log("the pool process is gone already")
        return 1
    sock = socket.socket(fileno=os.dup(0))
    os.close(0)
    os.open(os.devnull, os.O_RDONLY)  # fd 0 stays taken, by nothing
    sock.setblocking(False)
    return GuardProcess(sock, pool_pid, pool_pidfd, log).serve()


if __name__ == "__main__":
    sys.exit(main())
