"""In-flight operation keys: a second call for the same volume or name gets ABORTED at once.

The CSI spec asks for exactly this ("operation pending for volume": ABORTED) instead of
queueing: the CO retries with backoff, and a long copy keeps running for the first caller.
Shared holders (e.g. several restores reading one snapshot) coexist; an exclusive holder
(e.g. DeleteSnapshot) excludes everyone.

A call that ends while one of its LVM changes still runs in the background (LvmStillRunning:
changes are never killed) leaves its keys held until that command ends, so the next call for
the volume gets ABORTED instead of racing the command, and then converges.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence

from edge_common.errors import Aborted
from edge_common.lvm import still_running


def thin_pool_key(vg: str, pool: str) -> str:
    """The serial() key of a thin pool: every change of its virtual sizes holds it."""
    return f"thin-pool:{vg}/{pool}"


class InFlight:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._exclusive: set[str] = set()
        self._shared: dict[str, int] = {}
        self._queues: dict[str, tuple[threading.Lock, int]] = {}

    @contextlib.contextmanager
    def serial(self, key: str) -> Iterator[None]:
        """Wait for, then hold, the mutex of key: for short check-then-change sections that
        must not interleave (e.g. two thin volumes taking the last room of one pool)."""
        with self._lock:
            mutex, users = self._queues.get(key, (threading.Lock(), 0))
            self._queues[key] = (mutex, users + 1)
        try:
            with mutex:
                yield
        finally:
            with self._lock:
                mutex, users = self._queues[key]
                if users > 1:
                    self._queues[key] = (mutex, users - 1)
                else:
                    del self._queues[key]

    @contextlib.contextmanager
    def hold(self, *keys: str, shared: Sequence[str] = ()) -> Iterator[None]:
        """Hold every key (exclusive) and every shared key, or raise Aborted without holding any."""
        with self.take(*keys, shared=shared).scope():
            yield

    def take(self, *keys: str, shared: Sequence[str] = ()) -> Held:
        """hold() without the `with`: the keys stay held until the returned Held is released,
        possibly by another thread (a background job inherits the keys of its RPC)."""
        exclusive = list(dict.fromkeys(keys))
        shared_keys = [k for k in dict.fromkeys(shared) if k not in exclusive]
        with self._lock:
            for key in exclusive:
                if key in self._exclusive or key in self._shared:
                    raise Aborted(f"an operation on {key} is already in progress")
            for key in shared_keys:
                if key in self._exclusive:
                    raise Aborted(f"an operation on {key} is already in progress")
            self._exclusive.update(exclusive)
            for key in shared_keys:
                self._shared[key] = self._shared.get(key, 0) + 1
        return Held(self, exclusive, shared_keys)

    def _release(self, exclusive: Sequence[str], shared_keys: Sequence[str]) -> None:
        with self._lock:
            self._exclusive.difference_update(exclusive)
            for key in shared_keys:
                left = self._shared[key] - 1
                if left:
                    self._shared[key] = left
                else:
                    del self._shared[key]

    def busy(self) -> list[str]:
        with self._lock:
            return sorted(self._exclusive | set(self._shared))


class Held:
    """Keys taken with InFlight.take(); release() once (later calls do nothing)."""

    def __init__(self, owner: InFlight, exclusive: list[str], shared: list[str]) -> None:
        self._owner = owner
        self._keys: tuple[list[str], list[str]] | None = (exclusive, shared)
        self._lock = threading.Lock()
        self.handed = False  # a background job now owns the keys (and releases them)

    def hand_over(self) -> None:
        self.handed = True

    def release(self) -> None:
        with self._lock:
            keys, self._keys = self._keys, None
        if keys is not None:
            self._owner._release(*keys)

    def release_after(self, exc: BaseException | None) -> None:
        """Release now, or, when exc says an LVM change still runs, once it has ended."""
        running = still_running(exc) if exc is not None else None
        if running is None:
            self.release()
        else:
            running.finished.add_done_callback(lambda _done: self.release())

    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        """Release on leaving (after a still-running LVM change, if one is left behind),
        unless the keys were handed over to a background job meanwhile."""
        try:
            yield
        except BaseException as exc:
            if not self.handed:
                self.release_after(exc)
            raise
        if not self.handed:
            self.release()
