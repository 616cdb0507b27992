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


class InFlight:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._exclusive: set[str] = set()
        self._shared: dict[str, int] = {}

    @contextlib.contextmanager
    def hold(self, *keys: str, shared: Sequence[str] = ()) -> Iterator[None]:
        """Hold every key (exclusive) and every shared key, or raise Aborted without holding any."""
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
        try:
            yield
        except BaseException as exc:
            running = still_running(exc)
            if running is None:
                self._release(exclusive, shared_keys)
            else:
                running.finished.add_done_callback(
                    lambda _done: self._release(exclusive, shared_keys))
            raise
        self._release(exclusive, shared_keys)

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
