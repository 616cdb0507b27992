"""Long data work (copies for clones and restores, full wipes) as background jobs.

A copy of a large volume runs in its own thread, never in a gRPC worker, and at most
`max_running` move data at once (further ones queue). The RPC that starts a job, and a retry
that finds it running, wait for it as long as the caller waits: until shortly before the RPC's
deadline (csi-provisioner and csi-sanity set one; a CreateVolume from a source is expected to
succeed within it), or `wait_seconds` when the caller set none. A job still running then keeps
going (holding the RPC's in-flight keys until it ends) and the call answers ABORTED with the
progress, the CSI spec's "operation pending for volume"; the CO retries, and the retry waits
again (never a second copy). A failed job is reported once to the next retry of its operation
(which then starts over).

Waiting pins a gRPC worker, so at most `max_waiting` RPCs wait at once (the driver gives half
its workers): one more answers ABORTED at once, and Probe, NodePublish and NodeGetVolumeStats
always find a free worker. A caller that cancels stops waiting at once.

Progress goes to the log (every 10 % or 30 s) and to the metrics: csi_lvm_data_jobs{state},
csi_lvm_data_job_progress_ratio{volume,kind} while a job exists, and
csi_lvm_data_job_bytes_total{kind}.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge

from csi_lvm.locks import Held
from edge_common.errors import Aborted, Internal, ServiceError
from edge_common.log import log_context

if TYPE_CHECKING:
    from csi_lvm.config import CsiConfig

log = logging.getLogger(__name__)

Progress = Callable[[int], None]
LOG_EVERY_SECONDS = 30.0
#: An RPC with a deadline answers this long before it (less when the deadline is near), so
#: ABORTED with the progress arrives before the caller gives up on its own.
DEADLINE_MARGIN = 2.0
#: A deadline further away than this is none (grpc reports ~2.9e11 years for "none").
NO_DEADLINE = 365 * 24 * 3600.0
#: A waiting RPC looks whether its caller is still there this often.
POLL_SECONDS = 0.5


@dataclass(frozen=True)
class Caller:
    """What a waiting RPC knows of its caller: its deadline (time.monotonic(); None: it set
    none) and whether it is still waiting (a cancelled RPC stops waiting). The deadline is
    absolute: the RPC's own work before it waits (an lvcreate) counts against it."""

    deadline: float | None = None
    active: Callable[[], bool] = field(default=lambda: True)

    @classmethod
    def within(cls, seconds: float | None,
               active: Callable[[], bool] = lambda: True) -> Caller:
        return cls(None if seconds is None else time.monotonic() + seconds, active)

    @classmethod
    def of(cls, context: object) -> Caller:
        """From a grpc.ServicerContext (anything without one: no deadline)."""
        time_remaining = getattr(context, "time_remaining", None)
        is_active = getattr(context, "is_active", None)
        remaining = time_remaining() if callable(time_remaining) else None
        if remaining is not None and remaining > NO_DEADLINE:
            remaining = None  # grpc's "no deadline" is a deadline centuries away
        return cls.within(remaining, is_active if callable(is_active) else (lambda: True))

    def remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()


@dataclass
class Job:
    key: str  # the volume id
    op: str  # the RPC that started it: "create" | "delete"
    kind: str  # "copy" | "wipe"
    total: int  # bytes
    done: int = 0
    state: str = "queued"  # queued | running | done | failed
    error: BaseException | None = None
    finished: threading.Event = field(default_factory=threading.Event)

    def describe(self) -> str:
        if self.state == "queued":
            return f"queued behind other data jobs ({self.kind}, {self.total} bytes)"
        percent = 100.0 * self.done / self.total if self.total else 100.0
        return f"{self.kind} in progress: {percent:.0f}% ({self.done} of {self.total} bytes)"


