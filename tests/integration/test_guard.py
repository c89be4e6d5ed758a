"""The node's guard (real processes, real signals): it kills an attempt whose lease
deadline passes without a renewal, and every attempt when the pool process dies or
is frozen past the deadline; it never kills a recycled pid."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import anyio
import psutil
import pytest

from taskpool._guard import Guard, GuardError
from taskpool._guard_kill import kill_cgroup
from taskpool._guard_process import GUARD_CLOSED, LEASE_EXPIRED, POOL_DIED, POOL_HUNG_UP
from taskpool._procs import ATTEMPT_ENV, attempt_marker
from tests.helpers import SAFETY_TIMEOUT_S, eventually

#: Every wait below is on a state; this only bounds a test that would otherwise hang.
SAFETY_S = 10.0
#: A lease deadline that is in the past by the time the guard could act on it often
#: hides bugs; this is short enough to keep the tests quick, long enough to be ahead.
SHORT_S = 0.3
STORE = uuid.uuid4().hex  # the attempt identities of this module's own processes
_task_ids = iter(range(1, 1_000_000))


def new_key() -> str:
    return attempt_marker(STORE, next(_task_ids), 1)


def spawn(
    key: str, argv: list[str] | None = None, *, stdin: int | None = None
) -> subprocess.Popen[bytes]:
    """An attempt's leader: its own session and group, carrying the attempt's marker."""
    return subprocess.Popen(
        argv or ["sleep", "600"],
        env={**os.environ, ATTEMPT_ENV: key},
        start_new_session=True,
        stdin=stdin,
    )


def wait_exited(pid_or_fd: int, *, is_fd: bool = False) -> bool:
    """True once the process has exited (not reaping it), False at the safety net."""
    fd = pid_or_fd if is_fd else os.pidfd_open(pid_or_fd)
    try:
        return bool(select.select([fd], [], [], SAFETY_S)[0])
    finally:
        if not is_fd:
            os.close(fd)


def exited_now(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


@contextlib.contextmanager
def cleanup(*procs: subprocess.Popen[bytes]) -> Iterator[None]:
    try:
        yield
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                proc.wait()


@pytest.fixture
async def guard(tmp_path: Path) -> AsyncIterator[Guard]:
    """A guard owned by this test process, logging to a file of the test's own."""
    with log_file(tmp_path) as log:
        guard = await Guard.start(stderr=log)
    try:
        yield guard
    finally:
        await guard.close()


async def test_a_waiter_wakes_when_another_caller_reads_what_it_waits_for(guard: Guard) -> None:
    """`sync` sleeps until the socket is readable. If another caller (a send, `killed`)
    reads its pong first, the socket is empty again and that sleep alone would never
    end: the reader wakes it. The guard is stopped (SIGSTOP) so that the pong can only
    come once the waiter sleeps; it is then read by `killed`, outside the event loop."""
    pid = guard._popen.pid
    answered = anyio.Event()

    async def wait_for_pong() -> None:
        await guard.sync()
        answered.set()

    os.kill(pid, signal.SIGSTOP)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(wait_for_pong)

            async def sleeping() -> bool:
                return guard._sleep is not None

            await eventually(sleeping)
            os.kill(pid, signal.SIGCONT)
            # Block, not await: the pong arrives and is read before the loop looks again.
            readable, _, _ = select.select([guard._sock], [], [], SAFETY_TIMEOUT_S)
            assert readable
            guard.killed()
            assert guard._pongs  # read here, not by the waiter
            with anyio.fail_after(SAFETY_TIMEOUT_S):
                await answered.wait()
    finally:
        os.kill(pid, signal.SIGCONT)


def log_file(tmp_path: Path) -> BinaryIO:
    """Where a test's guard logs (its stderr)."""
    return open(tmp_path / "guard.log", "wb")  # the caller closes it


