"""The node's guard: a helper process that kills attempts whose lease ran out.

A pool that is frozen (SIGSTOP, a stuck event loop, a debugger) cannot stop its
children, which are not frozen with it; a pool that dies leaves them running. Either
way they would run on beside the copy another node starts once it rescues the lease.
The guard is one small process per node, outside the pool's process and event loop:
the pool tells it, for each attempt, how to kill it and when its lease runs out, and
renews those deadlines with one message per heartbeat. The guard kills an attempt
whose deadline passes without a renewal, and every attempt it watches when the pool
process dies. So no attempt's processes outlive its lease, whatever the pool does.

Use from the pool (all calls but `start`, `sync` and `close` are synchronous, never
block and never raise because of the guard; a dead guard shows as `alive == False`)::

    guard = await Guard.start()                 # once per node, at boot
    guard.watch(key, leader_pid=pid, cgroup=path_or_None, deadline=lease_deadline)
    guard.renew({key: new_deadline, ...})       # once per heartbeat, all attempts
    kill = guard.forget(key)                    # when the leader has exited, BEFORE reaping it;
                                                # a GuardKill if the guard killed it, else None
    await guard.close()                         # at shutdown, after every runner ended

`key` is the attempt identity `<store_id>:<task_id>:<fence>`. Deadlines are
`time.monotonic()` values (CLOCK_MONOTONIC is system-wide, so both processes read
the same clock; `anyio.current_time()` is that clock on asyncio but not on trio). The
guard kills *at* the deadline it is given: pass the lease deadline minus a margin for
the kill itself, later than the pool's own self-fencing so that the pool, when it can,
stops its attempts first and records why.

Identity. The pool calls `watch` while the leader is its unreaped child (so its pid
is still the leader's), and `forget` before it reaps it. `watch` opens a pidfd on the
leader there and then and passes it to the guard over the socket (SCM_RIGHTS), with
the leader's start time in clock ticks: the guard signals a process group only while
that very leader is alive or a zombie, when its pid (which is the group's id, the
runner starts each attempt in a new session) cannot have been reused. If the leader
was reaped, the group is skipped and the log says so: a recycled pid is never killed.
An attempt's cgroup is killed whatever became of its leader (`cgroup.kill`; where
that file is missing, freeze the cgroup, SIGKILL every process in it, thaw).

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

Protocol: one JSON object per line, both ways, on one Unix socket pair (the guard's
stdin). Pool to guard: `watch`, `renew`, `forget`, `ping`, `close`. Guard to pool:
`ready`, `kill` (written *before* the signals are sent, so a pool that sees its
leader die can already read who killed it), `pong`, `closed`. What the guard does is
also logged to its stderr (the pool's), one line each. A bad line is logged and
ignored. Writes never block either side: what the socket does not take now is kept
and sent at the next call (the pool) or when the socket is writable (the guard).

Limits. The guard is a backup: the pool's own self-fencing stays the first line. The
guard cannot act while it is stopped itself (a paused VM stops everything; a SIGSTOP
sent to the pool's process group misses it: it runs in its own session). A dead guard
kills nothing: the pool must check `alive` (at each heartbeat) and act. Without
cgroups, a leader that had exited (unreaped) when the pool died is reaped by init at
once, and its group is then skipped: survivors of such a group are left to the next
boot's reconciliation. Log lines are written after the kills they report, but with
blocking writes: a stderr that nobody reads (a full pipe) would delay later kills.

The guard process runs this file as a script (`python -I -S .../_guard.py`): it
imports the standard library only, so it starts in tens of milliseconds and takes a
few MiB; `python -m taskpool._guard --pool-pid PID` runs the same code.
"""

from __future__ import annotations

import array
import collections
import contextlib
import json
import math
import os
import select
import signal
import socket
import sys
import time

TYPE_CHECKING = False
if TYPE_CHECKING:  # annotations only: the guard process imports as little as it can
    from collections.abc import Callable, Iterable, Mapping
    from typing import IO, Any

