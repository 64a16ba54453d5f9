"""A local S3 endpoint for tests: moto's standalone server in a subprocess.

    endpoint, stop = start_s3_server()
    ...  # point AWS_ENDPOINT_URL at endpoint, with any keys
    stop()
"""
from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Callable

from tests.conftest import free_port

START_TIMEOUT_S = 60.0


def start_s3_server() -> tuple[str, Callable[[], None]]:
    """(endpoint URL, a callable that stops the server) once the server accepts connections."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop() -> None:
        server.kill()
        server.wait()

    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return f"http://127.0.0.1:{port}", stop
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                stop()
                raise RuntimeError(f"moto's S3 server did not start on port {port} "
                                   f"(exit code {server.returncode})")
            time.sleep(0.1)
