"""Whether an SQLite store's files are still the ones it opened, and how to let go of
them when they are not (invariant 13: never a silent split brain). Blocking calls,
run in threads by the store; `lost_files` is pure.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sqlite3
from collections.abc import Callable, Mapping
from pathlib import Path

#: The files of a database in WAL mode, as suffixes of its path.
WAL_SUFFIXES = ("", "-wal", "-shm")

#: A file's identity: (st_dev, st_ino).
FileIdentity = tuple[int, int]


def file_identities(path: str) -> dict[str, FileIdentity | None]:
    """The identity of the database at `path` and of its `-wal` and `-shm` (None: absent)."""
    found: dict[str, FileIdentity | None] = {}
    for suffix in WAL_SUFFIXES:
        try:
            st = os.stat(path + suffix)
        except (FileNotFoundError, NotADirectoryError):
            found[suffix] = None
        else:
            found[suffix] = (st.st_dev, st.st_ino)
    return found


def lost_files(
    path: str,
    opened: Mapping[str, FileIdentity | None],
    current: Mapping[str, FileIdentity | None],
) -> str | None:
    """Why the files at `path` are no longer those a store opened, or None if they are.
    A file that was absent at open (no `-shm` without WAL) is not checked. Pure."""
    problems = []
    for suffix, was in opened.items():
        now = current.get(suffix)
        if was is None or now == was:
            continue
        if now is None:
            problems.append(f"{path}{suffix} was deleted (or its directory removed or renamed)")
        else:
            problems.append(
                f"{path}{suffix} was replaced by another file (inode {now[1]} on device"
                f" {now[0]}, opened as inode {was[1]} on device {was[0]})"
            )
    if not problems:
        return None
    return f"SQLite database {path} is no longer the file this store opened: " + "; ".join(problems)


def empty_wal(conn: sqlite3.Connection) -> None:
    """Checkpoint the WAL into the database and truncate it, through the connection's
    own descriptors (the files it opened, wherever their names now lead). Best effort:
    it never waits on another process's reader."""
    try:
        conn.execute("PRAGMA busy_timeout=0")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    except sqlite3.Error:
        return  # the close still happens; the next opener of our old file recovers it


def abandon(conn: sqlite3.Connection) -> None:
    """Never close `conn`: its descriptors and locks go with the process. SQLite's close
    would checkpoint and then unlink `-wal` and `-shm` by name, names that may by now
    belong to another database. A reference that is never dropped keeps the connection
    open through interpreter shutdown too (a module-level list would be cleared)."""
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(conn))


def create_private(path: Path) -> None:
    """Create the database file 0600, and each missing directory above it 0700, so
    nothing taskpool creates is readable by other users. SQLite gives the -wal and
    -shm files the database file's mode. An existing file keeps the mode it has."""
    missing = []
    for parent in path.absolute().parents:
        if parent.exists():
            break
        missing.append(parent)
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another process made it first
            os.mkdir(directory, 0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return
    os.close(fd)  # an empty file is an empty SQLite database


def release_when_lost(
    path: str, opened: Mapping[str, FileIdentity | None]
) -> Callable[[sqlite3.Connection], None]:
    """How to let go of a store's connections once its files at `path` were found lost
    (it looks at the files again)."""
    try:
        current = file_identities(path)
    except OSError:
        current = {}
    db_moved = current.get("") != opened.get("")
    journal_ours = all(current.get(s) == opened.get(s) for s in WAL_SUFFIXES[1:])

    def release(conn: sqlite3.Connection) -> None:
        if db_moved:
            # Nothing else reaches our database through its name any more. Left as it
            # is, our `-wal` would be applied to whatever opens the path next (the file
            # that replaced ours included): empty it into our own database instead.
            empty_wal(conn)
        if journal_ours:
            conn.close()  # if SQLite's close unlinks -wal and -shm by name, they are ours
        else:
            abandon(conn)  # ... names that now belong to another database's files

    return release