#: Largest message either side accepts; a renewal of 100,000 attempts is ~6 MB.
MAX_LINE_BYTES = 32 * 1024 * 1024
#: Attempt keys longer than this are refused (a marker is ~45 characters).
MAX_KEY_CHARS = 512
#: The cgroup freeze fallback gives up after this long (a process stuck in the kernel).
FREEZE_KILL_BUDGET_S = 1.0
#: Linux's largest possible pid (PID_MAX_LIMIT on 64-bit).
PID_MAX_LIMIT = 4 * 1024 * 1024
#: The longest the guard sleeps: poll() takes an int of milliseconds, and a deadline may
#: lie far in the future.
MAX_SLEEP_S = 3600.0
#: Without a pidfd on the pool, how often the guard checks that its parent lives.
PARENT_POLL_S = 0.5
HAS_PIDFD = hasattr(os, "pidfd_open")
LEASE_EXPIRED = "lease deadline passed without a renewal"
POOL_DIED = "the pool process died"
#: A dying process closes its files before it turns into a zombie, so the guard often
#: sees this EOF before the pool's pidfd says it died; it does not wait to tell which.
POOL_HUNG_UP = "the pool closed the guard's socket (it died, or dropped the guard unclosed)"
GUARD_CLOSED = "the guard was closed"
_FD_SIZE = array.array("i").itemsize


