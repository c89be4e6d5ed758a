"""The node's guard: a helper process that kills attempts whose lease ran out; this
module is the pool's handle on it.

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

The pool calls `watch` while the leader is its unreaped child and `forget` before it
reaps it: `watch` opens a pidfd on the leader there and then and passes it to the
guard over the socket, with the leader's start time, so that the guard never signals
a recycled pid (_guard_kill.py). The guard process itself, how it notices the pool's
death, what `close` does and its limits: _guard_process.py; the messages both ways:
_guard_protocol.py.
"""

from __future__ import annotations

import array
import collections
import contextlib
import os
import socket
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import IO, Any

import anyio

from . import _guard_process
from . import _guard_protocol as protocol
from ._errors import TaskpoolError
from ._guard_kill import HAS_PIDFD, start_ticks


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


def _spawn(stderr: int | IO[Any] | None) -> tuple[subprocess.Popen[bytes], socket.socket]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        popen = subprocess.Popen(
            _guard_process.argv(os.getpid()),
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
        self._lines = protocol.Lines()
        self._kills: dict[str, GuardKill] = {}
        # Keys watched and not forgotten: a report that crosses a `forget` is dropped.
        self._watching: set[str] = set()
        self._ready = False
        self._pongs: dict[int, float] = {}
        self._seq = 0
        self._closed: int | None = None  # attempts the guard killed at close
        self._eof = False
        self._lock = anyio.Lock()  # one waiter on the socket at a time
        # The waiter's sleep on the socket, while it sleeps: `_receive` called from
        # elsewhere (`_send`, `killed`) may empty the socket of what the waiter waits
        # for, and a wait for readability would then never wake; so it wakes it.
        self._sleep: anyio.CancelScope | None = None

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
        message = protocol.watch(
            key,
            pid=leader_pid,
            ticks=start_ticks(leader_pid) if leader_pid is not None else None,
            cgroup=cgroup,
            deadline=deadline,
            with_pidfd=pidfd is not None,
        )
        self._watching.add(key)
        self._send(message, pidfd)

    def renew(self, deadlines: Mapping[str, float]) -> None:
        """Move the deadlines of watched attempts (one message for all); others are ignored.

        Pass only leases the store has just renewed, with deadlines computed from when
        the renewal was *sent*: a deadline the store did not grant would let an attempt
        run past its lease."""
        if deadlines:
            self._send(protocol.renew(deadlines))

    def forget(self, key: str) -> GuardKill | None:
        """Stop watching `key`; call once its leader has exited, before reaping it.

        Returns how the guard killed the attempt if it did (its report precedes the
        kill, so it is here by the time the leader is seen dead, unless more reports
        than the socket buffers, ~200 KiB, were waiting unread), else None."""
        self._send(protocol.forget(key))
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
        self._send(protocol.ping(seq))
        await self._wait_for(lambda: seq in self._pongs)
        return self._pongs.pop(seq)

    async def close(self, timeout_s: float = 5.0) -> None:
        """Stop the guard: it kills whatever is still watched (see the module docstring)
        and exits; then it is reaped. Killed with SIGKILL if it does not answer within
        `timeout_s`. Shielded from cancellation: the guard is always reaped."""
        if self._popen.returncode is not None and self._sock.fileno() < 0:
            return  # closed already
        with anyio.CancelScope(shield=True):
            self._send(protocol.close())
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
            if self._sleep is not None:
                self._sleep.cancel()  # the waiter looks again at what arrived
            if not data:
                self._gone()
                return
            for line in self._lines.feed(data):
                self._handle(line)

    def _handle(self, line: bytes) -> None:
        try:
            reply = protocol.read_reply(line)
            if reply is None:
                return
            kind, value = reply
            if kind == protocol.KILL:
                if value.key in self._watching:
                    self._kills[value.key] = GuardKill(
                        value.key, value.at, value.deadline, value.why, value.targets
                    )
            elif kind == protocol.PONG:
                seq, now = value
                self._pongs[seq] = now
            elif kind == protocol.READY:
                self._ready = True
            elif kind == protocol.CLOSED:
                self._closed = value
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
                try:
                    with anyio.CancelScope() as self._sleep:
                        if self._outbox:
                            await anyio.wait_writable(self._sock)
                        else:
                            await anyio.wait_readable(self._sock)
                finally:
                    self._sleep = None
