"""A bounded LRU cache whose misses are single-flight.

N threads asking for the same missing key at the same time cause one call of the loader; the
others wait for its result (or its exception) up to their own deadline.  Failures are not
cached, so a later request tries again.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class WaitTimeout(Exception):
    """A follower's deadline passed while the leader was still loading."""


class SingleFlightLRU(Generic[K, V]):
    def __init__(
        self,
        capacity: int,
        *,
        on_event: Callable[[str], None] | None = None,
    ) -> None:
        """``on_event`` is called with "hit", "miss" (this caller loads) or "coalesced"
        (this caller waits for a concurrent load of the same key)."""
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self._capacity = capacity
        self._items: OrderedDict[K, V] = OrderedDict()
        self._inflight: dict[K, Future[V]] = {}
        self._lock = threading.Lock()
        self._on_event = on_event

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def __contains__(self, key: K) -> bool:
        with self._lock:
            return key in self._items

    def get(self, key: K) -> V | None:
        """The cached value (refreshing its recency), or None; no loading, no counting."""
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: K, value: V) -> None:
        with self._lock:
            self._put_locked(key, value)

    def _put_locked(self, key: K, value: V) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self._capacity:
            self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def get_or_load(self, key: K, loader: Callable[[], V], *, deadline: float | None) -> V:
        """Return the cached value or load it once for every concurrent caller.

        ``deadline`` (time.monotonic) bounds how long a follower waits for the leader; the
        leader's own time is bounded by the loader.
        """
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
                hit = True
                future: Future[V] | None = None
                leader = False
            else:
                hit = False
                future = self._inflight.get(key)
                leader = future is None
                if future is None:
                    future = Future()
                    self._inflight[key] = future
        if self._on_event:
            self._on_event("hit" if hit else "miss" if leader else "coalesced")
        if hit:
            return value  # type: ignore[return-value]
        assert future is not None
        if not leader:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                return future.result(timeout=timeout)
            except FutureTimeout as exc:
                raise WaitTimeout("timed out waiting for a concurrent load") from exc
        try:
            value = loader()
        except BaseException as exc:
            with self._lock:
                self._inflight.pop(key, None)
            future.set_exception(exc)
            raise
        with self._lock:
            self._put_locked(key, value)
            self._inflight.pop(key, None)
        future.set_result(value)
        return value


__all__ = ["SingleFlightLRU", "WaitTimeout"]
