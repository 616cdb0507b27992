"""Background work: health probe, root-key refresh and local-KEK rotation.

One daemon thread does everything that talks to the backend outside a request:

* **health probe** every ``health_interval``: the root key's current version and state, then
  a real wrap + unwrap of random bytes through the backend (3 backend calls).  The result is
  an immutable :class:`HealthSnapshot` that Status answers from, so a Status call costs no
  backend call.
* **refresh** every ``refresh_interval``: ask the backend for its current root key version; a
  new version means a new local KEK and a new key_id (rotation without restart).  A probe whose
  wrap reports a different version than the current one triggers the refresh at once.
* **local KEK rotation** when the current one reaches its age or use limit.

Fault policy (docs/kms-plugin.md, pinned by tests/kms/test_faults.py):

* backend unreachable or throttling -> ``degraded``: Encrypt (current local KEK) and Decrypt of
  every local KEK in the cache keep working; Status stays ``ok`` unless
  ``report_degraded`` is set, because kube-apiserver takes itself out of service (readyz) when
  a KMS provider is unhealthy and there is nothing to gain from that while we can serve;
  logged at WARNING on every probe; metrics ``kms_plugin_backend_reachable 0`` and
  ``kms_plugin_health_state{state="degraded"} 1``.
* root key disabled or deleted -> ``unhealthy`` and loud: Status healthz names it; an ERROR
  log line on every probe; ``kms_plugin_root_key_unusable{reason=...} 1``; an optional
  Kubernetes Event; Encrypt is refused (FAILED_PRECONDITION: no new data under a revoked
  key) and Status reports a changed key_id, so kube-apiserver's cached seed expires (it keeps
  writing with it while the key_id is unchanged); Decrypt of cached local KEKs still works,
  uncached ones fail FAILED_PRECONDITION.  The block lifts only after a probe that reached the
  backend and succeeded; a probe that fails otherwise keeps it (and the loud state).
* anything unexpected (a bug, a file that is not UTF-8 ...) in a probe or a refresh ->
  ``unhealthy`` with the exception's type, never a stale ``ok``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from kms_plugin.backends.errors import (
    BackendError,
    BackendThrottled,
    BackendUnavailable,
    CredentialsRefused,
    InvalidCiphertext,
    KeyDisabled,
    KeyNotFound,
)
from kms_plugin.hardening import release_free_memory
from kms_plugin.keys import KeyManager
from kms_plugin.metrics import PluginMetrics, outcome_of

log = logging.getLogger("kms_plugin.monitor")

OK, DEGRADED, UNHEALTHY = "ok", "degraded", "unhealthy"
_PROBE_CONTEXT = {"kms-plugin.edge.io/purpose": "health-probe"}
_REASON_MAX = 200
TRIM_INTERVAL = 5.0  # seconds: the loop wakes at least this often to return freed memory


@dataclass(frozen=True)
class HealthSnapshot:
    state: str  # ok | degraded | unhealthy
    reason: str  # short, for people; "" when ok
    checked_at: float  # time.time() of the probe, 0 before the first
    backend_reachable: bool
    root_key_problem: str | None = None  # "disabled" | "not_found"


class Notifier(Protocol):
    """Where loud events go besides logs and metrics (e.g. Kubernetes Events)."""

    def root_key_unusable(self, reason: str, message: str) -> None: ...

    def root_key_usable(self) -> None: ...


@dataclass(frozen=True)
class MonitorSettings:
    health_interval: float = 30.0
    refresh_interval: float = 60.0
    retry_interval: float = 5.0  # while unhealthy or without a key
    backend_timeout: float = 5.0  # per background backend operation
    report_degraded: bool = False


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _REASON_MAX else text[: _REASON_MAX - 3] + "..."


class Monitor:
    def __init__(
        self,
        keys: KeyManager,
        settings: MonitorSettings,
        *,
        metrics: PluginMetrics | None = None,
        notifier: Notifier | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.keys = keys
        self.settings = settings
        self.metrics = metrics
        self.notifier = notifier
        self._clock = clock
        self._snapshot = HealthSnapshot(UNHEALTHY, "starting: no health probe yet", 0.0, False)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._next_probe = 0.0
        self._next_refresh = 0.0
        self._next_rotation_try = 0.0
        self._refresh_soon = False
        self._refresh_failure: str | None = None  # an unexpected error of the last refresh
        self.probes = 0  # completed probes, for tests

    # --- what Status and /readyz read ---------------------------------------------------

    @property
    def snapshot(self) -> HealthSnapshot:
        return self._snapshot

    def status_healthz(self) -> str:
        """Exactly "ok" when kube-apiserver may rely on us; otherwise a short reason."""
        snap = self._snapshot
        if self.keys.current is None:
            return _short(f"no root key yet: {snap.reason or 'waiting for the backend'}")
        if snap.state == OK:
            return "ok"
        if snap.state == DEGRADED and not self.settings.report_degraded:
            return "ok"
        return _short(snap.reason)

    # --- the loop ------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="kms-monitor", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wake(self) -> None:
        """Run due work now (e.g. the local KEK reached its use limit)."""
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                delay = self.run_once()
            except Exception as exc:  # the monitor must never die; say why and carry on
                log.exception("monitor iteration failed")
                self._set(HealthSnapshot(
                    UNHEALTHY, _short(f"background work failed: {type(exc).__name__}"),
                    time.time(), False,
                ))
                delay = self.settings.retry_interval
            release_free_memory()  # what a burst of requests left behind, while idle
            self._wake.wait(timeout=max(0.01, min(delay, TRIM_INTERVAL)))
            self._wake.clear()

    def run_once(self) -> float:
        """Do every task that is due; return seconds until the next one."""
        now = self._clock()
        s = self.settings
        retry = min(s.retry_interval, s.refresh_interval)  # never slower than the normal pace
        if self.keys.current is None or self._refresh_soon or now >= self._next_refresh:
            ok = self.refresh()
            self._refresh_soon = False
            self._next_refresh = now + (s.refresh_interval if ok else retry)
        if now >= self._next_probe:
            self.probe()
            healthy = self._snapshot.state == OK and self.keys.current is not None
            self._next_probe = now + (
                s.health_interval if healthy else min(s.health_interval, s.retry_interval)
            )
            if self._refresh_soon:
                ok = self.refresh()
                self._refresh_soon = False
                self._next_refresh = now + (s.refresh_interval if ok else retry)
        reason = self.keys.rotation_due()
        if reason is not None and now >= self._next_rotation_try:
            if not self.rotate_local_kek(reason):
                self._next_rotation_try = now + retry
        nxt = min(self._next_probe, self._next_refresh)
        cur = self.keys.current
        if cur is not None:
            age_due = cur.created_at + self.keys.policy.max_age_seconds
            nxt = min(nxt, max(age_due, self._next_rotation_try))
        return nxt - self._clock()

    def _deadline(self) -> float:
        return time.monotonic() + self.settings.backend_timeout

    def refresh(self) -> bool:
        try:
            self.keys.refresh_root(deadline=self._deadline())
            self._refresh_failure = None
            return True
        except Exception as exc:
            if isinstance(exc, BackendError):
                self._refresh_failed(exc)
                return False
            # a bug or a broken input: never leave a stale "ok" behind
            log.exception("root key refresh failed unexpectedly")
            self._refresh_failure = _short(f"root key refresh failed: {type(exc).__name__}")
            self._set(HealthSnapshot(UNHEALTHY, self._refresh_failure, time.time(), False))
            return False

    def _refresh_failed(self, exc: BackendError) -> None:
        level = logging.ERROR if isinstance(exc, KeyDisabled | KeyNotFound) else logging.WARNING
        log.log(
            level,
            "root key refresh failed: %s",
            exc,
            extra={"outcome": outcome_of(exc), "have_key": self.keys.current is not None},
        )
        if self.keys.current is None:
            self._set(HealthSnapshot(UNHEALTHY, _short(f"backend: {exc}"), time.time(),
                                     isinstance(exc, BackendThrottled)))

    def rotate_local_kek(self, reason: str) -> bool:
        try:
            self.keys.rotate_local_kek(reason, deadline=self._deadline())
            return True
        except BackendError as exc:
            log.warning(
                "local KEK rotation (%s) failed, still using the current one: %s",
                reason,
                exc,
                extra={"outcome": outcome_of(exc)},
            )
            return False

    def probe(self) -> HealthSnapshot:
        """One real round trip through the backend; updates the snapshot everyone reads."""
        backend = self.keys.backend
        have_key = self.keys.current is not None
        error: BaseException | None = None
        try:
            deadline = self._deadline()
            root = backend.current_key(deadline=deadline)  # the key's state (disabled ...)
            data = os.urandom(32)
            result = backend.wrap(data, _PROBE_CONTEXT, deadline=deadline)
            back = backend.unwrap(result.ciphertext, result.key, _PROBE_CONTEXT, deadline=deadline)
            if back != data:
                raise InvalidCiphertext("backend round trip returned different bytes")
            cur = self.keys.current
            if cur is None or root != cur.root or result.key != cur.root:
                self._refresh_soon = True  # the backend has another current version now
            snap = HealthSnapshot(OK, "", time.time(), True)
        except (KeyDisabled, KeyNotFound) as exc:
            error = exc
            problem = "disabled" if isinstance(exc, KeyDisabled) else "not_found"
            snap = HealthSnapshot(
                UNHEALTHY,
                _short(f"root key {problem.replace('_', ' ')}: {exc}"),
                time.time(),
                True,
                problem,
            )
        except CredentialsRefused as exc:  # an operator must act (and an HSM may lock the PIN)
            error = exc
            snap = HealthSnapshot(
                UNHEALTHY, _short(f"backend refuses the credentials: {exc}"), time.time(), True
            )
        except BackendThrottled as exc:
            error = exc
            snap = HealthSnapshot(DEGRADED, _short(f"backend throttling: {exc}"), time.time(), True)
        except BackendUnavailable as exc:
            error = exc
            state = DEGRADED if have_key else UNHEALTHY
            snap = HealthSnapshot(
                state, _short(f"backend unreachable: {exc}"), time.time(), False
            )
        except BackendError as exc:
            error = exc
            snap = HealthSnapshot(
                UNHEALTHY, _short(f"backend round trip failed: {exc}"), time.time(), True
            )
        except Exception as exc:  # a bug or a broken input: unhealthy, never a stale "ok"
            error = exc
            log.exception("health probe failed unexpectedly")
            snap = HealthSnapshot(
                UNHEALTHY, _short(f"health probe failed: {type(exc).__name__}"), time.time(),
                False,
            )
        blocked = self._snapshot.root_key_problem
        if blocked is not None and snap.root_key_problem is None and snap.state != OK:
            # the probe did not show the key usable again: the block (and the noise) stays
            snap = dataclasses.replace(
                snap, state=UNHEALTHY, root_key_problem=blocked,
                reason=_short(f"root key {blocked.replace('_', ' ')} (last seen so); now: "
                              f"{snap.reason}"),
            )
        if snap.state == OK and self._refresh_failure is not None:
            snap = HealthSnapshot(UNHEALTHY, self._refresh_failure, time.time(), True)
        self.probes += 1
        if self.metrics is not None:
            self.metrics.health_probes.labels(outcome_of(error)).inc()
        self._set(snap)
        return snap

    def _set(self, snap: HealthSnapshot) -> None:
        old = self._snapshot
        self._snapshot = snap
        if self.metrics is not None:
            self.metrics.set_health(snap.state, snap.backend_reachable, snap.root_key_problem)
        if snap.root_key_problem is not None:
            # loud, and repeated on every probe for as long as it lasts
            exc_cls = KeyDisabled if snap.root_key_problem == "disabled" else KeyNotFound
            self.keys.block_encrypt(exc_cls(snap.reason))
            log.error(
                "ROOT KEY UNUSABLE: %s. kube-apiserver cannot read Secrets encrypted with "
                "local KEKs that are not cached here; Encrypt is refused until the key is "
                "usable again",
                snap.reason,
                extra={"root_key_problem": snap.root_key_problem},
            )
            if self.notifier is not None and old.root_key_problem != snap.root_key_problem:
                problem = snap.root_key_problem
                self._notify(lambda n: n.root_key_unusable(problem, snap.reason))
        else:
            if self.keys.encrypt_blocked is not None and snap.state == OK:
                # only a probe that reached the backend and succeeded lifts the block
                self.keys.block_encrypt(None)
                log.warning("root key usable again; Encrypt allowed", extra={})
                if self.notifier is not None:
                    self._notify(lambda n: n.root_key_usable())
            if snap.state == DEGRADED:
                log.warning("degraded: %s; serving from cached local KEKs", snap.reason)
            elif snap.state == UNHEALTHY:
                log.error("unhealthy: %s", snap.reason)
            elif old.state != OK and old.checked_at:
                log.info("healthy again", extra={})

    def _notify(self, fn: Callable[[Notifier], None]) -> None:
        assert self.notifier is not None
        try:
            fn(self.notifier)
        except Exception as exc:  # events are best effort
            log.warning("could not record event: %s", type(exc).__name__)


__all__ = ["DEGRADED", "OK", "UNHEALTHY", "HealthSnapshot", "Monitor", "MonitorSettings",
           "Notifier"]