async def sync_past(guard: Guard, moment: float) -> None:
    """Return once the guard has acted on every deadline up to `moment` (its clock)."""

    async def past() -> bool:
        return await guard.sync() > moment

    await eventually(past)


def guard_log(tmp_path: Path) -> list[str]:
    return (tmp_path / "guard.log").read_text().splitlines()


# -- one pool, the test process itself -------------------------------------------
async def test_an_attempt_whose_deadline_passes_is_killed_with_its_group(guard: Guard) -> None:
    """A watched leader and its child, in the leader's process group, are SIGKILLed once
    the deadline passes without a renewal; forgetting it tells who killed it and when."""
    key = new_key()
    leader = spawn(key, ["sh", "-c", "sleep 600 & wait"])
    with cleanup(leader):

        async def children_started() -> list[psutil.Process]:
            return list(psutil.Process(leader.pid).children())

        children = await eventually(children_started)
        deadline = time.monotonic() + SHORT_S
        guard.watch(key, leader_pid=leader.pid, deadline=deadline)
        assert wait_exited(leader.pid)
        kill = guard.forget(key)  # before reaping, as the pool does
        assert leader.wait() == -signal.SIGKILL
        psutil.wait_procs(children, timeout=SAFETY_S)
        assert not any(child.is_running() for child in children)
        assert kill is not None
        assert (kill.key, kill.why, kill.deadline) == (key, LEASE_EXPIRED, deadline)
        assert kill.at >= deadline
        assert kill.targets == (f"process group {leader.pid}",)


async def test_a_renewal_keeps_an_attempt_alive_past_its_first_deadline(guard: Guard) -> None:
    """An attempt renewed before its deadline is alive when the guard's clock has passed
    that deadline, and dies at the renewed one once renewals stop."""
    key = new_key()
    leader = spawn(key)
    with cleanup(leader):
        first = time.monotonic() + SHORT_S
        guard.watch(key, leader_pid=leader.pid, deadline=first)
        renewed = first + 2 * SHORT_S
        guard.renew({key: renewed, new_key(): renewed})  # an unknown key is ignored
        await sync_past(guard, first)
        assert leader.poll() is None
        assert guard.killed() == {}
        assert wait_exited(leader.pid)
        kill = guard.forget(key)
        assert leader.wait() == -signal.SIGKILL
        assert kill is not None
        assert kill.deadline == renewed


async def test_a_forgotten_attempt_is_not_killed(guard: Guard) -> None:
    """An attempt forgotten before its deadline is left alone after the deadline."""
    key = new_key()
    leader = spawn(key)
    with cleanup(leader):
        deadline = time.monotonic() + SHORT_S
        guard.watch(key, leader_pid=leader.pid, deadline=deadline)
        assert guard.forget(key) is None
        await sync_past(guard, deadline)
        assert leader.poll() is None
        assert guard.killed() == {}


async def test_close_kills_what_is_still_watched(tmp_path: Path) -> None:
    """Closing the guard kills an attempt still watched (the guard never leaves one
    unbounded), and the guard process exits and is reaped."""
    key = new_key()
    leader = spawn(key)
    with cleanup(leader), log_file(tmp_path) as log:
        guard = await Guard.start(stderr=log)
        guard.watch(key, leader_pid=leader.pid, deadline=time.monotonic() + 600)
        await guard.close()
        assert not guard.alive
        assert leader.wait(SAFETY_S) == -signal.SIGKILL
        assert guard.killed()[key].why == GUARD_CLOSED
    [line] = guard_log(tmp_path)
    assert kill_line(line) == (key, GUARD_CLOSED, f"process group {leader.pid}: SIGKILL")


