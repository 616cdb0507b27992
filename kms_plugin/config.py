"""Every option of the KMS plugin in one typed dataclass.

Each option is a YAML key in the file given by ``--config``, an environment variable
``KMS_PLUGIN_<NAME>`` and a flag ``--<name>``; precedence default < file < environment < flag.
Backend options are flat fields prefixed with the backend name (``local_keyring``,
``pkcs11_token_label``, ``awskms_region`` ...); a third-party backend takes its options from
``backend_options`` (``key=value,...``), which also overrides the prefixed fields.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import Any

from edge_common.config import option
from kms_plugin.keys import MAX_POLICY_USES, KekPolicy
from kms_plugin.monitor import MonitorSettings

ENV_PREFIX = "KMS_PLUGIN_"
BACKEND_PREFIXES = ("local", "pkcs11", "awskms")


class LogFormat(enum.Enum):
    JSON = "json"
    TEXT = "text"


@dataclass(frozen=True)
class PluginConfig:
    # --- serving ---------------------------------------------------------------------------
    endpoint: str = option(
        "unix:///var/run/kms-plugin/kms.sock",
        help="gRPC endpoint for kube-apiserver: unix:///path (serve refuses abstract "
        "unix:///@name sockets: they have no permissions)",
        metavar="URL",
    )
    socket_group: str | None = option(
        None, help="group that may use the socket (mode becomes 0660; default 0600)",
        metavar="GROUP",
    )
    max_workers: int = option(
        64, help="requests that may wait for the backend at once (more get UNAVAILABLE at "
        "once); the server has 2 threads more, so Status always answers (threads start on "
        "demand and exit after 3 s idle: an idle plugin has 2)"
    )
    shutdown_grace: float = option(
        10.0, help="seconds in-flight calls get to finish after SIGTERM", metavar="SECONDS"
    )
    metrics_address: str = option(
        "127.0.0.1", help="address of the HTTP /metrics /healthz /readyz endpoint"
    )
    metrics_port: int = option(
        8095, help="port of the HTTP endpoint; 0 picks a free port, -1 disables it"
    )
    log_level: str = option("INFO", help="DEBUG, INFO, WARNING or ERROR")
    log_format: LogFormat = option(LogFormat.JSON, help="log line format")
    audit_log: bool = option(
        True, help="log one line per Encrypt/Decrypt (request uid, key_id hash, code; never keys)"
    )
    kube_events: bool = option(
        False,
        help="record a Kubernetes Event when the root key becomes unusable (needs POD_NAME, "
        "POD_NAMESPACE and in-cluster credentials or KUBECONFIG)",
    )

    # --- keys ------------------------------------------------------------------------------
    backend: str = option(
        "local", help="root-key backend: local, pkcs11, awskms or a third-party entry point"
    )
    backend_options: dict[str, str] = option(
        {}, help="extra backend options as key=value pairs (third-party backends)",
        metavar="K=V,...",
    )
    kek_max_age: float = option(
        86400.0, help="rotate the local KEK after this many seconds", metavar="SECONDS"
    )
    kek_max_uses: int = option(
        1_000_000, help=f"rotate the local KEK after this many encryptions (<= {MAX_POLICY_USES})"
    )
    kek_cache_size: int = option(4096, help="unwrapped local KEKs kept in memory (LRU)")
    verify_wrap: bool = option(
        True, help="unwrap each freshly wrapped local KEK once before using it"
    )

    # --- background work -------------------------------------------------------------------
    health_interval: float = option(
        30.0, help="seconds between health probes (a real backend round trip)", metavar="SECONDS"
    )
    refresh_interval: float = option(
        60.0, help="seconds between root key version checks (rotation detection)",
        metavar="SECONDS",
    )
    retry_interval: float = option(
        5.0, help="seconds between retries while unhealthy", metavar="SECONDS"
    )
    backend_timeout: float = option(
        5.0, help="timeout of background backend operations", metavar="SECONDS"
    )
    report_degraded: bool = option(
        False,
        help="answer Status healthz with the reason (not ok) while the backend is unreachable "
        "or throttling although cached keys still serve every request",
    )

    # --- local backend ---------------------------------------------------------------------
    local_keyring: str = option(
        "/etc/kms-plugin/keyring.json", help="local backend: keyring file (mode 0600)",
        metavar="FILE",
    )
    local_allow_rollback: bool = option(
        False,
        help="local backend: accept a re-read keyring whose next_generation went down or that "
        "lost keys seen before (a restore from backup is intended); default: refuse, unhealthy",
    )

    # --- pkcs11 backend --------------------------------------------------------------------
    pkcs11_module: str = option(
        "/usr/lib/softhsm/libsofthsm2.so", help="pkcs11 backend: PKCS#11 module path",
        metavar="FILE",
    )
    pkcs11_token_label: str = option("", help="pkcs11 backend: token label")
    pkcs11_key_label: str = option(
        "kms-plugin-root", help="pkcs11 backend: label of the AES-256 root key objects"
    )
    pkcs11_pin_file: str = option(
        "", help="pkcs11 backend: file holding the user PIN", metavar="FILE"
    )

    # --- awskms backend --------------------------------------------------------------------
    awskms_key_id: str = option("", help="awskms backend: key ARN, alias or id")
    awskms_region: str | None = option(None, help="awskms backend: region (else AWS_REGION)")
    awskms_endpoint_url: str | None = option(
        None, help="awskms backend: endpoint URL (else AWS_ENDPOINT_URL_KMS or AWS's)",
        metavar="URL",
    )
    awskms_access_key_id: str | None = option(
        None, help="awskms backend: access key id (else environment or credentials file)",
        secret=True,
    )
    awskms_secret_access_key: str | None = option(
        None, help="awskms backend: secret access key (prefer the credentials file)", secret=True
    )
    awskms_session_token: str | None = option(
        None, help="awskms backend: session token", secret=True
    )
    awskms_credentials_file: str | None = option(
        None, help="awskms backend: shared credentials file", metavar="FILE"
    )
    awskms_profile: str | None = option(None, help="awskms backend: credentials profile")
    awskms_connect_timeout: float | None = option(
        None, help="awskms backend: TCP connect timeout", metavar="SECONDS"
    )
    awskms_request_timeout: float | None = option(
        None, help="awskms backend: per-request timeout", metavar="SECONDS"
    )
    awskms_max_attempts: int | None = option(
        None, help="awskms backend: attempts per operation (retries with backoff)"
    )
    awskms_ca_bundle: str | None = option(
        None, help="awskms backend: CA bundle for the endpoint's TLS certificate", metavar="FILE"
    )
    awskms_retry_base_seconds: float | None = option(
        None, help="awskms backend: first retry backoff", metavar="SECONDS"
    )
    awskms_retry_max_seconds: float | None = option(
        None, help="awskms backend: longest retry backoff", metavar="SECONDS"
    )
    awskms_breaker_failure_threshold: int | None = option(
        None, help="awskms backend: consecutive failures that open the circuit breaker"
    )
    awskms_allow_http: bool = option(
        False, help="awskms backend: allow a plain http:// endpoint on a non-loopback host "
        "(default: https only; http only to loopback)"
    )
    awskms_previous_key_arns: list[str] = option(
        [], help="awskms backend: earlier key ARNs Decrypt may still use (e.g. after an alias "
        "moved); any other key named by a stored record is refused", metavar="ARN,..."
    )
    awskms_breaker_reset_seconds: float | None = option(
        None, help="awskms backend: seconds before an open breaker lets a call through",
        metavar="SECONDS",
    )

    def __post_init__(self) -> None:
        for name in ("health_interval", "refresh_interval", "retry_interval", "backend_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        if self.kek_cache_size < 1:
            raise ValueError("kek_cache_size must be >= 1")
        if self.max_workers < 1:
            raise ValueError("max_workers must be >= 1")
        self.kek_policy()  # validates kek_max_age / kek_max_uses

    def kek_policy(self) -> KekPolicy:
        return KekPolicy(
            max_age_seconds=self.kek_max_age,
            max_uses=self.kek_max_uses,
            verify_wrap=self.verify_wrap,
        )

    def monitor_settings(self) -> MonitorSettings:
        return MonitorSettings(
            health_interval=self.health_interval,
            refresh_interval=self.refresh_interval,
            retry_interval=self.retry_interval,
            backend_timeout=self.backend_timeout,
            report_degraded=self.report_degraded,
        )

    def backend_option_map(self) -> dict[str, object]:
        """The options handed to the backend's from_options (prefixed fields + extras)."""
        prefix = f"{self.backend}_"
        out: dict[str, Any] = {}
        if self.backend in BACKEND_PREFIXES:
            for f in dataclasses.fields(self):
                if f.name.startswith(prefix):
                    value = getattr(self, f.name)
                    # unset and off (False: every backend flag defaults to off) are left out
                    if value is not None and value != "" and value is not False:
                        out[f.name[len(prefix) :]] = value
        out.update(self.backend_options)
        return out


__all__ = ["ENV_PREFIX", "LogFormat", "PluginConfig"]