# -- shared helpers (both processes) -------------------------------------------
def start_ticks(pid: int) -> int | None:
    """The start time of `pid` in clock ticks since boot (/proc/<pid>/stat field 22),
    or None if there is no such process. Exact, unlike a float of seconds: a pid that
    was reused has another value (unless reused within the same tick)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    try:
        # The command name may contain spaces and parentheses: split after the last ")".
        return int(stat[stat.rindex(b")") + 2 :].split()[19])
    except (ValueError, IndexError):
        return None


def _encode(message: Mapping[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


class _Lines:
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


# -- the guard process -----------------------------------------------------------
# Plain classes, not dataclasses, on this side: `dataclasses` imports `inspect`, which
# would double the guard's start time and add megabytes to each node.
class _Watched:
    __slots__ = ("cgroup", "deadline", "key", "leader_seen_reaped", "pid", "pidfd", "ticks")

    def __init__(
        self,
        key: str,
        pid: int | None,  # None: a whole cgroup with no leader of its own (a node's)
        ticks: int | None,  # the leader's start time in ticks, read by the pool at watch time
        pidfd: int | None,  # a pidfd on the leader, opened by the pool while it was unreaped
        cgroup: str | None,
        deadline: float,
        leader_seen_reaped: bool = False,  # at receipt its pid already named another process
    ) -> None:
        self.key = key
        self.pid = pid
        self.ticks = ticks
        self.pidfd = pidfd
        self.cgroup = cgroup
        self.deadline = deadline
        self.leader_seen_reaped = leader_seen_reaped


class KillPlan:
    """What killing one attempt will do, decided before any signal is sent."""

    __slots__ = ("cgroup", "group", "pidfd", "skipped")

    def __init__(
        self,
        cgroup: str | None,
        group: int | None,  # a process group to SIGKILL (its leader is verified)
        pidfd: int | None,  # the leader's pidfd, to SIGKILL it race-free
        skipped: str | None,  # why the process group is not signalled
    ) -> None:
        self.cgroup = cgroup
        self.group = group
        self.pidfd = pidfd
        self.skipped = skipped

    def describe(self) -> list[str]:
        what = []
        if self.cgroup is not None:
            what.append(f"cgroup {self.cgroup}")
        if self.group is not None:
            what.append(f"process group {self.group}")
        if self.skipped is not None:
            what.append(self.skipped)
        return what


def leader_unreaped(w: _Watched) -> bool:
    """True while the watched leader is alive or a zombie: its pid, which is its group's
    id, cannot have been reused, so signalling the group reaches that attempt only."""
    if w.leader_seen_reaped or w.pid is None:
        return False
    if w.pidfd is not None:
        try:
            signal.pidfd_send_signal(w.pidfd, 0)  # ESRCH once the leader is reaped
        except ProcessLookupError:
            return False
        except OSError:
            pass  # no pidfd_send_signal here: fall back to the start time
        else:
            return True
    return w.ticks is not None and start_ticks(w.pid) == w.ticks


def plan_kill(w: _Watched) -> KillPlan:
    if w.pid is None:
        return KillPlan(w.cgroup, None, None, None)
    if leader_unreaped(w):
        return KillPlan(w.cgroup, w.pid, w.pidfd, None)
    return KillPlan(w.cgroup, None, None, f"process group {w.pid} skipped: its leader was reaped")


def _write_file(path: str, data: str) -> None:
    with open(path, "w") as f:
        f.write(data)


def _cgroup_pids(path: str) -> list[int]:
    with open(os.path.join(path, "cgroup.procs")) as f:
        return [int(line) for line in f.read().split()]


def kill_cgroup(path: str, *, use_kill_file: bool = True) -> str:
    """SIGKILL every process in a cgroup v2; say how (or why not).

    `cgroup.kill` (Linux >= 5.14) kills the whole cgroup atomically, racing forks
    included. Without it: freeze the cgroup so nothing in it can fork, SIGKILL each
    process listed in `cgroup.procs` until none is left (a fatal signal reaches a
    frozen process in cgroup v2), then thaw it."""
    if use_kill_file:
        try:
            _write_file(os.path.join(path, "cgroup.kill"), "1")
            return "cgroup.kill"
        except FileNotFoundError:
            if not os.path.isdir(path):
                return "cgroup already removed"
        except OSError as exc:
            return f"cgroup.kill failed: {exc.strerror or exc}"
    try:
        _write_file(os.path.join(path, "cgroup.freeze"), "1")
        frozen = True
    except OSError:
        frozen = False  # Linux < 5.2: kill in rounds, racing forks
    killed: set[int] = set()
    give_up = time.monotonic() + FREEZE_KILL_BUDGET_S
    try:
        while True:
            try:
                pids = _cgroup_pids(path)
            except FileNotFoundError:
                break
            if not pids or time.monotonic() > give_up:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)  # listed in the cgroup: ours at this moment
                killed.add(pid)
            time.sleep(0.001)  # let the kills land before listing again
    except OSError as exc:
        return f"freeze and kill failed: {exc.strerror or exc}"
    finally:
        if frozen:
            with contextlib.suppress(OSError):
                _write_file(os.path.join(path, "cgroup.freeze"), "0")
    how = "frozen, then" if frozen else "not frozen (no cgroup.freeze),"
    return f"{how} SIGKILL to {len(killed)} processes"


def execute(plan: KillPlan) -> list[str]:
    """Send the kills of `plan`; return what was done, for the log."""
    done = []
    if plan.cgroup is not None:
        done.append(f"cgroup {plan.cgroup}: {kill_cgroup(plan.cgroup)}")
    if plan.group is not None:
        if plan.pidfd is not None:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(plan.pidfd, signal.SIGKILL)
        try:
            os.killpg(plan.group, signal.SIGKILL)
            done.append(f"process group {plan.group}: SIGKILL")
        except ProcessLookupError:
            done.append(f"process group {plan.group}: already empty")
        except OSError as exc:
            done.append(f"process group {plan.group}: {exc.strerror or exc}")
    if plan.skipped is not None:
        done.append(plan.skipped)
    return done


class _BadMessage(ValueError):
    pass


def _number(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _BadMessage(f"{what} is not a number")
    try:
        number = float(value)  # an int too large for a float raises
    except OverflowError as exc:
        raise _BadMessage(f"{what} is out of range") from exc
    if not math.isfinite(number):
        raise _BadMessage(f"{what} is not finite")
    return number


def _key(value: object) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_KEY_CHARS:
        raise _BadMessage("key is not a short non-empty string")
    return value


def _pidfd_pid(fd: int) -> int | None:
    """The pid a pidfd refers to (-1 once reaped), from /proc/self/fdinfo."""
    try:
        with open(f"/proc/self/fdinfo/{fd}") as f:
            for line in f:
                if line.startswith("Pid:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


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
        self.watched: dict[str, _Watched] = {}
        self.fds: collections.deque[int] = collections.deque()  # received, not yet claimed
        self.lines = _Lines()
        self.outbox = bytearray()
        self.pings: list[object] = []
        self.closing = False
        self.peer_gone = False

    # Replies never block: what the socket does not take waits for POLLOUT.
    def reply(self, message: Mapping[str, Any]) -> None:
        self.outbox += _encode(message)
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
                except _BadMessage as exc:
                    self.log(f"ignored a bad message ({exc}): {line[:120]!r}")
                except Exception as exc:  # the guard must outlive any input: never crash
                    self.log(f"ignored a message that failed ({exc!r}): {line[:120]!r}")

    def handle(self, line: bytes) -> None:
        try:
            message = json.loads(line)
        except (ValueError, RecursionError) as exc:
            raise _BadMessage("not JSON") from exc
        if not isinstance(message, dict):
            raise _BadMessage("not an object")
        op = message.get("op")
        if op == "renew":
            deadlines = message.get("deadlines")
            if not isinstance(deadlines, dict):
                raise _BadMessage("deadlines is not an object")
            # Checked whole before any is applied: a bad message changes nothing.
            checked = {key: _number(value, "deadline") for key, value in deadlines.items()}
            for key, deadline in checked.items():
                watched = self.watched.get(key)
                if watched is not None:
                    watched.deadline = deadline
        elif op == "watch":
            self.watch(message)
        elif op == "forget":
            watched = self.watched.pop(_key(message.get("key")), None)
            if watched is not None:
                self.release(watched)
        elif op == "ping":
            self.pings.append(message.get("seq"))
        elif op == "close":
            self.closing = True
        else:
            raise _BadMessage(f"unknown op {op!r}")

    def watch(self, message: Mapping[str, Any]) -> None:
        # A pidfd sent with this line arrived with (or before) its first byte; take it
        # first, so that a bad line never leaves its fd to be taken by the next one.
        pidfd = self.fds.popleft() if message.get("pidfd") is True and self.fds else None
        try:
            key = _key(message.get("key"))
            pid = message.get("pid")
            if pid is None and message.get("cgroup") is None:
                raise _BadMessage("neither a pid nor a cgroup")
            if pid is not None and (
                isinstance(pid, bool) or not isinstance(pid, int) or not 1 < pid <= PID_MAX_LIMIT
            ):
                raise _BadMessage("pid is not a process id")
            if pid in (os.getpid(), self.pool_pid):
                raise _BadMessage("pid is the guard's or the pool's")
            ticks = message.get("ticks")
            if ticks is not None and (isinstance(ticks, bool) or not isinstance(ticks, int)):
                raise _BadMessage("ticks is not an integer")
            cgroup = message.get("cgroup")
            if cgroup is not None and (
                not isinstance(cgroup, str)
                or not os.path.isabs(cgroup)
                or "\0" in cgroup
                or ".." in cgroup.split("/")
            ):
                raise _BadMessage("cgroup is not an absolute path")
            deadline = _number(message.get("deadline"), "deadline")
            if pidfd is not None and _pidfd_pid(pidfd) not in (pid, -1):
                raise _BadMessage("the pidfd sent does not refer to pid")
        except _BadMessage:
            if pidfd is not None:
                os.close(pidfd)
            raise
        # Sent while the leader was unreaped; if it has since been reaped and its pid
        # reused, the start time differs: never signal that group.
        seen_reaped = pid is not None and ticks is not None and start_ticks(pid) != ticks
        old = self.watched.pop(key, None)
        if old is not None:
            self.release(old)
        self.watched[key] = _Watched(key, pid, ticks, pidfd, cgroup, deadline, seen_reaped)

    def release(self, watched: _Watched) -> None:
        if watched.pidfd is not None:
            os.close(watched.pidfd)
            watched.pidfd = None

    def kill(self, victims: Iterable[_Watched], why: str) -> None:
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
                {
                    "kill": w.key,
                    "at": now,
                    "deadline": w.deadline,
                    "why": why,
                    "targets": plan.describe(),
                }
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
        self.reply({"ready": os.getpid()})
        poller = select.poll()
        if self.pool_pidfd is not None:
            poller.register(self.pool_pidfd, select.POLLIN)
        while True:
            poller.register(self.sock, select.POLLIN | (select.POLLOUT if self.outbox else 0))
            events = dict(poller.poll(self.timeout_ms()))
            if events.get(self.sock.fileno(), 0) & select.POLLOUT:
                self.flush()
            if self.pool_died(self.pool_pidfd in events):
                self.kill(self.watched.values(), POOL_DIED)
                return 0
            if not self.receive():
                self.kill(self.watched.values(), POOL_HUNG_UP)
                return 0
            self.expire()  # after the messages: a renewal that arrived in time counts
            for seq in self.pings:
                self.reply({"pong": seq, "now": self.clock()})
            self.pings.clear()
            if self.closing:
                killed = len(self.watched)
                self.kill(self.watched.values(), GUARD_CLOSED)
                self.reply({"closed": killed})
                self._flush_before_exit()
                return 0

    def _flush_before_exit(self) -> None:
        deadline = time.monotonic() + 1.0  # the pool is waiting for us; it reads
        while self.outbox and not self.peer_gone and time.monotonic() < deadline:
            select.select([], [self.sock], [], 0.05)
            self.flush()


def main(argv: list[str] | None = None) -> int:
    """The guard process: `--pool-pid PID`, its socket on fd 0."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] != "--pool-pid" or not args[1].isdigit():
        print("usage: _guard.py --pool-pid PID (socket on stdin)", file=sys.stderr)
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