async def test_a_dead_guard_is_noticed_and_never_blocks_the_pool(tmp_path: Path) -> None:
    """With its guard SIGKILLed, the pool's calls return at once without raising,
    `alive` turns False, and waiting on the guard raises GuardError."""
    key = new_key()
    leader = spawn(key)
    with cleanup(leader):
        guard = await Guard.start()
        os.kill(guard.pid, signal.SIGKILL)
        assert wait_exited(guard.pid)
        guard.watch(key, leader_pid=leader.pid, deadline=time.monotonic())
        guard.renew({key: time.monotonic() + 600})
        assert guard.forget(key) is None
        assert not guard.alive
        with pytest.raises(GuardError):
            await guard.sync()
        await guard.close()
        assert leader.poll() is None  # nobody killed it: the pool must act on `alive`


async def test_a_stopped_guard_never_blocks_the_pool(guard: Guard) -> None:
    """While the guard is stopped (SIGSTOP), renewals far beyond the socket's buffer
    return at once and wait in the pool's outbox; after SIGCONT they are all delivered
    in order, the last one counting."""
    key = new_key()
    leader = spawn(key)
    with cleanup(leader):
        guard.watch(key, leader_pid=leader.pid, deadline=time.monotonic() + 600)
        await guard.sync()
        others = {new_key(): 0.0 for _ in range(100)}  # unknown keys: bulk, ignored
        os.kill(guard.pid, signal.SIGSTOP)
        try:
            sent = 0
            while guard.pending_bytes == 0 or sent < 100:
                guard.renew({**others, key: time.monotonic() + 600 + sent})
                sent += 1
                assert sent < 100_000, "the socket never filled up"
            last = time.monotonic() + 700
            guard.renew({key: last})
            assert guard.pending_bytes > 0
        finally:
            os.kill(guard.pid, signal.SIGCONT)
        await guard.sync()
        assert guard.pending_bytes == 0
        assert leader.poll() is None
    await guard.close()
    assert guard.killed()[key].deadline == last


async def test_bad_messages_are_ignored_and_the_guard_keeps_working(
    guard: Guard, tmp_path: Path
) -> None:
    """Garbage lines, wrong types, dangerous pids and a claimed pidfd that never came
    are each logged and ignored; the guard then still kills a well-formed attempt, and a
    bad renewal changes nothing."""
    victim = new_key()
    leader = spawn(victim)
    with cleanup(leader):
        deadline = time.monotonic() + SHORT_S
        guard.watch(victim, leader_pid=leader.pid, deadline=deadline)
        bad = [
            b"not json",
            b"\xff\xfe\x00",
            b"[1, 2]",
            b'{"op": "explode"}',
            b'{"op": "renew", "deadlines": {"%s": 1e300, "x": "soon"}}' % victim.encode(),
            b'{"op": "renew", "deadlines": [1]}',
            b'{"op": "forget"}',
            b'{"op": "watch", "key": "k:1:1", "pid": 0, "deadline": 1}',
            b'{"op": "watch", "key": "k:1:1", "pid": 1, "deadline": 1}',
            b'{"op": "watch", "key": "k:1:1", "pid": -5, "deadline": 1}',
            b'{"op": "watch", "key": "k:1:1", "pid": %d, "deadline": 1}' % os.getpid(),
            b'{"op": "watch", "key": "k:1:1", "pid": 1%s, "deadline": 1}' % (b"0" * 30),
            b'{"op": "watch", "key": "k:1:1", "pid": %d, "deadline": 1%s}'
            % (leader.pid, b"0" * 400),
            b'{"op": "watch", "key": "k:1:1", "pid": %d, "deadline": NaN}' % leader.pid,
            b'{"op": "watch", "key": "k:1:1", "pid": %d, "deadline": 1, "cgroup": "../x"}'
            % leader.pid,
            b'{"op": "watch", "key": "", "pid": %d, "deadline": 1}' % leader.pid,
        ]
        for line in bad:
            guard._send(line + b"\n")
        # Claims a pidfd that was never sent: well-formed, watched without one.
        guard._send(
            b'{"op": "watch", "key": "k:2:1", "pid": 999999, "pidfd": true, "deadline": 0}\n'
        )
        assert wait_exited(leader.pid)
        kill = guard.forget(victim)
        assert leader.wait() == -signal.SIGKILL
        assert kill is not None
        assert kill.deadline == deadline  # the bad renewal was not half-applied
        # A deadline far in the future is valid, and the only one left: the guard must
        # still wake (its poll timeout is capped), not overflow.
        other = new_key()
        far = spawn(other)
        with cleanup(far):
            guard.watch(other, leader_pid=far.pid, deadline=1e300)
            await guard.sync()
            assert guard.forget(other) is None
        assert guard.alive
    ignored = [line for line in guard_log(tmp_path) if "ignored a bad message" in line]
    assert len(ignored) == len(bad)


