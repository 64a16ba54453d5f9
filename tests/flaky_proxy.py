"""A TCP proxy in front of an HTTP server that drops connections now and then.

Every `drop_every`-th request is never forwarded: its connection is reset instead, as by a
network or a server that fails (requests, not connections, are counted: clients keep their
connections alive for many requests).
The proxy counts what it dropped, so a test can prove it dropped something.
"""
from __future__ import annotations

import contextlib
import socket
import struct
import threading
from urllib.parse import urlparse


class FlakyProxy:
    def __init__(self, upstream_url: str, drop_every: int = 4) -> None:
        parsed = urlparse(upstream_url)
        self.upstream = (parsed.hostname, parsed.port)
        self.drop_every = drop_every
        self.dropped = 0
        self.requests = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._lock = threading.Lock()
        self._closing = False

    def __enter__(self) -> "FlakyProxy":
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._closing = True
        self._listener.close()

    def _accept(self) -> None:
        while not self._closing:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.upstream)
        except OSError:
            client.close()
            return
        threading.Thread(target=_pipe, args=(upstream, client), daemon=True).start()
        with contextlib.suppress(OSError):  # either end may go at any moment
            while data := client.recv(65536):
                if data.startswith(REQUEST_STARTS) and self._should_drop():
                    _reset(client)
                    _reset(upstream)
                    return
                upstream.sendall(data)
        _close(client, upstream)

    def _should_drop(self) -> bool:
        with self._lock:
            self.requests += 1
            drop = self.requests % self.drop_every == 0
            self.dropped += drop
        return drop


REQUEST_STARTS = (b"GET ", b"HEAD ", b"PUT ", b"POST ", b"DELETE ")


def _reset(end: socket.socket) -> None:
    """Close with linger 0: the peer sees a connection reset, not an orderly end."""
    with contextlib.suppress(OSError):
        end.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    end.close()


def _close(*ends: socket.socket) -> None:
    for end in ends:
        with contextlib.suppress(OSError):  # already closed by the other side
            end.shutdown(socket.SHUT_RDWR)
        end.close()


def _pipe(source: socket.socket, target: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            target.sendall(data)
    _close(source, target)
