"""Run the app with uvicorn on a background thread: start, a URL, graceful stop.

    server = HTTPServer(create_app(backend, settings), host="127.0.0.1", port=8000).start()
    print(server.url)          # http://127.0.0.1:8000
    ...
    server.stop()              # stops accepting, lets requests finish (bounded), then returns

The socket is bound here before uvicorn starts, so a busy port fails at once
with an OSError naming it, and port 0 picks a free port (`server.port` says
which). Signals stay with the caller (`coserve serve` has its own handlers);
uvicorn installs none off the main thread.
"""
from __future__ import annotations

import logging
import socket
import threading
import time

import uvicorn

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 30.0
GRACEFUL_SHUTDOWN_S = 5.0
"""How long open requests (streams included) may run on after stop() before they are cut."""


class HTTPServer:
    def __init__(self, app, host: str = "127.0.0.1", port: int = 8000, *, sock: socket.socket | None = None,
                 log_level: str = "warning", graceful_shutdown_s: float = GRACEFUL_SHUTDOWN_S) -> None:
        """sock: a socket from `bind_socket` (then host/port are read from it)."""
        self.app = app
        self._sock = sock if sock is not None else bind_socket(host, port)
        self.host = self._sock.getsockname()[0]
        self.port = self._sock.getsockname()[1]
        # NOTE: log_config=None leaves logging to the application (coserve's CLI configures it), and no
        # access log: `coserve serve` prints its own lines on stdout, which scripts and tests read.
        config = uvicorn.Config(app, log_config=None, log_level=log_level, access_log=False,
                                timeout_graceful_shutdown=graceful_shutdown_s)
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def state(self):
        return self.app.state.coserve

    def start(self, timeout: float = START_TIMEOUT_S) -> "HTTPServer":
        """Serve on a daemon thread; returns once uvicorn accepts connections."""
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        name="coserve-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError(f"the HTTP server on {self.url} exited while starting")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the HTTP server on {self.url} did not start within {timeout:.0f} s")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop accepting, give open requests `graceful_shutdown_s`, then close (idempotent)."""
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=timeout)
            if self._thread.is_alive():
                logger.warning("the HTTP server thread did not stop within %.0f s", timeout)
        self._sock.close()

    def __enter__(self) -> "HTTPServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (0 = any free port); OSError naming the address if taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock
