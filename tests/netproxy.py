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
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class Proxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._forwarding = threading.Event()
        self._forwarding.set()
        self._closed = False
        self._start(self._accept)

    def _start(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def _track(self, sock: socket.socket) -> bool:
        """Keep `sock` for `refuse` to reset; if `refuse` already ran, close it now
        (False). Without this, a connection accepted, or an upstream connected, just
        after `refuse` went through the list would stay open, to be collected unclosed
        long after, in whatever test runs then."""
        with self._lock:
            if not self._closed:
                self._sockets.append(sock)
                return True
        sock.close()
        return False

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # the listener was closed
            if not self._track(client):
                return
            self._start(self._serve, client)

    def _serve(self, client: socket.socket) -> None:
        self._forwarding.wait()  # a blackholed connect hangs here, as a dropped SYN-ACK
        upstream: socket.socket | None = None
        try:
            if self._closed:
                return  # refused while it hung: never reach the target
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                return
            if not self._track(upstream):
                return
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
        finally:
            # One side ended (or the proxy was refused): end the other too, as a
            # proxy does, rather than leave it open for nobody.
            client.close()
            if upstream is not None:
                upstream.close()

    def join(self, timeout_s: float) -> None:
        """Wait for every thread of the proxy to end (after `refuse`)."""
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout_s)

    def blackhole(self) -> None:
        """Forward nothing, answer nothing, close nothing."""
        self._forwarding.clear()

    def refuse(self) -> None:
        """Reset every connection and refuse new ones."""
        with self._lock:
            self._closed = True
        # Shut down first: on Linux, closing a socket does not wake a thread blocked in
        # its accept(); a shutdown does.
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
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