# -- the pool side -----------------------------------------------------------------
# Never run in the guard process, which exits above: these imports cost it nothing.
import subprocess  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import anyio  # noqa: E402

from ._errors import TaskpoolError  # noqa: E402


class GuardError(TaskpoolError):
    """The guard process could not be started or stopped answering."""


@dataclass(frozen=True, slots=True)
class GuardKill:
    """The guard killed an attempt (it reports this before sending the signals)."""

    key: str
    at: float  # time.monotonic() when the guard decided
    deadline: float  # the deadline it had for the attempt
    why: str
    targets: tuple[str, ...]  # "cgroup /sys/...", "process group 1234", or why one was skipped


@dataclass(slots=True)
class _Outgoing:
    data: bytes
    pidfd: int | None = None  # sent with the first byte, then closed here
    sent: int = 0  # bytes of `data` the socket took so far


def _guard_argv() -> list[str]:
    pool = ["--pool-pid", str(os.getpid())]
    here = os.path.abspath(__file__)
    if os.path.isfile(here):  # -I: no PYTHON* variables, no user site; -S: no site at all
        return [sys.executable, "-I", "-S", here, *pool]
    return [sys.executable, "-I", "-m", "taskpool._guard", *pool]  # pragma: no cover - zipped


def _spawn(stderr: int | IO[Any] | None) -> tuple[subprocess.Popen[bytes], socket.socket]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        popen = subprocess.Popen(
            _guard_argv(),
            stdin=theirs.fileno(),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            close_fds=True,
            # Its own session: a terminal's signals (Ctrl-C) reach the pool only.
            start_new_session=True,
        )
    except OSError as exc:
        ours.close()
        raise GuardError(f"could not start the guard process: {exc}") from exc
    finally:
        theirs.close()
    ours.setblocking(False)
    return popen, ours


