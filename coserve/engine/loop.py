"""Drives `Engine.step()` for many threads, on the thread that is waiting when there is one.

The engine core stays single-threaded: every call that touches it (adding
requests, loading adapters, reading stats) is queued as a command and run
between iterations by whichever thread holds the driver lock. A caller blocked
on a result drives the engine itself; a background thread drives only while no
caller waits (e.g. work submitted without waiting).

NOTE: why callers drive. With OpenMP (torch's CPU backend), parallel regions
started from a second thread while another thread's OpenMP team exists cost
about 10x more (measured here: a [16, 512] x [512, 16] linear takes 7 us on the
main thread, 60-150 us on a worker thread), which made the engine several
times slower for small ops. Stepping on the caller's thread keeps torch work on
the thread that loaded the model in the common case. Where callers come from a
pool of threads (a Ray actor's methods), `caller_drives=False` keeps every step
on the loop's own thread instead.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from typing import Any, Callable

from coserve.engine.engine import Engine
from coserve.engine.request import Request

logger = logging.getLogger(__name__)

_POLL_SECONDS = 0.002


class EngineLoop:
    def __init__(self, engine: Engine, caller_drives: bool = True, start_driver: bool = True) -> None:
        """start_driver=False: no driver thread is started; the owner calls `run_driver()` on the
        thread it wants every step on (the one that built the engine)."""
        self.engine = engine
        self.caller_drives = caller_drives
        self._commands: queue.Queue[tuple[Callable[[], Any], Future]] = queue.Queue()
        self._pending: dict[str, Future] = {}
        self._driver = threading.Lock()          # held while stepping the engine
        self._state = threading.Condition()      # guards _num_waiters, wakes the background driver
        self._num_waiters = 0
        self._stopped = False
        self._thread: threading.Thread | None = None
        if start_driver:
            self._thread = threading.Thread(target=self._background, name="coserve-engine", daemon=True)
            self._thread.start()

    # ---- public ----------------------------------------------------------------------------

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run fn between engine iterations and return its result (exceptions re-raised here)."""
        return self.wait(self.submit(fn))

    def submit(self, fn: Callable[[], Any]) -> Future:
        if self._stopped:
            raise RuntimeError("the engine has been shut down")
        future: Future = Future()
        self._commands.put((fn, future))
        with self._state:
            self._state.notify_all()
        return future

    def wait(self, future: Future, timeout: float | None = None) -> Any:
        """Block until the future is done, stepping the engine meanwhile if nobody else is."""
        if not self.caller_drives:
            return self._wait_without_driving(future, timeout)
        with self._state:
            self._num_waiters += 1
        try:
            # A deadline, checked after every step too: a waiter with a timeout (a stream polling for
            # new tokens) must get control back even while the engine always has work.
            deadline = None if timeout is None else time.monotonic() + timeout
            while not future.done():
                if self._stopped or (deadline is not None and time.monotonic() >= deadline):
                    break
                if self._driver.acquire(blocking=False):
                    try:
                        did_work = self._run_once()
                    finally:
                        self._driver.release()
                    if did_work:
                        continue
                wait_futures([future], timeout=_POLL_SECONDS)
            return future.result(timeout=0 if timeout is not None else None)
        finally:
            with self._state:
                self._num_waiters -= 1

    def _wait_without_driving(self, future: Future, timeout: float | None) -> Any:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not future.done() and not self._stopped:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            wait_futures([future], timeout=0.1 if left is None else min(0.1, left))
        return future.result(timeout=0 if timeout is not None or self._stopped else None)

    def track(self, request: Request) -> Future:
        """Called from a command: a future that resolves with the request once it finishes."""
        future: Future = Future()
        self._pending[request.request_id] = future
        return future

    def shutdown(self) -> None:
        with self._state:
            self._stopped = True
            self._state.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
        with self._driver:
            while not self._commands.empty():
                _, future = self._commands.get_nowait()
                future.set_exception(RuntimeError("the engine was shut down"))
            for future in self._pending.values():
                future.set_exception(RuntimeError("the engine was shut down before the request finished"))
            self._pending.clear()

    # ---- driving ---------------------------------------------------------------------------

    def _has_work(self) -> bool:
        return not self._commands.empty() or self.engine.has_unfinished_requests()

    def _run_once(self) -> bool:
        """Run queued commands, then one engine step if there is work. Caller holds the driver lock."""
        did_work = False
        while True:
            try:
                fn, future = self._commands.get_nowait()
            except queue.Empty:
                break
            did_work = True
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)
        if self.engine.has_unfinished_requests():
            did_work = True
            try:
                finished = self.engine.step()
            except Exception:  # the loop must survive anything one step does
                logger.exception("engine step failed")
                return did_work
            for request in finished:
                future = self._pending.pop(request.request_id, None)
                if future is not None:
                    future.set_result(request)
        return did_work

    def run_driver(self) -> None:
        """Drive the engine on the calling thread until `shutdown` (with start_driver=False)."""
        self._background()

    def _background(self) -> None:
        while True:
            with self._state:
                while not self._stopped and (self._num_waiters > 0 or not self._has_work()):
                    self._state.wait(timeout=0.05)
                if self._stopped:
                    return
            if self._driver.acquire(blocking=False):
                try:
                    while self._num_waiters == 0 and not self._stopped and self._run_once():
                        pass
                finally:
                    self._driver.release()
