"""Prometheus metrics of the KMS plugin, and a backend wrapper that counts every backend call.

Every metric lives in the plugin's own registry (one per plugin instance, so tests can run
several plugins in one process).  Key ids appear only as ``sha256:<hex>`` labels, the form
kube-apiserver uses in its own logs and metrics.
"""

from __future__ import annotations

import threading
import time
from collections import Counter as _Tally
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from kms_plugin.backends.base import KeyBackend, RootKeyVersion, WrapResult
from kms_plugin.backends.errors import (
    BackendThrottled,
    BackendUnavailable,
    CredentialsRefused,
    InvalidCiphertext,
    KeyDisabled,
    KeyNotFound,
)
from kms_plugin.envelope import key_id_hash
from kms_plugin.keys import KeyEvents, LocalKek

_RPC_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                0.5, 1.0, 2.5, 5.0)
_BACKEND_BUCKETS = (0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

T = TypeVar("T")


def outcome_of(exc: BaseException | None) -> str:
    if exc is None:
        return "ok"
    if isinstance(exc, BackendThrottled):
        return "throttled"
    if isinstance(exc, CredentialsRefused):
        return "credentials_refused"
    if isinstance(exc, BackendUnavailable):
        return "unavailable"
    if isinstance(exc, KeyDisabled):
        return "key_disabled"
    if isinstance(exc, KeyNotFound):
        return "key_not_found"
    if isinstance(exc, InvalidCiphertext):
        return "invalid_ciphertext"
    return "error"


class PluginMetrics(KeyEvents):
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "kms_plugin_requests_total",
            "gRPC requests by API (v2, v1beta1), method and status code",
            ["api", "method", "code"], registry=r,
        )
        self.latency = Histogram(
            "kms_plugin_request_duration_seconds", "gRPC request latency by API and method",
            ["api", "method"], buckets=_RPC_BUCKETS, registry=r,
        )
        self.backend_calls = Counter(
            "kms_plugin_backend_calls_total",
            "Calls to the root-key backend by operation (current_key, wrap, unwrap) and outcome",
            ["backend", "operation", "outcome"], registry=r,
        )
        self.backend_latency = Histogram(
            "kms_plugin_backend_call_duration_seconds", "Backend call latency by operation",
            ["backend", "operation"], buckets=_BACKEND_BUCKETS, registry=r,
        )
        self.cache_events = Counter(
            "kms_plugin_kek_cache_requests_total",
            "Local-KEK cache lookups on Decrypt: hit, miss (one backend unwrap) or coalesced "
            "(waited for a concurrent identical unwrap)",
            ["result"], registry=r,
        )
        self.cache_entries = Gauge(
            "kms_plugin_kek_cache_entries", "Unwrapped local KEKs held in memory", registry=r,
        )
        self.kek_age = Gauge(
            "kms_plugin_local_kek_age_seconds", "Age of the current local KEK", registry=r,
        )
        self.kek_uses = Gauge(
            "kms_plugin_local_kek_uses", "Encryptions made with the current local KEK", registry=r,
        )
        self.kek_creations = Counter(
            "kms_plugin_local_kek_created_total",
            "Local KEKs created, by reason (startup, age, uses, root-key-changed)",
            ["reason"], registry=r,
        )
        self.key_info = Gauge(
            "kms_plugin_current_key_info",
            "1 for the key_id (as sha256 hash) currently reported by Status",
            ["backend", "key_id_hash"], registry=r,
        )
        self.health_state = Gauge(
            "kms_plugin_health_state",
            "1 for the current health state (ok, degraded, unhealthy)", ["state"], registry=r,
        )
        self.backend_reachable = Gauge(
            "kms_plugin_backend_reachable",
            "1 when the last health probe reached the backend, else 0", registry=r,
        )
        self.root_key_unusable = Gauge(
            "kms_plugin_root_key_unusable",
            "1 while the backend reports the root key disabled or deleted (the cluster breaks "
            "at the next restart of kube-apiserver or of this plugin)",
            ["reason"], registry=r,
        )
        self.rejected_keys = Gauge(
            "kms_plugin_backend_rejected_keys",
            "Key objects carrying the root key's name that the backend refuses to use (pkcs11: "
            "imported or once extractable), at its last look; anything above 0 is an alert",
            registry=r,
        )
        self.health_probes = Counter(
            "kms_plugin_health_probes_total", "Health probes (backend round trips) by outcome",
            ["outcome"], registry=r,
        )
        self._cache_children: dict[str, Any] = {}
        self._current: LocalKek | None = None
        self._key_label: tuple[str, str] | None = None
        self._lock = threading.Lock()
        self.kek_age.set_function(self._age)
        self.kek_uses.set_function(self._uses)
        for state in ("ok", "degraded", "unhealthy"):
            self.health_state.labels(state).set(0)
        for reason in ("disabled", "not_found"):
            self.root_key_unusable.labels(reason).set(0)

    def _age(self) -> float:
        cur = self._current
        return cur.age() if cur is not None else 0.0

    def _uses(self) -> float:
        cur = self._current
        return float(cur.uses) if cur is not None else 0.0

    # KeyEvents
    def cache_event(self, kind: str) -> None:
        child = self._cache_children.get(kind)
        if child is None:
            child = self._cache_children[kind] = self.cache_events.labels(kind)
        child.inc()

    def kek_created(self, reason: str, kek: LocalKek) -> None:
        self.kek_creations.labels(reason).inc()
        with self._lock:
            self._current = kek
            label = (kek.record.backend, key_id_hash(kek.key_id))
            if label != self._key_label:
                if self._key_label is not None:
                    self.key_info.remove(*self._key_label)
                self.key_info.labels(*label).set(1)
                self._key_label = label

    def set_health(self, state: str, backend_reachable: bool, unusable: str | None) -> None:
        for s in ("ok", "degraded", "unhealthy"):
            self.health_state.labels(s).set(1 if s == state else 0)
        self.backend_reachable.set(1 if backend_reachable else 0)
        for reason in ("disabled", "not_found"):
            self.root_key_unusable.labels(reason).set(1 if unusable == reason else 0)


