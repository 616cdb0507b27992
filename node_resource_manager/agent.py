"""The long-running loop: reconcile on every trigger (watch event, uevent, topology file change),
debounced, and periodically even without one."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from node_resource_manager.reconcile import Outcome, Reconciler, ReconcileResult
from node_resource_manager.sources import Snapshot

log = logging.getLogger(__name__)


class Agent:
    def __init__(
        self,
        reconciler: Reconciler,
        snapshot: Callable[[], Snapshot | None],
        *,
        resync_seconds: float = 60.0,
        debounce_seconds: float = 0.5,
        retry_seconds: float = 2.0,
    ) -> None:
        self.reconciler = reconciler
        self.snapshot = snapshot
        self.resync = resync_seconds
        self.debounce = debounce_seconds
        self.retry = retry_seconds
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._reasons: list[str] = []
        self.last_result: ReconcileResult | None = None
        self.reconciles = 0
        self.last_loop = time.monotonic()

    def stop(self, stop: threading.Event) -> None:
        """Ask ``run`` to return (safe from a signal handler)."""
        stop.set()
        self._wake.set()

    def trigger(self, why: str) -> None:
        with self._lock:
            if len(self._reasons) < 100:
                self._reasons.append(why)
        self._wake.set()

    def run(self, stop: threading.Event) -> None:
        next_due = time.monotonic()
        failures = 0
        while not stop.is_set():
            self.last_loop = time.monotonic()
            timeout = max(0.0, next_due - time.monotonic())
            woke = self._wake.wait(timeout)
            if stop.is_set():
                break
            if woke and self.debounce > 0:
                stop.wait(self.debounce)  # let a burst of events arrive
            self._wake.clear()
            with self._lock:
                reasons, self._reasons = self._reasons, []
            snap = self.snapshot()
            if snap is None:  # the first watch read has not arrived yet
                next_due = time.monotonic() + 0.2
                continue
            log.debug("reconciling", extra={"why": reasons[:10] or ["resync"]})
            try:
                result = self.reconciler.reconcile(snap.config, snap.labels)
            except Exception:
                log.exception("reconcile crashed; retrying")
                failures += 1
                next_due = time.monotonic() + min(self.retry * 2 ** failures, self.resync)
                continue
            self.last_result = result
            self.reconciles += 1
            if result.outcome in (Outcome.LVM_ERROR, Outcome.ERROR):
                failures += 1
                next_due = time.monotonic() + min(self.retry * 2 ** (failures - 1), self.resync)
            else:
                failures = 0
                next_due = time.monotonic() + self.resync

    # ------------------------------------------------------------------ health

    def healthy(self) -> tuple[bool, str]:
        idle = time.monotonic() - self.last_loop
        limit = self.resync * 3 + 60
        if idle > limit:
            return False, f"reconcile loop stuck for {idle:.0f}s"
        return True, f"{self.reconciles} reconcile(s)"

    def ready(self) -> tuple[bool, str]:
        result = self.last_result
        if result is None:
            return False, "no reconcile yet"
        return True, f"last result {result.outcome}: {result.message}"