async def test_a_recycled_leader_pid_is_never_killed(guard: Guard, tmp_path: Path) -> None:
    """A leader reaped while still watched (a lost `forget`), whose pid then names a new
    session leader, is not signalled at the deadline: the guard reports the group skipped."""
    key = new_key()
    leader = spawn(key)
    impostor: subprocess.Popen[bytes] | None = None
    try:
        deadline = time.monotonic() + 1.0
        guard.watch(key, leader_pid=leader.pid, deadline=deadline)
        await guard.sync()  # the guard holds its pidfd now
        leader.kill()
        leader.wait()  # reaped: its pid is free for anyone
        impostor = recycle_pid(leader.pid, new_key())
        assert impostor.pid == leader.pid
        assert os.getpgid(impostor.pid) == leader.pid  # killpg(leader pid) would hit it
        await sync_past(guard, deadline)
        assert impostor.poll() is None
        kill = guard.killed()[key]
        assert kill.targets == (f"process group {leader.pid} skipped: its leader was reaped",)
    finally:
        for proc in (leader, impostor):
            if proc is not None and proc.returncode is None:
                proc.kill()
                proc.wait()


def recycle_pid(pid: int, key: str) -> subprocess.Popen[bytes]:
    """Start a new session leader with pid `pid` (as root: set the next pid to allocate,
    then fork; another process on the host may take it first, so try again: on a busy
    host for as long as a minute, which is a safety net, not the assertion)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with open("/proc/sys/kernel/ns_last_pid", "w") as f:
                f.write(str(pid - 1))
        except OSError as exc:
            pytest.skip(f"cannot choose the next pid here: {exc}")
        proc = spawn(key)
        if proc.pid == pid:
            return proc
        proc.kill()
        proc.wait()
    pytest.fail(f"pid {pid} was taken by other processes for a minute")


# -- the pool is another process: kill it, freeze it --------------------------------
#: A stand-in for a pool: starts a guard, watches attempts, reports, then obeys stdin.
OWNER = r"""
import json, os, signal, subprocess, sys, time
import anyio
from taskpool._guard import Guard

async def main():
    keys, deadline_in_s, fork_holder, stop_guard = json.loads(sys.argv[1])
    guard = await Guard.start()
    if stop_guard:  # what we send now waits in the socket until the test resumes it
        os.kill(guard.pid, signal.SIGSTOP)
    holder = None
    if fork_holder:  # a child forked without exec: it holds our end of the guard's socket
        holder = os.fork()
        if holder == 0:
            time.sleep(600)
            os._exit(0)
    procs = {}
    deadline = time.monotonic() + deadline_in_s
    for key in keys:
        procs[key] = subprocess.Popen(
            ["sleep", "600"], start_new_session=True, env={**os.environ, "TASKPOOL_ATTEMPT": key}
        )
        guard.watch(key, leader_pid=procs[key].pid, deadline=deadline)
    if not stop_guard:
        await guard.sync()
    print(json.dumps({"guard": guard.pid, "pids": {k: p.pid for k, p in procs.items()},
                      "deadline": deadline, "holder": holder}), flush=True)
    await anyio.wait_readable(sys.stdin.fileno())
    sys.stdin.readline()
    report = {}
    for key, proc in procs.items():
        kill = guard.forget(key)  # the leader is dead and not reaped yet
        report[key] = [proc.wait(), kill and [kill.why, kill.at, kill.deadline]]
    await guard.close()
    print(json.dumps(report), flush=True)

