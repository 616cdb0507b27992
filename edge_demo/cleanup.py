"""Undo everything the demo made, in reverse order, whatever happened before.

Each thing the demo creates (a process, a mount, a VG, a loop disk, the work directory) is
registered right after it exists; ``run()`` undoes them last-in first-out, keeps going when one
of them fails, and reports what it could not undo. SIGINT and SIGTERM become ``Interrupted``
in the main thread, so the demo's ``finally`` runs; while cleaning up they are ignored, so a
second Ctrl-C cannot leave a loop device behind (every undo step has its own timeout).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import FrameType


class Interrupted(BaseException):  # noqa: N818 - like KeyboardInterrupt, not an error
    """SIGINT or SIGTERM arrived; the demo stops and cleans up."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signal.Signals(signum).name)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


@dataclass
class _Undo:
    what: str
    action: Callable[[], object]


@dataclass(frozen=True)
class CleanupReport:
    done: list[str]
    failed: list[tuple[str, str]]  # (what, why)


class Cleanup:
    def __init__(self) -> None:
        self._stack: list[_Undo] = []
        self._lock = threading.Lock()

    def push(self, what: str, action: Callable[[], object]) -> _Undo:
        """Register ``action`` (undoes ``what``); returns a handle for ``discard``."""
        undo = _Undo(what, action)
        with self._lock:
            self._stack.append(undo)
        return undo

    def discard(self, handle: _Undo) -> None:
        """``what`` was undone already (e.g. a process stopped on purpose)."""
        with self._lock, contextlib.suppress(ValueError):
            self._stack.remove(handle)

    def pending(self) -> list[str]:
        with self._lock:
            return [u.what for u in reversed(self._stack)]

    def run(self) -> CleanupReport:
        done: list[str] = []
        failed: list[tuple[str, str]] = []
        with signals_ignored():
            while True:
                with self._lock:
                    if not self._stack:
                        break
                    undo = self._stack.pop()
                try:
                    undo.action()
                except Exception as exc:  # keep going: the rest must still be undone
                    failed.append((undo.what, f"{type(exc).__name__}: {exc}"))
                else:
                    done.append(undo.what)
        return CleanupReport(done, failed)


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signum)


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM raise Interrupted in the main thread."""
    previous = {sig: signal.signal(sig, _raise_interrupted)
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block is done (create something, then register its
    undo, with no gap in between); they are delivered when it ends."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    blocked = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextlib.contextmanager
def signals_ignored() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN)
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


__all__ = ["Cleanup", "CleanupReport", "Interrupted", "signals_deferred", "signals_ignored",
           "signals_raise"]
