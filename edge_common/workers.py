"""A thread pool for gRPC servers whose idle threads exit.

``concurrent.futures.ThreadPoolExecutor`` keeps every thread it ever started: after one burst
of N concurrent calls an idle server holds N threads (their stacks and interpreter state) for
good.  This pool starts threads on demand up to ``max_workers`` the same way (a call never
waits while fewer than ``max_workers`` threads are busy), and a thread that found no work for
``idle_seconds`` exits, down to ``keep`` threads.  ``on_shrink`` runs after such an exit that
leaves no thread busy (e.g. to give the memory of the burst back to the system).  grpc only
calls ``submit``.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from concurrent import futures
from typing import Any

_Item = tuple["futures.Future[Any]", Callable[..., Any], tuple[Any, ...], dict[str, Any]]


class IdleExitThreadPool(futures.Executor):
    def __init__(
        self,
        max_workers: int,
        *,
        idle_seconds: float,
        keep: int = 0,
        thread_name_prefix: str = "worker",
        on_shrink: Callable[[], None] | None = None,
    ) -> None:
        if max_workers < 1:
            raise ValueError("max_workers must be >= 1")
        if idle_seconds <= 0:
            raise ValueError("idle_seconds must be > 0")
        self._max = max_workers
        self._idle_seconds = idle_seconds
        self._keep = max(0, keep)
        self._prefix = thread_name_prefix
        self._on_shrink = on_shrink
        self._lock = threading.Lock()
        self._work: collections.deque[_Item] = collections.deque()
        # waiting threads, the most recently idle last: new work goes to the last one, so the
        # threads a burst started stay unused afterwards and exit (a FIFO would keep them all
        # busy with a trickle of calls)
        self._idle: list[threading.Lock] = []  # each held; release() wakes its thread
        self._threads = 0  # started and not exited
        self._started = 0  # for thread names
        self._shutdown = False
        self._all_exited = threading.Condition(self._lock)

    @property
    def threads(self) -> int:
        with self._lock:
            return self._threads

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> futures.Future[Any]:
        future: futures.Future[Any] = futures.Future()
        wake: threading.Lock | None = None
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._work.append((future, fn, args, kwargs))
            if self._idle:
                wake = self._idle.pop()  # the most recently idle thread takes it
            elif self._threads < self._max:
                self._threads += 1
                self._started += 1
                thread = threading.Thread(
                    target=self._worker, name=f"{self._prefix}_{self._started}", daemon=True
                )
                try:
                    thread.start()
                except BaseException:
                    self._threads -= 1
                    self._work.pop()
                    raise
            # else: every thread is busy; the first one free takes it
        if wake is not None:  # after our lock: the woken thread must not wait for it at once
            try:
                wake.release()
            except RuntimeError:  # still released by an earlier hand-over: it wakes anyway
                pass
        return future

    def _worker(self) -> None:
        wake = threading.Lock()  # a lock, not an Event: acquire(timeout) is one C call
        wake.acquire()
        while True:
            with self._lock:
                item = self._work.popleft() if self._work else None
                if item is None:
                    if self._shutdown:
                        self._exit()
                        return
                    self._idle.append(wake)
            if item is not None:
                _run(*item)
                del item  # nothing of a finished call stays referenced while idle
                continue
            # held again after a wake-up; a release that came just after a timeout wakes the
            # next wait at once (woken, not handed): that thread simply looks for work again
            woken = wake.acquire(timeout=self._idle_seconds)
            with self._lock:
                handed = wake not in self._idle  # submit or shutdown took it off (maybe late)
                if not handed:
                    self._idle.remove(wake)
                if (handed or woken or self._work or self._shutdown
                        or self._threads <= self._keep):
                    continue
                self._exit()
                idle_now = len(self._idle) == self._threads
            if idle_now and self._on_shrink is not None:
                self._on_shrink()
            return

    def _exit(self) -> None:
        """This thread leaves (lock held)."""
        self._threads -= 1
        self._all_exited.notify_all()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
            if cancel_futures:
                while self._work:
                    self._work.popleft()[0].cancel()
            while self._idle:
                self._idle.pop().release()
            if wait:
                while self._threads:
                    self._all_exited.wait()


def _run(
    future: futures.Future[Any], fn: Callable[..., Any], args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> None:
    if not future.set_running_or_notify_cancel():
        return
    try:
        result = fn(*args, **kwargs)
    except BaseException as exc:
        future.set_exception(exc)
    else:
        future.set_result(result)


__all__ = ["IdleExitThreadPool"]
