"""The test proxy (tests/netproxy.py) leaves no socket open once refused.

It once did: a connection that hung in a blackhole connected upstream when `refuse`
woke it, after `refuse` had closed what it knew of, and that socket to the target
(the test PostgreSQL server) stayed open until the garbage collector found it in some
later test, as an unclosed-socket ResourceWarning far from where it was opened."""

from __future__ import annotations

import socket

from tests.netproxy import Proxy

#: A safety net only: each wait below ends on an event long before.
SAFETY_S = 30.0


def _target() -> socket.socket:
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(SAFETY_S)
    return server


def _reads_eof(conn: socket.socket) -> bool:
    conn.settimeout(SAFETY_S)
    try:
        return conn.recv(1) == b""
    except ConnectionResetError:
        return True


def _pending_connections(server: socket.socket) -> list[socket.socket]:
    server.setblocking(False)
    pending: list[socket.socket] = []
    while True:
        try:
            conn, _ = server.accept()
        except BlockingIOError:
            return pending
        pending.append(conn)


def test_a_connection_refused_while_blackholed_never_stays_open_upstream() -> None:
    with _target() as server:
        proxy = Proxy(*server.getsockname())
        proxy.blackhole()
        client = socket.create_connection(("127.0.0.1", proxy.port), timeout=SAFETY_S)
        try:
            # The proxy accepted it (the kernel completed the handshake) and its thread
            # hangs in the blackhole; refusing wakes it.
            proxy.refuse()
            proxy.join(SAFETY_S)
            assert _reads_eof(client)
            upstream = _pending_connections(server)
            try:
                # Either it never connected, or what it connected is closed.
                assert all(_reads_eof(conn) for conn in upstream)
            finally:
                for conn in upstream:
                    conn.close()
        finally:
            client.close()


def test_when_one_side_closes_the_proxy_closes_the_other() -> None:
    with _target() as server:
        proxy = Proxy(*server.getsockname())
        try:
            client = socket.create_connection(("127.0.0.1", proxy.port), timeout=SAFETY_S)
            upstream, _ = server.accept()
            with client, upstream:
                client.sendall(b"ping")
                upstream.settimeout(SAFETY_S)
                assert upstream.recv(4) == b"ping"
                upstream.sendall(b"pong")
                assert client.recv(4) == b"pong"
                upstream.close()
                assert _reads_eof(client)
        finally:
            proxy.refuse()
            proxy.join(SAFETY_S)
