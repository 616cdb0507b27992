"""What every KMS RPC does around its body: request uid in the logs, an audit line, metrics,
deadline and the mapping of errors to status codes (kms_plugin.errors).

Given the call's context, the error ends the call here (``context.abort``), so the KMS server
runs without the generic error interceptor of edge_common.server: that one builds a handler
per call, which costs as much as a whole Encrypt (kube-apiserver makes many)."""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

import grpc

from edge_common.errors import ServiceError
from edge_common.log import LogContextToken, pop_log_context, push_log_context
from kms_plugin.audit import AuditLog
from kms_plugin.backends.errors import BackendError
from kms_plugin.envelope import EnvelopeError, key_id_hash
from kms_plugin.errors import to_service_error
from kms_plugin.metrics import PluginMetrics

# kube-apiserver gives Decrypt 3 s; keep a tenth of it (50..300 ms) for the answer to travel
# back, so that a slow backend ends in UNAVAILABLE from us, not DEADLINE_EXCEEDED at the caller
MARGIN_FRACTION = 0.1
MARGIN_MIN = 0.05
MARGIN_MAX = 0.3

log = logging.getLogger("kms_plugin.rpc")


def deadline_of(context: grpc.ServicerContext) -> float | None:
    """The caller's deadline as a time.monotonic() value (None when the call has none)."""
    remaining = context.time_remaining()
    if remaining is None or remaining > 10 * 365 * 86400:
        return None
    margin = min(MARGIN_MAX, max(MARGIN_MIN, remaining * MARGIN_FRACTION))
    return time.monotonic() + max(0.0, remaining - margin)


@functools.lru_cache(maxsize=256)
def hashed_key_id(key_id: str) -> str:
    return key_id_hash(key_id) if key_id else ""


class RpcScope:
    """Per-call state the handler fills in for the audit line."""

    __slots__ = ("key_id",)

    def __init__(self) -> None:
        self.key_id = ""


class Rpc:
    """Wraps RPC bodies of one API; holds the metric children so the hot path stays short."""

    def __init__(self, api: str, metrics: PluginMetrics | None, audit: AuditLog | None) -> None:
        self.api = api
        self.metrics = metrics
        self.audit = audit
        self._counters: dict[tuple[str, str], Any] = {}
        self._histograms: dict[str, Any] = {}

    def _count(self, method: str, code: str, seconds: float) -> None:
        if self.metrics is None:
            return
        counter = self._counters.get((method, code))
        if counter is None:
            counter = self._counters[(method, code)] = self.metrics.requests.labels(
                self.api, method, code
            )
        histogram = self._histograms.get(method)
        if histogram is None:
            histogram = self._histograms[method] = self.metrics.latency.labels(self.api, method)
        counter.inc()
        histogram.observe(seconds)

    def call(
        self, method: str, uid: str = "", *, audited: bool = True,
        context: grpc.ServicerContext | None = None,
    ) -> _Call:
        """``with rpc.call("Decrypt", uid, context=context) as scope:`` around one RPC body;
        errors end the call with their gRPC code (``context.abort``), or leave as
        ServiceError without a context."""
        return _Call(self, method, uid, self.audit if audited else None, context)


class _Call:
    """The context manager of one call (a class, not a generator: this is the hot path)."""

    __slots__ = ("rpc", "method", "uid", "audit", "context", "scope", "started", "_log")
    _log: LogContextToken | None

    def __init__(
        self, rpc: Rpc, method: str, uid: str, audit: AuditLog | None,
        context: grpc.ServicerContext | None,
    ) -> None:
        self.rpc = rpc
        self.method = method
        self.uid = uid
        self.audit = audit
        self.context = context
        self.scope = RpcScope()
        self.started = 0.0
        self._log = None

    def __enter__(self) -> RpcScope:
        self.started = time.perf_counter()
        self._log = push_log_context(
            {"request_uid": self.uid, "api": self.rpc.api, "method": self.method}
        )
        return self.scope

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        rpc, method, audit = self.rpc, self.method, self.audit
        try:
            if exc is None:
                rpc._count(method, "OK", time.perf_counter() - self.started)
                if audit is not None:
                    audit.record(rpc.api, method, "OK", self.uid, hashed_key_id(self.scope.key_id))
                return
            if not isinstance(exc, ServiceError | EnvelopeError | BackendError):
                log.error("rpc crashed", exc_info=exc, extra={"rpc": method})
            err = to_service_error(exc)
            rpc._count(method, err.code.name, time.perf_counter() - self.started)
            if audit is not None:
                audit.record(rpc.api, method, err.code.name, self.uid,
                             hashed_key_id(self.scope.key_id), err.message)
            if self.context is not None:
                self.context.abort(err.code, err.message)  # raises: the call ends here
            if err is not exc:
                raise err from exc
        finally:
            if self._log is not None:
                pop_log_context(self._log)


__all__ = ["Rpc", "RpcScope", "deadline_of", "hashed_key_id"]
