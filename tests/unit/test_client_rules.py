"""The client's pure parts and the one place that names stores: no I/O here."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from taskpool import (
    CancelMode,
    Client,
    NodeInfo,
    PostgresStore,
    SQLiteStore,
    Status,
    TaskInfo,
    TaskSpec,
)
from taskpool._client import judge_stale, poll_delays
from taskpool.stores import CLIENT_CONNECTIONS, NODE_CONNECTIONS, node_connections, open_store


def test_poll_delays_double_from_the_first_up_to_the_cap() -> None:
    """A waiter that sees nothing change backs off: first, doubling, then the cap for ever."""
    assert list(itertools.islice(poll_delays(0.05, 1.0), 8)) == [
        0.05,
        0.1,
        0.2,
        0.4,
        0.8,
        1.0,
        1.0,
        1.0,
    ]


def test_poll_delays_never_exceed_a_cap_below_the_first() -> None:
    """A cap smaller than the first pause wins from the start."""
    assert list(itertools.islice(poll_delays(0.5, 0.1), 3)) == [0.1, 0.1, 0.1]


def task_info(task_id: int, status: Status, *, lease_expires_at: float | None) -> TaskInfo:
    return TaskInfo(
        task_id, TaskSpec(("true",)), status, 0.0, 1, 1, "n", lease_expires_at,
        None, None, None, None, "running", None,
    )  # fmt: skip


def _node(node_id: str, heartbeat_at: float, stopped_at: float | None = None) -> NodeInfo:
    return NodeInfo(node_id, "host", 1, 0.0, 0.0, heartbeat_at, stopped_at, 4)


def test_stale_report_names_expired_leases_and_silent_live_nodes() -> None:
    """Expired leases and nodes silent past the threshold are stale; the rest is not."""
    now = 1000.0
    expired = task_info(1, Status.RUNNING, lease_expires_at=now - 1)
    live = task_info(2, Status.RUNNING, lease_expires_at=now + 10)
    unleased = task_info(3, Status.RUNNING, lease_expires_at=None)
    nodes = [
        _node("silent", heartbeat_at=now - 61),
        _node("fresh", heartbeat_at=now - 59),
        _node("stopped", heartbeat_at=now - 600, stopped_at=now - 500),
    ]
    report = judge_stale([expired, live, unleased], nodes, now=now, older_than_s=60)
    assert [t.id for t in report.expired_leases] == [1]
    assert [n.id for n in report.silent_nodes] == ["silent"]
    assert report.at == now


def test_cancel_modes_keep_the_stored_values() -> None:
    """The enum's values are the strings the stores' schema allows, so rows stay valid."""
    assert [m.value for m in CancelMode] == ["graceful", "force"]
    assert CancelMode("force") is CancelMode.FORCE


@pytest.mark.parametrize("url", ["postgresql://u@h/db", "postgres://u@h:5/db", "POSTGRESQL://h/d"])
def test_a_postgres_url_opens_a_postgres_store_sized_as_asked(url: str) -> None:
    """Both libpq spellings (any case) give a PostgresStore with the connections asked."""
    store = open_store(url, connections=7, create=False)
    assert isinstance(store, PostgresStore)
    assert (store.max_size, store.create, store.dsn) == (7, False, url)


def test_a_path_opens_an_sqlite_store(tmp_path: Path) -> None:
    """Anything that is not a URL is an SQLite file's path, str or PathLike."""
    store = open_store(tmp_path / "t.db", create=False)
    assert isinstance(store, SQLiteStore)
    assert store.path == tmp_path / "t.db"
    assert store.create is False
    assert isinstance(open_store("relative.db"), SQLiteStore)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("mysql://u:secret@h/db", "unknown store URL scheme 'mysql'"),
        ("", "no store named"),
        ("   ", "no store named"),
    ],
)
def test_a_name_that_is_no_store_is_a_clear_error(name: str, message: str) -> None:
    """Another URL scheme or an empty name is a ValueError (no password shown), never a file."""
    with pytest.raises(ValueError, match=message) as caught:
        open_store(name)
    assert "secret" not in str(caught.value)


def test_connections_must_be_positive() -> None:
    """A pool of no connections is refused before anything is opened."""
    with pytest.raises(ValueError, match="connections must be >= 1"):
        open_store("postgresql://h/d", connections=0)


def test_a_nodes_connections_do_not_grow_with_its_slots() -> None:
    """A worker's pooled connections are a small constant whatever its parallelism, as
    a client's are."""
    assert node_connections(1) == node_connections(64) == NODE_CONNECTIONS <= 4
    assert CLIENT_CONNECTIONS >= 2


def test_a_client_owns_what_it_opens_and_not_what_it_is_given(tmp_path: Path) -> None:
    """Ownership is stated by the constructor's argument, and readable."""
    assert Client(tmp_path / "a.db").owns_store is True
    given = SQLiteStore(tmp_path / "b.db")
    client = Client(given)
    assert client.owns_store is False
    assert client.store is given