class InstrumentedBackend(KeyBackend):
    """Wraps a backend: counts and times every call (metrics and an in-process tally)."""

    name = "instrumented"

    def __init__(self, inner: KeyBackend, backend_name: str, metrics: PluginMetrics | None):
        self.inner = inner
        self.backend_name = backend_name
        self.metrics = metrics
        self.tally: _Tally[str] = _Tally()  # operation -> calls, for tests and benchmarks
        self._lock = threading.Lock()

    @classmethod
    def from_options(cls, options: Mapping[str, object]) -> KeyBackend:
        raise NotImplementedError("InstrumentedBackend wraps a backend; it has no options")

    def _call(self, operation: str, fn: Callable[[], T]) -> T:
        started = time.perf_counter()
        error: BaseException | None = None
        try:
            return fn()
        except BaseException as exc:
            error = exc
            raise
        finally:
            with self._lock:
                self.tally[operation] += 1
            if self.metrics is not None:
                self.metrics.backend_calls.labels(
                    self.backend_name, operation, outcome_of(error)
                ).inc()
                self.metrics.backend_latency.labels(self.backend_name, operation).observe(
                    time.perf_counter() - started
                )

    def current_key(self, *, deadline: float | None = None) -> RootKeyVersion:
        return self._call("current_key", lambda: self.inner.current_key(deadline=deadline))

    def wrap(
        self, plaintext: bytes, context: Mapping[str, str], *, deadline: float | None = None
    ) -> WrapResult:
        return self._call("wrap", lambda: self.inner.wrap(plaintext, context, deadline=deadline))

    def unwrap(
        self,
        ciphertext: bytes,
        key: RootKeyVersion,
        context: Mapping[str, str],
        *,
        deadline: float | None = None,
    ) -> bytes:
        return self._call(
            "unwrap", lambda: self.inner.unwrap(ciphertext, key, context, deadline=deadline)
        )

    def close(self) -> None:
        self.inner.close()

    def total_calls(self) -> int:
        with self._lock:
            return sum(self.tally.values())


__all__ = ["InstrumentedBackend", "PluginMetrics", "outcome_of"]
