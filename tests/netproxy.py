"""A TCP proxy a test can cut, to put one node on the wrong side of a partition.

`refuse()` drops every connection and refuses new ones (a crashed router, a firewall
that rejects); `blackhole()` keeps every connection open but forwards nothing and
answers nothing (dropped packets, a firewall that drops: the case without any error).
Threads, not the event loop: the proxied client may be a pool in this very loop.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Proxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._forwarding = threading.Event()
        self._forwarding.set()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # the listener was closed
            with self._lock:
                self._sockets.append(client)
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        self._forwarding.wait()  # a blackholed connect hangs here, as a dropped SYN-ACK
        try:
            upstream = socket.create_connection(self.target)
        except OSError:
            client.close()
            return
        with self._lock:
            self._sockets.append(upstream)
        pairs = {client: upstream, upstream: client}
        while not self._closed:
            self._forwarding.wait()
            try:
                readable, _, _ = select.select(list(pairs), [], [], 0.1)
                if not self._forwarding.is_set():
                    continue  # data stays unread in the kernel: nothing goes through
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return
                    pairs[sock].sendall(data)
            except (OSError, ValueError):  # a socket closed by refuse()
                return

    def blackhole(self) -> None:
        """Forward nothing, answer nothing, close nothing."""
        self._forwarding.clear()

    def refuse(self) -> None:
        """Reset every connection and refuse new ones."""
        self._closed = True
        self._listener.close()
        self._forwarding.set()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    # Linger 0: close sends a reset, as a refusing firewall would.
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    sock.close()

    def dsn(self, dsn: str) -> str:
        """`dsn` (postgresql://user@host:port/db) rewritten to go through the proxy."""
        scheme, _, rest = dsn.partition("://")
        user, _, hostpath = rest.rpartition("@")
        _, _, path = hostpath.partition("/")
        return f"{scheme}://{user}@127.0.0.1:{self.port}/{path}"


@contextmanager
def proxy_to(dsn: str) -> Iterator[Proxy]:
    hostpath = dsn.partition("://")[2].rpartition("@")[2].partition("/")[0]
    host, _, port = hostpath.partition(":")
    proxy = Proxy(host, int(port or 5432))
    try:
        yield proxy
    finally:
        proxy.refuse()
