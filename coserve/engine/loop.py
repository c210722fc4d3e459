"""Background thread that drives `Engine.step()` and hands results to waiting callers.

The engine core stays single-threaded: every call that touches it (adding
requests, loading adapters, reading stats) is queued as a command and run on
the loop thread between iterations. Callers get a `Future` per request.
"""
from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable

from coserve.engine.engine import Engine
from coserve.engine.request import Request

logger = logging.getLogger(__name__)


class EngineLoop:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._commands: queue.Queue[tuple[Callable[[], Any], Future]] = queue.Queue()
        self._pending: dict[str, Future] = {}
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="coserve-engine", daemon=True)
        self._thread.start()

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run fn on the loop thread and return its result (exceptions re-raised here)."""
        return self.submit(fn).result()

    def submit(self, fn: Callable[[], Any]) -> Future:
        if self._stopped.is_set():
            raise RuntimeError("the engine has been shut down")
        future: Future = Future()
        self._commands.put((fn, future))
        return future

    def track(self, request: Request) -> Future:
        """Called on the loop thread: a future that resolves with the finished request."""
        future: Future = Future()
        self._pending[request.request_id] = future
        return future

    def shutdown(self) -> None:
        self._stopped.set()
        self._commands.put((lambda: None, Future()))
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stopped.is_set():
            busy = self.engine.has_unfinished_requests()
            self._drain_commands(block=not busy)
            if self._stopped.is_set():
                break
            if self.engine.has_unfinished_requests():
                try:
                    finished = self.engine.step()
                except Exception:  # the loop must survive anything one step does
                    logger.exception("engine step failed")
                    continue
                for request in finished:
                    future = self._pending.pop(request.request_id, None)
                    if future is not None:
                        future.set_result(request)
        for future in self._pending.values():
            future.set_exception(RuntimeError("the engine was shut down before the request finished"))

    def _drain_commands(self, block: bool) -> None:
        while True:
            try:
                fn, future = self._commands.get(block=block, timeout=0.5 if block else None)
            except queue.Empty:
                return
            block = False
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)
