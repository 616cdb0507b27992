"""Long data work (copies for clones and restores, full wipes) as background jobs.

A copy of a large volume must not pin a gRPC worker for minutes: the RPC that starts the work
waits for it at most `wait_seconds`; a job still running then keeps going in its own thread
(holding the RPC's in-flight keys until it ends) and the call answers ABORTED, the CSI spec's
"operation pending for volume". The CO retries: while the job runs the retry answers ABORTED
with its progress (never a second copy), after it the volume is simply there, and a failed job
is reported once to the next retry (which then starts over).

At most `max_running` jobs move data at once; further ones queue (their RPC answers ABORTED
"queued" the same way). Progress goes to the log (every 10 % or 30 s) and to the metrics:
csi_lvm_data_jobs{state}, csi_lvm_data_job_progress_ratio{volume,kind} while a job exists, and
csi_lvm_data_job_bytes_total{kind}.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge

from csi_lvm.locks import Held
from edge_common.errors import Aborted, Internal, ServiceError
from edge_common.log import log_context

log = logging.getLogger(__name__)

Progress = Callable[[int], None]
LOG_EVERY_SECONDS = 30.0


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
    def __init__(self, max_running: int = 2, wait_seconds: float = 10.0,
                 registry: CollectorRegistry | None = None) -> None:
        if max_running < 1:
            raise ValueError("max_running must be at least 1")
        self.wait_seconds = wait_seconds
        self._slots = threading.BoundedSemaphore(max_running)
        self._jobs: dict[str, Job] = {}
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

    def check(self, key: str, op: str) -> None:
        """Before `op` works on volume `key`: ABORTED while a job for it exists; the error of a
        job of the same op that failed since (once; another op's failure is dropped)."""
        with self._lock:
            job = self._jobs.get(key)
            if job is None:
                return
            if job.state in ("queued", "running"):
                raise Aborted(f"volume {key}: {job.describe()}; retry later")
            del self._jobs[key]
        if job.state == "failed" and job.error is not None and job.op == op:
            raise _as_service_error(job.error, f"the background {job.kind} of {key} failed")

    def running(self) -> list[Job]:
        with self._lock:
            return [j for j in self._jobs.values() if j.state in ("queued", "running")]

    # -------------------------------------------------------------- running

    def run(self, key: str, op: str, kind: str, total: int, work: Callable[[Progress], None],
            held: Held, *, on_failure: Callable[[], None] | None = None) -> None:
        """Run work(progress) as a job holding `held` (released when it ends). Returns when
        it finished within wait_seconds, raises its error when it failed then, and Aborted
        when it is still queued or running (it goes on; see check())."""
        job = Job(key, op, kind, total)
        with self._lock:
            if key in self._jobs:
                raise Aborted(f"volume {key}: {self._jobs[key].describe()}; retry later")
            self._jobs[key] = job
        held.hand_over()
        thread = threading.Thread(target=self._body, args=(job, work, held, on_failure),
                                  name=f"data-job {key}", daemon=True)
        thread.start()
        if not job.finished.wait(self.wait_seconds):
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


def _as_service_error(exc: BaseException, doing: str) -> ServiceError:
    if isinstance(exc, ServiceError):
        return exc
    return Internal(f"{doing}: {exc}")
