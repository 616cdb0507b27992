"""Background data jobs: bounded, holding their RPC's keys, ABORTED while running, errors once.

The work functions here are plain Python (a copy needs device-mapper: tests/kernel runs the
driver's real copies as jobs and measures Probe while one runs)."""

from __future__ import annotations

import threading

import pytest
from prometheus_client import CollectorRegistry

from csi_lvm.jobs import Jobs, Progress
from csi_lvm.locks import InFlight
from edge_common.errors import Aborted, ResourceExhausted

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