class Jobs:
    def __init__(self, max_running: int = 2, wait_seconds: float = 60.0,
                 registry: CollectorRegistry | None = None, *, max_waiting: int = 8) -> None:
        if max_running < 1 or max_waiting < 0:
            raise ValueError("max_running must be at least 1 and max_waiting not negative")
        self.wait_seconds = wait_seconds
        self._waiters = threading.BoundedSemaphore(max_waiting) if max_waiting else None
        self._slots = threading.BoundedSemaphore(max_running)
        self._jobs: dict[str, Job] = {}
        self.waiting = 0  # RPCs waiting for a job now
        self._lock = threading.Lock()
        registry = registry if registry is not None else CollectorRegistry()
        self._count = Gauge("csi_lvm_data_jobs", "Background data jobs (copies, full wipes)",
                            ["state"], registry=registry)
        self._ratio = Gauge("csi_lvm_data_job_progress_ratio",
                            "Share of a background data job done (0..1), while it exists",
                            ["volume", "kind"], registry=registry)
        self._bytes = Counter("csi_lvm_data_job_bytes", "Bytes processed by data jobs",
                              ["kind"], registry=registry)
        for state in ("queued", "running"):
            self._count.labels(state).set(0)

    # -------------------------------------------------------------- asking

    def check(self, key: str, op: str, caller: Caller | None = None) -> None:
        """Before `op` works on volume `key`: while a job for it exists, wait for it as long as
        the caller waits (see wait()), then ABORTED if it still runs; the error of a job of the
        same op that failed since (once; another op's failure is dropped)."""
        with self._lock:
            job = self._jobs.get(key)
        if job is None:
            return
        if not self.wait(job, caller or Caller()):
            raise Aborted(f"volume {key}: {job.describe()}; retry later")
        with self._lock:
            if self._jobs.get(key) is not job:
                return  # done (and dropped), or another RPC took its result
            del self._jobs[key]
        if job.state == "failed" and job.error is not None and job.op == op:
            raise _as_service_error(job.error, f"the background {job.kind} of {key} failed")

    def budget(self, caller: Caller) -> float:
        """How long an RPC of this caller may wait for a job."""
        remaining = caller.remaining()
        if remaining is None:
            return self.wait_seconds
        return max(0.0, remaining - min(DEADLINE_MARGIN, remaining / 5))

    def wait(self, job: Job, caller: Caller) -> bool:
        """Wait for `job` to end within the caller's budget, holding a waiter slot (none
        free: no wait). True when it ended."""
        if job.finished.is_set():
            return True
        if self._waiters is None or not self._waiters.acquire(blocking=False):
            return False
        with self._lock:
            self.waiting += 1
        try:
            end = time.monotonic() + self.budget(caller)
            while caller.active():
                left = end - time.monotonic()
                if left <= 0:
                    break
                if job.finished.wait(min(POLL_SECONDS, left)):
                    return True
            return job.finished.is_set()
        finally:
            with self._lock:
                self.waiting -= 1
            self._waiters.release()

    def running(self) -> list[Job]:
        with self._lock:
            return [j for j in self._jobs.values() if j.state in ("queued", "running")]

    # -------------------------------------------------------------- running

    def run(self, key: str, op: str, kind: str, total: int, work: Callable[[Progress], None],
            held: Held, *, on_failure: Callable[[], None] | None = None,
            caller: Caller | None = None) -> None:
        """Run work(progress) as a job holding `held` (released when it ends). Returns when
        it finished while the caller waits (see wait()), raises its error when it failed
        then, and Aborted when it is still queued or running (it goes on; see check())."""
        job = Job(key, op, kind, total)
        with self._lock:
            if key in self._jobs:
                raise Aborted(f"volume {key}: {self._jobs[key].describe()}; retry later")
            self._jobs[key] = job
        held.hand_over()
        thread = threading.Thread(target=self._body, args=(job, work, held, on_failure),
                                  name=f"data-job {key}", daemon=True)
        thread.start()
        if not self.wait(job, caller or Caller()):
            raise Aborted(f"volume {key}: {job.describe()} in the background; retry later")
        with self._lock:
            self._jobs.pop(key, None)
        if job.error is not None:
            raise _as_service_error(job.error, f"the {kind} of {key} failed")

    def _body(self, job: Job, work: Callable[[Progress], None], held: Held,
              on_failure: Callable[[], None] | None) -> None:
        with log_context(volume_id=job.key, job=job.kind):
            self._count.labels("queued").inc()
            try:
                with self._slots:
                    self._count.labels("queued").dec()
                    self._count.labels("running").inc()
                    job.state = "running"
                    try:
                        self._work(job, work)
                        job.state = "done"
                    finally:
                        self._count.labels("running").dec()
            except BaseException as exc:  # the job's error belongs to the next RPC
                job.error, job.state = exc, "failed"
                log.error("data job failed", extra={"error": str(exc)})
                if on_failure is not None:
                    try:
                        on_failure()
                    except Exception:
                        log.exception("cleaning up after the failed data job failed")
            finally:
                with contextlib.suppress(KeyError):
                    self._ratio.remove(job.key, job.kind)
                with self._lock:
                    if job.state == "done":
                        self._jobs.pop(job.key, None)
                held.release_after(job.error)
                job.finished.set()

    def _work(self, job: Job, work: Callable[[Progress], None]) -> None:
        started = time.monotonic()
        state = {"logged_at": started, "logged_tenth": 0.0, "counted": 0.0}
        log.info("data job started", extra={"bytes": job.total})

        def progress(done: int) -> None:
            job.done = done
            self._bytes.labels(job.kind).inc(max(0, done - state["counted"]))
            state["counted"] = done
            if job.total:
                self._ratio.labels(job.key, job.kind).set(done / job.total)
            tenth = int(10 * done / job.total) if job.total else 10
            now = time.monotonic()
            if tenth > state["logged_tenth"] or now - state["logged_at"] >= LOG_EVERY_SECONDS:
                state["logged_tenth"], state["logged_at"] = tenth, now
                log.info("data job progress", extra={"done_bytes": done, "bytes": job.total,
                                                     "percent": round(100 * done / job.total)
                                                     if job.total else 100})

        work(progress)
        log.info("data job finished", extra={"bytes": job.total,
                                             "seconds": round(time.monotonic() - started, 3)})


def max_job_waiters(config: CsiConfig) -> int:
    """RPCs that may wait for data jobs at once: half the gRPC workers, so the other half
    always serves Probe, NodePublish, NodeGetVolumeStats and the rest (one worker: none)."""
    return config.grpc_workers // 2


def _as_service_error(exc: BaseException, doing: str) -> ServiceError:
    if isinstance(exc, ServiceError):
        return exc
    return Internal(f"{doing}: {exc}")
