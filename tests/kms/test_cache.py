"""The local-KEK cache: bounded LRU, single-flight misses, failures not cached."""

from __future__ import annotations

import threading
import time

import pytest

from kms_plugin.cache import SingleFlightLRU, WaitTimeout


def test_concurrent_misses_for_one_key_call_the_loader_once():
    events: list[str] = []
    cache: SingleFlightLRU[str, int] = SingleFlightLRU(8, on_event=events.append)
    release = threading.Event()
    calls = []

    def loader() -> int:
        calls.append(1)
        release.wait(5)
        return 42

    results: list[int] = []
    def call() -> None:
        results.append(cache.get_or_load("k", loader, deadline=None))

    threads = [threading.Thread(target=call) for _ in range(20)]
    for t in threads:
        t.start()
    while len(events) < 20:  # every caller has looked and is now waiting or loading
        time.sleep(0.001)
    release.set()
    for t in threads:
        t.join()
    assert results == [42] * 20
    assert len(calls) == 1
    assert events.count("miss") == 1 and events.count("coalesced") == 19
    assert cache.get_or_load("k", loader, deadline=None) == 42
    assert events[-1] == "hit" and len(calls) == 1


def test_a_failed_load_is_shared_by_waiters_and_not_cached():
    cache: SingleFlightLRU[str, int] = SingleFlightLRU(8)
    attempts = []

    def failing() -> int:
        attempts.append(1)
        raise RuntimeError("backend down")

    with pytest.raises(RuntimeError):
        cache.get_or_load("k", failing, deadline=None)
    assert cache.get_or_load("k", lambda: 7, deadline=None) == 7
    assert len(attempts) == 1


def test_a_waiter_gives_up_at_its_own_deadline():
    cache: SingleFlightLRU[str, int] = SingleFlightLRU(8)
    release = threading.Event()
    leader = threading.Thread(
        target=lambda: cache.get_or_load("k", lambda: release.wait(5) and 1, deadline=None)
    )
    leader.start()
    while not cache._inflight:
        time.sleep(0.001)
    with pytest.raises(WaitTimeout):
        cache.get_or_load("k", lambda: 2, deadline=time.monotonic() + 0.05)
    release.set()
    leader.join()


def test_least_recently_used_entries_are_evicted_at_capacity():
    cache: SingleFlightLRU[int, int] = SingleFlightLRU(3)
    for i in range(3):
        cache.put(i, i)
    assert cache.get(0) == 0  # 0 is now the most recent
    cache.put(3, 3)
    assert 1 not in cache and 0 in cache and 3 in cache and len(cache) == 3
