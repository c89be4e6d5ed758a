"""The pure decisions behind invariant 13: what a worker's signals ask for, and whether
a store's files are still the ones it opened."""

from __future__ import annotations

import argparse
import signal

from taskpool.cli import build_parser
from taskpool.cli._worker import _WorkerStop
from taskpool.stores.sqlite import lost_files


def test_the_first_signal_stops_a_later_one_hurries_and_the_rest_change_nothing() -> None:
    """stop, then hurry (exit 128 + that signal), then nothing new, whatever the signals."""
    stop = _WorkerStop()
    assert stop.exit_code == 0
    assert stop.on_signal(signal.SIGTERM) == "stop"
    assert stop.requested.is_set()
    assert stop.exit_code == 0
    assert stop.on_signal(signal.SIGINT) == "hurry"
    assert stop.exit_code == 130
    assert stop.on_signal(signal.SIGTERM) == "again"
    assert stop.exit_code == 130


def test_a_double_sigterm_exits_143() -> None:
    """SIGTERM twice: the status a shell reports for a process SIGTERM ended."""
    stop = _WorkerStop()
    stop.on_signal(signal.SIGTERM)
    stop.on_signal(signal.SIGTERM)
    assert stop.exit_code == 143


def test_files_still_the_ones_opened_are_not_lost() -> None:
    """Same device and inode for every file: nothing to report."""
    opened = {"": (1, 10), "-wal": (1, 11), "-shm": (1, 12)}
    assert lost_files("/d/t.db", opened, dict(opened)) is None


def test_a_file_absent_at_open_is_not_checked() -> None:
    """No -shm when the store opened (no WAL): its later absence or presence is no loss."""
    opened = {"": (1, 10), "-wal": None, "-shm": None}
    assert lost_files("/d/t.db", opened, {"": (1, 10), "-wal": (1, 11), "-shm": None}) is None


def test_each_deleted_or_replaced_file_is_named() -> None:
    """The message names the database and says, per file, deleted or replaced."""
    opened = {"": (1, 10), "-wal": (1, 11), "-shm": (1, 12)}
    message = lost_files("/d/t.db", opened, {"": (1, 20), "-wal": None, "-shm": (1, 12)})
    assert message is not None
    assert message.startswith("SQLite database /d/t.db is no longer the file this store opened")
    assert "/d/t.db was replaced by another file (inode 20 on device 1, opened as inode 10" in (
        message
    )
    assert "/d/t.db-wal was deleted" in message
    assert "t.db-shm" not in message


def test_the_same_inode_on_another_device_is_another_file() -> None:
    """An inode number is only unique on its device."""
    opened = {"": (1, 10)}
    assert lost_files("/d/t.db", opened, {"": (2, 10)}) is not None


def test_the_worker_help_states_the_exit_statuses() -> None:
    """`taskpool worker --help` documents what a first and a second signal do and the
    status each leaves (the acceptance tests prove them)."""
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    text = " ".join(commands.choices["worker"].description.split())
    assert "exit status 0" in text
    assert "A second signal hurries that stop" in text
    assert "128 + its number: 130 for SIGINT, 143 for SIGTERM" in text