anyio.run(main)
"""


def start_owner(
    keys: list[str], deadline_in_s: float, *, fork_holder: bool = False, stop_guard: bool = False
) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER, json.dumps([keys, deadline_in_s, fork_holder, stop_guard])],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    return owner, json.loads(read_line(owner))


def read_line(proc: subprocess.Popen[bytes]) -> bytes:
    assert proc.stdout is not None
    ready = select.select([proc.stdout], [], [], SAFETY_S * 3)[0]
    assert ready, "the owner process did not answer"
    return proc.stdout.readline()


def kill_line(line: str) -> tuple[str, str, str]:
    """(key, why, what) of a guard's log line `taskpool guard PID: killed attempt K: ...`."""
    _, rest = line.split(": killed attempt ", 1)
    key, rest = rest.split(": ", 1)
    why, what = rest.rsplit(": process group", 1)
    return key, why, "process group" + what


def stop_owner(owner: subprocess.Popen[bytes]) -> None:
    if owner.returncode is None:
        owner.kill()  # a stopped process dies of SIGKILL too
    with owner:  # closes its pipes and waits for it
        pass


def process_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    return stat[stat.rindex(b")") + 2 :].split()[0].decode()


def test_sigkill_of_the_pool_kills_every_watched_attempt_at_once() -> None:
    """SIGKILL of the process that owns the guard kills every attempt it watched, long
    before their deadlines, and the guard exits; it logs each kill with the reason."""
    keys = [new_key() for _ in range(3)]
    owner, info = start_owner(keys, deadline_in_s=600)
    pidfds: list[int] = []
    try:
        # The owner's unreaped children, the owner alive: these pids are surely theirs.
        pidfds = [os.pidfd_open(pid) for pid in [*info["pids"].values(), info["guard"]]]
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait()
        assert all(wait_exited(fd, is_fd=True) for fd in pidfds)
        assert time.monotonic() < info["deadline"]
        assert owner.stderr is not None
        log = owner.stderr.read().decode()  # EOF: the guard and the attempts are gone
        # Which of the two the guard sees first is a race inside the kernel's exit.
        reasons = {k: why for line in log.splitlines() for k, why, _ in [kill_line(line)]}
        assert set(reasons) == set(keys)
        assert set(reasons.values()) <= {POOL_DIED, POOL_HUNG_UP}
    finally:
        for fd in pidfds:
            os.close(fd)
        stop_owner(owner)


@pytest.mark.parametrize("fork_holder", [False, True], ids=["eof", "socket-held"])
def test_a_watch_sent_just_before_the_pool_died_is_still_honoured(fork_holder: bool) -> None:
    """The pool sends its watches and is SIGKILLed before the guard has read them: the
    guard finds the pool dead and its messages waiting in the same wake-up, reads them
    first, and kills those attempts too."""
    keys = [new_key() for _ in range(2)]
    owner, info = start_owner(keys, deadline_in_s=600, fork_holder=fork_holder, stop_guard=True)
    pidfds: list[int] = []
    guard = holder = -1
    try:
        pidfds = [os.pidfd_open(pid) for pid in info["pids"].values()]
        guard = os.pidfd_open(info["guard"])
        if fork_holder:
            holder = os.pidfd_open(info["holder"])
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait()
        signal.pidfd_send_signal(guard, signal.SIGCONT)
        assert all(wait_exited(fd, is_fd=True) for fd in pidfds)
        assert wait_exited(guard, is_fd=True)
        assert owner.stderr is not None
        log = owner.stderr.read().decode() if not fork_holder else ""
        if not fork_holder:  # the holder keeps the pipe open: no EOF to read the log at
            reasons = {k: why for line in log.splitlines() for k, why, _ in [kill_line(line)]}
            assert set(reasons) == set(keys)
    finally:
        for fd in [*pidfds, guard]:
            if fd >= 0:
                os.close(fd)
        if holder >= 0:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(holder, signal.SIGKILL)
            wait_exited(holder, is_fd=True)
            os.close(holder)
        stop_owner(owner)


