"""Background data jobs: bounded, holding their RPC's keys, ABORTED while running, errors once.

The work functions here are plain Python (a copy needs device-mapper: tests/kernel runs the
driver's real copies as jobs and measures Probe while one runs)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry

from csi_lvm.jobs import Caller, Jobs, Progress
from csi_lvm.locks import InFlight
from edge_common.errors import Aborted, ResourceExhausted
from edge_proto.csi.v1 import csi_pb2, csi_pb2_grpc
from tests.csi.conftest import CsiRig, LvmGate, block_cap, code_of, create_request

MiB = 1 << 20


class Gate:
    """Work that reports half its bytes, then waits to be let go."""

    def __init__(self, total: int, fail: Exception | None = None) -> None:
        self.total = total
        self.fail = fail
        self.halfway = threading.Event()
        self.go = threading.Event()
        self.runs = 0

    def __call__(self, progress: Progress) -> None:
        self.runs += 1
        progress(self.total // 2)
        self.halfway.set()
        assert self.go.wait(30)
        if self.fail is not None:
            raise self.fail
        progress(self.total)


def test_a_long_job_answers_aborted_keeps_the_keys_and_a_retry_never_starts_a_second_one(
) -> None:
    registry = CollectorRegistry()
    jobs, locks = Jobs(max_running=2, wait_seconds=0.05, registry=registry), InFlight()
    work = Gate(64 * MiB)
    held = locks.take("lv:vg/a", shared=["lv:vg/src"])
    with pytest.raises(Aborted, match="in the background"):
        jobs.run("vg/a", "create", "copy", 64 * MiB, work, held)
    assert work.halfway.wait(10)
    # The retry: ABORTED with the progress, and the volume stays locked against others.
    with pytest.raises(Aborted, match=r"copy in progress: 50% \(33554432 of 67108864"):
        jobs.check("vg/a", "create")
    with pytest.raises(Aborted):
        locks.take("lv:vg/a")
    with pytest.raises(Aborted):
        locks.take("lv:vg/src")  # the source cannot be deleted under the copy
    assert registry.get_sample_value("csi_lvm_data_job_progress_ratio",
                                     {"volume": "vg/a", "kind": "copy"}) == 0.5
    assert registry.get_sample_value("csi_lvm_data_jobs", {"state": "running"}) == 1
    work.go.set()
    for _ in range(200):
        if not jobs.running():
            break
        threading.Event().wait(0.05)
    jobs.check("vg/a", "create")  # done: nothing to report, the caller finds the volume
    assert locks.busy() == [] and work.runs == 1
    assert registry.get_sample_value("csi_lvm_data_job_bytes_total", {"kind": "copy"}) == \
        64 * MiB
    assert registry.get_sample_value("csi_lvm_data_job_progress_ratio",
                                     {"volume": "vg/a", "kind": "copy"}) is None


def test_a_job_done_within_the_wait_answers_at_once() -> None:
    jobs, locks = Jobs(wait_seconds=10), InFlight()
    work = Gate(MiB)
    work.go.set()
    jobs.run("vg/b", "create", "wipe", MiB, work, locks.take("lv:vg/b"))
    assert locks.busy() == [] and jobs.running() == []


def test_a_failed_background_job_is_reported_once_then_the_retry_starts_over() -> None:
    jobs, locks = Jobs(wait_seconds=0.05), InFlight()
    cleaned = threading.Event()
    work = Gate(MiB, fail=ResourceExhausted("no space for the copy"))
    with pytest.raises(Aborted):
        jobs.run("vg/c", "create", "copy", MiB, work, locks.take("lv:vg/c"),
                 on_failure=cleaned.set)
    work.go.set()
    assert cleaned.wait(10)
    for _ in range(200):
        if not jobs.running():
            break
        threading.Event().wait(0.05)
    with pytest.raises(ResourceExhausted, match="no space for the copy"):
        jobs.check("vg/c", "create")
    jobs.check("vg/c", "create")  # reported once
    assert locks.busy() == []


def test_another_rpc_is_never_answered_with_a_failed_jobs_error() -> None:
    jobs, locks = Jobs(wait_seconds=0.05), InFlight()
    work = Gate(MiB, fail=ResourceExhausted("no space for the copy"))
    with pytest.raises(Aborted):
        jobs.run("vg/e", "create", "copy", MiB, work, locks.take("lv:vg/e"))
    work.go.set()
    for _ in range(200):
        if not jobs.running():
            break
        threading.Event().wait(0.05)
    jobs.check("vg/e", "delete")  # DeleteVolume proceeds; the failure is dropped
    jobs.check("vg/e", "create")


def test_jobs_beyond_the_bound_queue_and_say_so() -> None:
    jobs, locks = Jobs(max_running=1, wait_seconds=0.05), InFlight()
    first, second = Gate(MiB), Gate(MiB)
    with pytest.raises(Aborted):
        jobs.run("vg/1", "create", "copy", MiB, first, locks.take("lv:vg/1"))
    assert first.halfway.wait(10)
    with pytest.raises(Aborted, match="queued"):
        jobs.run("vg/2", "create", "copy", MiB, second, locks.take("lv:vg/2"))
    with pytest.raises(Aborted, match="queued behind other data jobs"):
        jobs.check("vg/2", "create")
    assert second.runs == 0
    first.go.set()
    assert second.halfway.wait(10)  # starts when the first one is done
    second.go.set()
    for _ in range(200):
        if not jobs.running():
            break
        threading.Event().wait(0.05)
    assert locks.busy() == []


def _waiting(jobs: Jobs, key: str, work: Gate, caller: Caller, out: list[object]) -> None:
    """jobs.run in a thread: appends None (done) or the exception."""
    try:
        jobs.run(key, "create", "copy", MiB, work, InFlight().take(f"lv:{key}"), caller=caller)
        out.append(None)
    except Exception as exc:
        out.append(exc)


def test_the_wait_follows_the_callers_deadline_not_the_configured_bound() -> None:
    # wait_seconds (for callers without a deadline) is tiny; the caller's deadline is not.
    jobs = Jobs(wait_seconds=0.01)
    work, out = Gate(MiB), []
    thread = threading.Thread(target=_waiting, args=(jobs, "vg/d", work, Caller.within(60.0), out))
    thread.start()
    assert work.halfway.wait(10)
    threading.Event().wait(0.3)  # far beyond wait_seconds: still waiting
    assert out == [] and thread.is_alive()
    work.go.set()
    thread.join(30)
    assert out == [None]  # the copy ended within the call: success, no ABORTED
    # A retry while a job runs waits the same way (and finds it done: no second copy).
    second = Gate(MiB)
    with pytest.raises(Aborted):
        jobs.run("vg/f", "create", "copy", MiB, second, InFlight().take("lv:vg/f"),
                 caller=Caller.within(0.05))  # a near deadline: ABORTED before it
    threading.Timer(0.3, second.go.set).start()
    jobs.check("vg/f", "create", Caller.within(60.0))
    assert second.runs == 1 and jobs.running() == []


def test_a_near_deadline_answers_aborted_before_it_and_a_cancelled_caller_stops_waiting(
) -> None:
    jobs = Jobs(wait_seconds=60.0)
    assert jobs.budget(Caller.within(30.0)) == pytest.approx(28.0, abs=0.1)  # 2 s before
    assert jobs.budget(Caller.within(5.0)) == pytest.approx(4.0, abs=0.1)  # a fifth of it
    assert jobs.budget(Caller()) == 60.0
    work, out = Gate(MiB), []
    gone = threading.Event()
    caller = Caller.within(None, lambda: not gone.is_set())
    thread = threading.Thread(target=_waiting, args=(jobs, "vg/g", work, caller, out))
    thread.start()
    assert work.halfway.wait(10)
    gone.set()  # the client cancelled: the worker is free long before the 60 s bound
    thread.join(10)
    assert not thread.is_alive() and isinstance(out[0], Aborted)
    work.go.set()


def test_waiting_rpcs_are_bounded_so_the_rest_never_wait() -> None:
    jobs = Jobs(max_running=4, wait_seconds=30.0, max_waiting=2)
    gates = [Gate(MiB) for _ in range(3)]
    outs: list[list[object]] = [[], []]
    threads = [threading.Thread(target=_waiting, args=(jobs, f"vg/w{i}", gates[i], Caller(),
                                                       outs[i])) for i in range(2)]
    for t in threads:
        t.start()
    for gate in gates[:2]:
        assert gate.halfway.wait(10)
    for _ in range(200):  # both hold their waiter slot
        if jobs.waiting == 2:
            break
        threading.Event().wait(0.05)
    assert jobs.waiting == 2
    # A third RPC finds no waiter slot: ABORTED while the other two still wait (had it
    # waited, they would have given up on their 30 s too).
    with pytest.raises(Aborted, match="in the background"):
        jobs.run("vg/w2", "create", "copy", MiB, gates[2], InFlight().take("lv:vg/w2"))
    with pytest.raises(Aborted, match="in progress"):
        jobs.check("vg/w2", "create", Caller.within(30.0))
    assert all(t.is_alive() for t in threads) and outs == [[], []]
    for gate in gates:
        gate.go.set()
    for t in threads:
        t.join(10)
    assert outs == [[None], [None]] and jobs.waiting == 0


def test_creates_waiting_for_copies_never_take_the_workers_probe_needs(
        csi_factory: Callable[..., CsiRig], monkeypatch: pytest.MonkeyPatch) -> None:
    # 4 gRPC workers: at most 2 RPCs wait for data jobs. Six raw block creates (each a full
    # wipe job, held here by a gate: no device-mapper on this host) with a 30 s deadline.
    csi = csi_factory(grpc_workers=4, max_data_jobs=1, data_job_wait_seconds=0.01)
    assert csi.driver is not None
    controller = csi.driver.controller
    go = threading.Event()
    filled: list[str] = []

    def gated(ref: Any, *args: Any, **kwargs: Any) -> None:
        assert go.wait(60)
        filled.append(ref.lv)

    controller.live = True  # take the job path (the LVs stay inactive: metadata only)
    monkeypatch.setattr(controller, "_populate", gated)
    requests = [create_request(f"pvc-job{i}", caps=[block_cap()]) for i in range(6)]
    with ThreadPoolExecutor(6) as pool:
        calls = [pool.submit(csi.controller.CreateVolume, r, timeout=30) for r in requests]
        aborted = []
        for call in calls:  # four answer at once, two wait (as long as their deadline)
            try:
                call.result(timeout=1 if len(aborted) < 4 else 0.01)
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.ABORTED, err.details()
                aborted.append(err.details())
            except TimeoutError:
                pass
        assert len(aborted) == 4 and csi.driver.jobs.waiting == 2
        # Probe and the node service still find a worker.
        assert csi.identity.Probe(csi_pb2.ProbeRequest(), timeout=5).ready.value
        node = csi_pb2_grpc.NodeStub(csi.channel)
        assert node.NodeGetInfo(csi_pb2.NodeGetInfoRequest(), timeout=5).node_id
        go.set()
        done = [c.result(timeout=30) for c in calls if not c.exception(timeout=30)]
    assert len(done) == 2  # the waiting ones: success within their deadline, no ABORTED
    # The retries wait for their jobs; each volume was filled once.
    for r in requests:
        assert csi.controller.CreateVolume(r, timeout=30).volume.capacity_bytes == 8 * MiB
    assert sorted(filled) == sorted(f"pvc-job{i}" for i in range(6))


def test_a_caller_without_a_deadline_waits_data_job_wait_seconds_then_gets_aborted(
        csi_factory: Callable[..., CsiRig], monkeypatch: pytest.MonkeyPatch) -> None:
    csi = csi_factory(data_job_wait_seconds=0.2)
    assert csi.driver is not None
    controller = csi.driver.controller
    go = threading.Event()

    def gated(ref: Any, *args: Any, **kwargs: Any) -> None:
        go.wait(20)

    controller.live = True
    monkeypatch.setattr(controller, "_populate", gated)
    request = create_request("pvc-nodeadline", caps=[block_cap()])
    # grpc reports "no deadline" as one centuries away: that must not mean "wait forever".
    assert code_of(lambda: csi.controller.CreateVolume(request)) == grpc.StatusCode.ABORTED
    assert not go.is_set()
    go.set()
    assert csi.controller.CreateVolume(request, timeout=30).volume.volume_id


def test_the_rpcs_own_work_before_the_wait_counts_against_its_deadline(
        csi_factory: Callable[..., CsiRig], gate: LvmGate,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # lvcreate is held 3 s of a 6 s deadline: the wait for the copy gets what is left, and
    # the caller hears ABORTED (pending), not DEADLINE_EXCEEDED.
    csi = csi_factory(lvm_command=gate.command)
    assert csi.driver is not None
    controller = csi.driver.controller
    go = threading.Event()
    controller.live = True
    monkeypatch.setattr(controller, "_populate", lambda *a, **k: go.wait(60))
    request = create_request("pvc-late-wait", caps=[block_cap()])
    gate.arm("lvcreate")
    try:
        with ThreadPoolExecutor(1) as pool:
            call = pool.submit(csi.controller.CreateVolume, request, timeout=6)
            gate.wait_reached()
            threading.Event().wait(3)
            gate.release()
            with pytest.raises(grpc.RpcError) as info:
                call.result(timeout=30)
        assert info.value.code() == grpc.StatusCode.ABORTED, info.value.details()
    finally:
        go.set()
    assert csi.controller.CreateVolume(request, timeout=30).volume.volume_id
