"""edge_common.workers: a gRPC thread pool that starts threads on demand and lets idle ones go,
and the same pool behind edge_common.server over a real unix socket."""

from __future__ import annotations

import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from edge_common.server import GrpcServer, unix_channel
from edge_common.workers import IdleExitThreadPool

SERVICE = "test.Wait"


def _wait_until(cond: object, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return True
        time.sleep(0.01)
    return False


def test_concurrent_calls_each_get_a_thread_up_to_max_workers() -> None:
    pool = IdleExitThreadPool(8, idle_seconds=5)
    barrier = threading.Barrier(6)  # passes only if all six run at the same time
    try:
        done = [pool.submit(barrier.wait, 5) for _ in range(6)]
        for f in done:
            f.result(timeout=10)
        assert pool.threads == 6
    finally:
        pool.shutdown()
    assert pool.threads == 0


def test_never_more_threads_than_max_workers_and_queued_work_still_runs() -> None:
    pool = IdleExitThreadPool(3, idle_seconds=5)
    running = 0
    peak = 0
    lock = threading.Lock()

    def job(n: int) -> int:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.02)
        with lock:
            running -= 1
        return n * 2

    try:
        results = [pool.submit(job, n) for n in range(20)]
        assert [f.result(timeout=10) for f in results] == [n * 2 for n in range(20)]
        assert peak == 3 and pool.threads == 3
    finally:
        pool.shutdown()


def test_a_bursts_threads_exit_when_idle_down_to_keep_and_then_memory_is_released() -> None:
    shrinks: list[int] = []
    pool = IdleExitThreadPool(16, idle_seconds=0.3, keep=2, on_shrink=lambda: shrinks.append(1))
    barrier = threading.Barrier(10)
    try:
        for f in [pool.submit(barrier.wait, 5) for _ in range(10)]:
            f.result(timeout=10)
        assert pool.threads == 10
        assert _wait_until(lambda: pool.threads == 2)
        assert shrinks, "on_shrink never ran after the pool went idle"
        time.sleep(0.6)
        assert pool.threads == 2  # the kept threads stay
    finally:
        pool.shutdown()


def test_a_trickle_of_calls_after_a_burst_does_not_keep_the_bursts_threads() -> None:
    # the most recently idle thread takes new work, so the others stay unused and exit;
    # handing work round-robin (a FIFO of waiters) would keep all ten alive
    pool = IdleExitThreadPool(16, idle_seconds=0.4, keep=1)
    barrier = threading.Barrier(10)
    try:
        for f in [pool.submit(barrier.wait, 5) for _ in range(10)]:
            f.result(timeout=10)
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            pool.submit(lambda: None).result(timeout=5)
            time.sleep(0.05)
        assert pool.threads <= 2
    finally:
        pool.shutdown()


def test_exceptions_reach_the_future_and_shutdown_refuses_new_work() -> None:
    pool = IdleExitThreadPool(2, idle_seconds=5)

    def boom() -> None:
        raise ValueError("bad")

    with pytest.raises(ValueError, match="bad"):
        pool.submit(boom).result(timeout=5)
    assert pool.submit(lambda: 7).result(timeout=5) == 7
    pool.shutdown(wait=True)
    assert pool.threads == 0
    with pytest.raises(RuntimeError):
        pool.submit(lambda: None)


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError):
        IdleExitThreadPool(0, idle_seconds=1)
    with pytest.raises(ValueError):
        IdleExitThreadPool(1, idle_seconds=0)


def _grpc_threads(before: set[threading.Thread]) -> int:
    """Server threads started since ``before`` (other tests' servers may have left theirs)."""
    return sum(1 for t in threading.enumerate() if t.name.startswith("grpc_") and t not in before)


def test_grpc_server_with_idle_thread_seconds_serves_a_burst_and_then_shrinks(
    tmp_path: Path,
) -> None:
    gate = threading.Barrier(8)  # every call waits for the others: needs 8 server threads

    def wait(request: bytes, context: grpc.ServicerContext) -> bytes:
        gate.wait(10)
        return request

    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {"Wait": grpc.unary_unary_rpc_method_handler(
            wait, request_deserializer=lambda b: b, response_serializer=lambda b: b)},
    )
    shrunk = threading.Event()
    sock = tmp_path / "w.sock"
    server = GrpcServer(
        f"unix://{sock}", [lambda s: s.add_generic_rpc_handlers((handler,))],
        max_workers=16, idle_thread_seconds=0.3, keep_threads=1, on_threads_shrink=shrunk.set,
    )
    before = set(threading.enumerate())
    server.start()
    try:
        with unix_channel(f"unix://{sock}") as channel:
            stub = channel.unary_unary(f"/{SERVICE}/Wait", request_serializer=lambda b: b,
                                       response_deserializer=lambda b: b)
            with futures.ThreadPoolExecutor(8) as callers:
                answers = list(callers.map(lambda i: stub(bytes([i]), timeout=10), range(8)))
        assert answers == [bytes([i]) for i in range(8)]
        assert _grpc_threads(before) >= 8
        assert _wait_until(lambda: _grpc_threads(before) == 1)
        assert shrunk.wait(5)
    finally:
        server.stop(1)