class Guard:
    """The pool's handle on its guard process. See the module docstring."""

    def __init__(self, popen: subprocess.Popen[bytes], sock: socket.socket) -> None:
        self._popen = popen
        self._sock = sock
        self._outbox: collections.deque[_Outgoing] = collections.deque()
        self._lines = _Lines()
        self._kills: dict[str, GuardKill] = {}
        # Keys watched and not forgotten: a report that crosses a `forget` is dropped.
        self._watching: set[str] = set()
        self._ready = False
        self._pongs: dict[int, float] = {}
        self._seq = 0
        self._closed: int | None = None  # attempts the guard killed at close
        self._eof = False
        self._lock = anyio.Lock()  # one waiter on the socket at a time

    @classmethod
    async def start(
        cls, *, stderr: int | IO[Any] | None = None, ready_timeout_s: float = 10.0
    ) -> Guard:
        """Start the guard process and wait until it is ready to watch.

        It inherits this process's stderr unless `stderr` says otherwise."""
        guard = cls(*_spawn(stderr))
        try:
            with anyio.fail_after(ready_timeout_s):
                await guard._wait_for(lambda: guard._ready)
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await guard._stop(kill=True)
            if isinstance(exc, (TimeoutError, GuardError)):
                raise GuardError(f"the guard process did not start: {exc!r}") from exc
            raise
        return guard

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def alive(self) -> bool:
        """False once the guard process has exited (reaped here) or its socket closed."""
        return not self._eof and self._popen.poll() is None

    @property
    def pending_bytes(self) -> int:
        """Bytes sent to the guard that its socket has not taken yet (it is slow or stopped)."""
        return sum(len(o.data) - o.sent for o in self._outbox)

    def __repr__(self) -> str:
        state = "alive" if self.alive else f"dead (exit {self._popen.returncode})"
        return f"<Guard pid={self.pid} {state} pending={self.pending_bytes}B>"

    def watch(
        self, key: str, *, leader_pid: int | None, deadline: float, cgroup: str | None = None
    ) -> None:
        """Kill attempt `key` unless its deadline is renewed before it passes.

        Call while `leader_pid` is this process's child and not reaped yet (right after
        the spawn): its identity is captured here. Its process group must be its own
        (`start_new_session=True`); `cgroup` is the attempt's cgroup v2 directory, if any.
        With `leader_pid=None` the key names a whole cgroup (a node's, holding all its
        attempts' cgroups): killed whole when its deadline passes or the pool dies.
        Watching a key again replaces what was watched under it."""
        if leader_pid is None and cgroup is None:
            raise ValueError("watch needs a leader pid or a cgroup")
        if leader_pid is not None and leader_pid <= 1:
            raise ValueError(f"invalid leader pid {leader_pid}")
        pidfd = None
        if HAS_PIDFD and leader_pid is not None:
            with contextlib.suppress(OSError):
                pidfd = os.pidfd_open(leader_pid)
        message = {
            "op": "watch",
            "key": key,
            "pid": leader_pid,
            "ticks": start_ticks(leader_pid) if leader_pid is not None else None,
            "cgroup": cgroup,
            "deadline": deadline,
            "pidfd": pidfd is not None,
        }
        self._watching.add(key)
        self._send(_encode(message), pidfd)

    def renew(self, deadlines: Mapping[str, float]) -> None:
        """Move the deadlines of watched attempts (one message for all); others are ignored.

        Pass only leases the store has just renewed, with deadlines computed from when
        the renewal was *sent*: a deadline the store did not grant would let an attempt
        run past its lease."""
        if deadlines:
            self._send(_encode({"op": "renew", "deadlines": dict(deadlines)}))

    def forget(self, key: str) -> GuardKill | None:
        """Stop watching `key`; call once its leader has exited, before reaping it.

        Returns how the guard killed the attempt if it did (its report precedes the
        kill, so it is here by the time the leader is seen dead, unless more reports
        than the socket buffers, ~200 KiB, were waiting unread), else None."""
        self._send(_encode({"op": "forget", "key": key}))
        self._watching.discard(key)
        return self._kills.pop(key, None)

    def killed(self) -> dict[str, GuardKill]:
        """Attempts the guard killed that were not forgotten yet (reads what arrived)."""
        self._receive()
        return dict(self._kills)

    async def sync(self) -> float:
        """Return once the guard has handled everything sent before and killed every
        attempt whose deadline had passed; returns the guard's clock at that moment."""
        self._seq += 1
        seq = self._seq
        self._send(_encode({"op": "ping", "seq": seq}))
        await self._wait_for(lambda: seq in self._pongs)
        return self._pongs.pop(seq)

    async def close(self, timeout_s: float = 5.0) -> None:
        """Stop the guard: it kills whatever is still watched (see the module docstring)
        and exits; then it is reaped. Killed with SIGKILL if it does not answer within
        `timeout_s`. Shielded from cancellation: the guard is always reaped."""
        if self._popen.returncode is not None and self._sock.fileno() < 0:
            return  # closed already
        with anyio.CancelScope(shield=True):
            self._send(_encode({"op": "close"}))
            with anyio.move_on_after(timeout_s), contextlib.suppress(GuardError):
                await self._wait_for(lambda: self._closed is not None or self._eof)
            await self._stop(kill=self._closed is None, timeout_s=timeout_s)

    async def _stop(self, *, kill: bool, timeout_s: float = 5.0) -> None:
        with anyio.CancelScope(shield=True):
            if not kill:  # it said it closed: it is exiting
                with anyio.move_on_after(timeout_s):
                    await self._wait_exited()
            if self._popen.poll() is None:
                self._popen.kill()
                await self._wait_exited()
        self._receive()
        self._sock.close()
        for out in self._outbox:
            if out.pidfd is not None:
                os.close(out.pidfd)
        self._outbox.clear()

    async def _wait_exited(self) -> None:
        """Wait for the guard process to exit, then reap it."""
        if self._popen.poll() is not None:
            return
        if HAS_PIDFD:
            # Our unreaped child: the pidfd is surely the guard's.
            pidfd = os.pidfd_open(self._popen.pid)
            try:
                await anyio.wait_readable(pidfd)
            finally:
                os.close(pidfd)
        else:  # pragma: no cover - no pidfd: poll without blocking the loop
            while self._popen.poll() is None:  # noqa: ASYNC110 - nothing else to wait on
                await anyio.sleep(0.005)
        self._popen.wait()

    # -- I/O that never blocks ---------------------------------------------------
    def _send(self, data: bytes, pidfd: int | None = None) -> None:
        if self._eof or self._sock.fileno() < 0:
            if pidfd is not None:
                os.close(pidfd)
            return
        self._outbox.append(_Outgoing(data, pidfd))
        self._flush()
        self._receive()

    def _flush(self) -> None:
        while self._outbox:
            out = self._outbox[0]
            ancillary = []
            if out.pidfd is not None:
                fds = array.array("i", [out.pidfd])
                ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds.tobytes())]
            try:
                sent = self._sock.sendmsg([out.data[out.sent :]], ancillary)
            except BlockingIOError:
                return
            except OSError:
                self._gone()
                return
            if out.pidfd is not None:  # in flight now: the kernel holds a reference
                os.close(out.pidfd)
                out.pidfd = None
            out.sent += sent
            if out.sent < len(out.data):
                return
            self._outbox.popleft()

    def _receive(self) -> None:
        while not self._eof and self._sock.fileno() >= 0:
            try:
                data = self._sock.recv(1 << 16)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._gone()
                return
            for line in self._lines.feed(data):
                self._handle(line)

    def _handle(self, line: bytes) -> None:
        try:
            message = json.loads(line)
            if "kill" in message:
                kill = GuardKill(
                    message["kill"],
                    message["at"],
                    message["deadline"],
                    message["why"],
                    tuple(message["targets"]),
                )
                if kill.key in self._watching:
                    self._kills[kill.key] = kill
            elif "pong" in message:
                self._pongs[message["pong"]] = message["now"]
            elif "ready" in message:
                self._ready = True
            elif "closed" in message:
                self._closed = message["closed"]
        except (ValueError, TypeError, KeyError):
            pass  # from our own guard: cannot happen; nothing to act on if it did

    def _gone(self) -> None:
        self._eof = True
        for out in self._outbox:
            if out.pidfd is not None:
                os.close(out.pidfd)
        self._outbox.clear()

    async def _wait_for(self, done: Callable[[], bool]) -> None:
        async with self._lock:
            while True:
                self._flush()
                self._receive()
                if done():
                    return
                if self._eof:
                    raise GuardError(f"the guard process ended (exit {self._popen.poll()})")
                if self._outbox:
                    await anyio.wait_writable(self._sock)
                else:
                    await anyio.wait_readable(self._sock)