def test_the_pools_death_is_seen_even_when_a_forked_child_holds_its_socket() -> None:
    """A child the pool forked without exec keeps the guard's socket open, so no EOF
    comes; the guard still sees the pool die (its pidfd) and kills every attempt."""
    keys = [new_key() for _ in range(2)]
    owner, info = start_owner(keys, deadline_in_s=600, fork_holder=True)
    pidfds: list[int] = []
    holder = -1
    try:
        pidfds = [os.pidfd_open(pid) for pid in [*info["pids"].values(), info["guard"]]]
        holder = os.pidfd_open(info["holder"])
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait()
        assert all(wait_exited(fd, is_fd=True) for fd in pidfds)
        assert not exited_now(holder)  # the socket is still open in it
        signal.pidfd_send_signal(holder, signal.SIGKILL)
        assert wait_exited(holder, is_fd=True)
        assert owner.stderr is not None
        log = owner.stderr.read().decode()
        reasons = {k: why for line in log.splitlines() for k, why, _ in [kill_line(line)]}
        assert reasons == dict.fromkeys(keys, POOL_DIED)
    finally:
        for fd in pidfds:
            os.close(fd)
        if holder >= 0:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(holder, signal.SIGKILL)
            os.close(holder)
        stop_owner(owner)


def test_a_stopped_pool_cannot_keep_its_attempts_past_the_deadline() -> None:
    """SIGSTOP the owner of the guard before the deadline: its attempts die at the
    deadline while it is still stopped; after SIGCONT it learns from its guard that
    they were killed at the deadline and why."""
    keys = [new_key() for _ in range(2)]
    owner, info = start_owner(keys, deadline_in_s=2.0)
    pidfds: list[int] = []
    try:
        pidfds = [os.pidfd_open(pid) for pid in info["pids"].values()]
        os.kill(owner.pid, signal.SIGSTOP)
        give_up = time.monotonic() + SAFETY_S
        while process_state(owner.pid) != "T" and time.monotonic() < give_up:
            time.sleep(0.001)
        assert time.monotonic() < info["deadline"]  # frozen while its leases were good
        assert all(wait_exited(fd, is_fd=True) for fd in pidfds)
        assert process_state(owner.pid) == "T"  # still stopped when its attempts died
        assert psutil.pid_exists(info["guard"])
        os.kill(owner.pid, signal.SIGCONT)
        assert owner.stdin is not None
        owner.stdin.write(b"report\n")
        owner.stdin.flush()
        report = json.loads(read_line(owner))
        assert owner.wait(SAFETY_S) == 0
        for key in keys:
            exit_code, (why, at, deadline) = report[key]
            assert exit_code == -signal.SIGKILL
            assert why == LEASE_EXPIRED
            assert at >= deadline == info["deadline"]
    finally:
        for fd in pidfds:
            os.close(fd)
        stop_owner(owner)


# -- cgroups --------------------------------------------------------------------------
def cgroup2_mount() -> Path | None:
    """Where cgroup v2 is mounted, from /proc/self/mountinfo (not always /sys/fs/cgroup)."""
    with contextlib.suppress(OSError), open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[fields.index("-") + 1] == "cgroup2":
                return Path(fields[4])
    return None


