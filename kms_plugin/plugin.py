"""Assembly: backend -> key manager -> monitor -> gRPC services + HTTP endpoint."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TextIO

from edge_common.metrics import HealthChecks, MetricsServer
from edge_common.server import EndpointError, GrpcServer, parse_endpoint
from kms_plugin.audit import AuditLog
from kms_plugin.backends.base import KeyBackend
from kms_plugin.backends.registry import create_backend
from kms_plugin.config import LogFormat, PluginConfig
from kms_plugin.hardening import release_free_memory
from kms_plugin.keys import KeyManager
from kms_plugin.metrics import InstrumentedBackend, PluginMetrics
from kms_plugin.monitor import DEGRADED, OK, Monitor, Notifier
from kms_plugin.service_v1beta1 import KmsV1beta1Service
from kms_plugin.service_v1beta1 import register as register_v1beta1
from kms_plugin.service_v2 import KmsV2Service
from kms_plugin.service_v2 import register as register_v2

log = logging.getLogger("kms_plugin")

STARTUP_WAIT = 2.0  # seconds serve waits for the first key before opening the socket anyway
# server threads beyond max_workers that requests waiting for the backend can never take:
# Status (and requests answered from memory) always find one, even in a Decrypt storm
STATUS_RESERVE = 2
# server threads idle this long exit (down to 2), and the memory a burst left is given back
# (docs/kms-plugin.md, "Memory"): an idle plugin stays as small as a fresh one
IDLE_THREAD_SECONDS = 3.0


def check_serving_endpoint(endpoint: str) -> None:
    """Refuse to serve on an abstract unix socket: it has no file permissions, so any local
    user and any hostNetwork pod could connect and use Decrypt as an oracle."""
    if parse_endpoint(endpoint).abstract_name is not None:
        raise EndpointError(
            f"endpoint {endpoint!r} is an abstract unix socket: it has no file permissions, so "
            "any local user or hostNetwork pod could decrypt Secrets through it; serve on a "
            "socket file (unix:///var/run/kms-plugin/kms.sock, mode 0600 or --socket-group)"
        )


def build_backend(
    config: PluginConfig, metrics: PluginMetrics | None, options: Mapping[str, object] | None = None
) -> InstrumentedBackend:
    inner: KeyBackend = create_backend(
        config.backend, config.backend_option_map() if options is None else options
    )
    return InstrumentedBackend(inner, config.backend, metrics)


def build_key_manager(
    config: PluginConfig,
    backend: InstrumentedBackend,
    metrics: PluginMetrics | None = None,
) -> KeyManager:
    return KeyManager(
        backend,
        config.backend,
        policy=config.kek_policy(),
        cache_size=config.kek_cache_size,
        events=metrics,
        backend_slots=config.max_workers,
    )


@dataclass
class Plugin:
    """A running plugin.  ``start()`` returns once the socket listens."""

    config: PluginConfig
    metrics: PluginMetrics
    backend: InstrumentedBackend
    keys: KeyManager
    monitor: Monitor
    server: GrpcServer
    http: MetricsServer | None = None
    audit: AuditLog | None = None

    @classmethod
    def create(
        cls,
        config: PluginConfig,
        *,
        backend: KeyBackend | None = None,
        notifier: Notifier | None = None,
        audit_stream: TextIO | None = None,
    ) -> Plugin:
        check_serving_endpoint(config.endpoint)
        metrics = PluginMetrics()
        if backend is None:
            instrumented = build_backend(config, metrics)
        else:
            instrumented = InstrumentedBackend(backend, config.backend, metrics)
        keys = build_key_manager(config, instrumented, metrics)
        monitor = Monitor(keys, config.monitor_settings(), metrics=metrics, notifier=notifier)
        keys._on_rotation_due = monitor.wake  # the use-count trigger wakes the monitor
        metrics.cache_entries.set_function(lambda: float(keys.cache_len))
        inner = instrumented.inner
        metrics.rejected_keys.set_function(lambda: float(getattr(inner, "rejected_keys", 0)))
        audit = (
            AuditLog(json_format=config.log_format is LogFormat.JSON, stream=audit_stream)
            if config.audit_log
            else None
        )
        v2 = KmsV2Service(keys, monitor, metrics, audit=audit)
        v1 = KmsV1beta1Service(keys, metrics, audit=audit)
        server = GrpcServer(
            config.endpoint,
            [register_v2(v2), register_v1beta1(v1)],
            socket_mode=0o660 if config.socket_group else 0o600,
            socket_group=config.socket_group,
            max_workers=config.max_workers + STATUS_RESERVE,
            map_errors=False,  # kms_plugin.rpc ends failed calls itself, at less cost
            idle_thread_seconds=IDLE_THREAD_SECONDS,
            on_threads_shrink=release_free_memory,
        )
        http = None
        plugin_ref: list[Plugin] = []
        if config.metrics_port >= 0:
            checks = HealthChecks()
            checks.live["monitor"] = lambda: plugin_ref[0].live_check()
            checks.ready["kms"] = lambda: plugin_ref[0].ready_check()
            http = MetricsServer(
                config.metrics_address, config.metrics_port, registry=metrics.registry,
                checks=checks,
            )
        plugin = cls(config, metrics, instrumented, keys, monitor, server, http, audit)
        plugin_ref.append(plugin)
        return plugin

    # --- HTTP checks -----------------------------------------------------------------------

    def live_check(self) -> tuple[bool, str]:
        """/healthz: the process and its background thread are alive."""
        if not self.monitor.alive:
            return False, "background monitor thread is not running"
        return True, "process alive"

    def ready_check(self) -> tuple[bool, str]:
        """/readyz: a local encrypt + decrypt works now (no backend call) and health allows."""
        snap = self.monitor.snapshot
        if self.keys.current is None:
            return False, f"no root key yet: {snap.reason}"
        blocked = self.keys.encrypt_blocked
        if blocked is not None:
            return False, snap.reason or str(blocked)
        try:
            seed = b"\x00" * 32
            ct, key_id, ann = self.keys.encrypt_seed(seed)
            if self.keys.decrypt_seed(ct, key_id, ann) != seed:
                return False, "local round trip returned different bytes"
        except Exception as exc:
            return False, f"local round trip failed: {type(exc).__name__}"
        if snap.state == OK:
            return True, "can encrypt and decrypt"
        if snap.state == DEGRADED:
            return True, f"can encrypt and decrypt from cached keys; degraded: {snap.reason}"
        return False, snap.reason

    # --- lifecycle -------------------------------------------------------------------------

    def start(self, *, startup_wait: float = STARTUP_WAIT) -> None:
        started = time.monotonic()
        self.monitor.start()
        deadline = started + startup_wait
        while self.monitor.probes == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        self.server.start()
        if self.http is not None:
            self.http.start()
        log.info(
            "kms plugin started",
            extra={
                "backend": self.config.backend,
                "endpoint": str(self.server.endpoint),
                "metrics_port": self.http.port if self.http else None,
                "healthz": self.monitor.status_healthz(),
                "startup_seconds": round(time.monotonic() - started, 3),
            },
        )

    def stop(self, grace: float | None = None) -> None:
        self.server.stop(self.config.shutdown_grace if grace is None else grace)
        self.close()

    def close(self) -> None:
        self.monitor.stop()
        if self.http is not None:
            self.http.stop()
        if self.audit is not None:
            self.audit.close()
        self.keys.close()

    def run_until_signal(self) -> None:
        self.start()
        self.server.run_until_signal(self.config.shutdown_grace, on_stop=self.close)


__all__ = ["Plugin", "build_backend", "build_key_manager", "check_serving_endpoint"]