@pytest.fixture
def cgroup() -> Iterator[Path]:
    """A child cgroup v2 of this test's own, removed (emptied first) afterwards."""
    mount = cgroup2_mount()
    if mount is None:
        pytest.skip("no cgroup v2 hierarchy is mounted")
    path = mount / f"taskpool-guard-test-{uuid.uuid4().hex}"
    try:
        path.mkdir()
    except OSError as exc:
        pytest.skip(f"cannot create a cgroup here: {exc}")
    try:
        yield path
    finally:
        if populated(path):
            kill_cgroup(str(path))
            wait_empty(path)
        path.rmdir()


def populated(path: Path) -> bool:
    return "populated 1" in (path / "cgroup.events").read_text()


def wait_empty(path: Path) -> bool:
    deadline = time.monotonic() + SAFETY_S
    while populated(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def cgroup_pids(path: Path) -> list[int]:
    return [int(pid) for pid in (path / "cgroup.procs").read_text().split()]


def escaped_session(path: Path, sid: int) -> list[psutil.Process]:
    """Processes in the cgroup that run `sleep` in another session than `sid`."""
    found = []
    for pid in cgroup_pids(path):
        with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
            proc = psutil.Process(pid)
            if os.getsid(pid) != sid and proc.name() == "sleep":
                found.append(proc)
    return found


def start_in_cgroup(key: str, path: Path, script: str, at_least: int) -> subprocess.Popen[bytes]:
    """Start `sh -c script` in `path` (moved there before it forks anything) and wait
    until the cgroup holds `at_least` processes."""
    leader = spawn(key, ["sh", "-c", f"read go; {script}"], stdin=subprocess.PIPE)
    (path / "cgroup.procs").write_text(str(leader.pid))
    assert leader.stdin is not None
    leader.stdin.write(b"go\n")
    leader.stdin.close()
    deadline = time.monotonic() + SAFETY_S
    while len(cgroup_pids(path)) < at_least:
        assert time.monotonic() < deadline, "the processes did not start"
        time.sleep(0.01)
    return leader


async def test_the_guard_kills_a_whole_cgroup_with_cgroup_kill(guard: Guard, cgroup: Path) -> None:
    """At the deadline the guard empties the attempt's cgroup, including a descendant
    that left the process group with setsid."""
    if not (cgroup / "cgroup.kill").exists():
        pytest.skip("cgroup.kill needs Linux >= 5.14")
    key = new_key()
    script = "setsid sleep 600 & sleep 600 & exec sleep 600"
    leader = start_in_cgroup(key, cgroup, script, at_least=3)
    with cleanup(leader):

        async def escaped() -> list[psutil.Process]:  # setsid runs a moment after its fork
            return escaped_session(cgroup, leader.pid)

        await eventually(escaped)
        deadline = time.monotonic() + SHORT_S
        guard.watch(key, leader_pid=leader.pid, cgroup=str(cgroup), deadline=deadline)
        assert wait_empty(cgroup)
        assert wait_exited(leader.pid)
        kill = guard.forget(key)
        assert leader.wait() == -signal.SIGKILL
        assert kill is not None
        assert kill.targets == (f"cgroup {cgroup}", f"process group {leader.pid}")


def test_the_freeze_fallback_kills_a_forking_cgroup(cgroup: Path) -> None:
    """Without cgroup.kill, freezing the cgroup, killing what it lists and thawing it
    empties a cgroup whose process keeps forking, and leaves it thawed."""
    key = new_key()
    script = 'i=0; while [ "$i" -lt 200 ]; do sleep 600 & i=$((i+1)); done; wait'
    leader = start_in_cgroup(key, cgroup, script, at_least=5)
    with cleanup(leader):
        how = kill_cgroup(str(cgroup), use_kill_file=False)
        assert how.startswith("frozen, then SIGKILL to "), how
        assert wait_empty(cgroup)
        assert leader.wait(SAFETY_S) == -signal.SIGKILL
        assert (cgroup / "cgroup.freeze").read_text().strip() == "0"
