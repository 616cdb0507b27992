"""Wiring: the Identity, Controller and Node services on one unix socket (edge_common.server),
the capacity cache, the start-up sweep and the metrics endpoint."""

from __future__ import annotations

import logging
from collections.abc import Callable

import grpc
from prometheus_client import CollectorRegistry

from csi_lvm.capacity import CapacityCache, LvmCollector, PoolThresholds
from csi_lvm.config import CsiConfig, Mode
from csi_lvm.controller import Controller
from csi_lvm.cryptsetup import Cryptsetup
from csi_lvm.encryption import KeyMetrics, VolumeEncryption
from csi_lvm.identity import Identity
from csi_lvm.jobs import Jobs, max_job_waiters
from csi_lvm.locks import InFlight
from csi_lvm.lvmwatch import ChangeWatch
from csi_lvm.node import NodeService
from csi_lvm.poolwatch import PoolWatch, make_sink
from csi_lvm.published import PublishedCapacity
from csi_lvm.recovery import SweepMetrics, sweep
from csi_lvm.rewrap import RewrapLoop
from csi_lvm.volume_keys import BackendsFileError, KeyBackends, load_backends_file
from edge_common.lvm import Lvm, LvmError, LvmSettings
from edge_common.metrics import HealthChecks, MetricsServer, parse_host_port
from edge_common.server import GrpcServer, RpcMetrics
from edge_proto.csi.v1 import csi_pb2_grpc

log = logging.getLogger(__name__)


def lvm_settings(config: CsiConfig) -> LvmSettings:
    return LvmSettings.from_options(
        config.lvm_command, config.lvm_extra_args, config.lvm_timeout_seconds,
        config.lvm_config, auto_driverloaded=config.lvm_auto_driverloaded)


def published_capacity(config: CsiConfig) -> PublishedCapacity | None:
    """Mode controller: the nodes' CSIStorageCapacity objects, when the API is reachable."""
    if config.mode is not Mode.CONTROLLER:
        return None
    from edge_common.kubeapi import ApiError, make_client

    try:
        api = make_client(config.kubeconfig)
    except (ApiError, OSError, ValueError, KeyError) as exc:
        log.warning("no Kubernetes API: ControllerExpandVolume cannot check what the nodes "
                    "publish and leaves the decision to the node", extra={"error": str(exc)})
        return None
    return PublishedCapacity(api, config.driver_name, config.topology_key,
                             config.storage_capacity_namespace)


class Driver:
    """One csi-lvm process: build with a config, start(), stop()."""

    def __init__(self, config: CsiConfig, *, registry: CollectorRegistry | None = None) -> None:
        self.config = config
        self.registry = registry or CollectorRegistry()
        self.lvm: Lvm | None = None
        self.cache: CapacityCache | None = None
        self.change_watch: ChangeWatch | None = None
        self.sweep_metrics: SweepMetrics | None = None
        if config.mode is Mode.ALL:
            self.sweep_metrics = SweepMetrics(self.registry)
            self.lvm = Lvm(lvm_settings(config))
            self.cache = CapacityCache(
                self.lvm, config.capacity_refresh_seconds, config.thin_overprovision_ratio,
                PoolThresholds.of(config),
                recheck_seconds=config.vg_recheck_seconds)
            self.registry.register(LvmCollector(self.cache))
            self.events = make_sink(config)  # pool warnings and start-up repairs
            self.pool_watch = PoolWatch(self.events, config.thin_overprovision_ratio,
                                        PoolThresholds.of(config), config.node_id)
            self.cache.on_refresh(self.pool_watch)
            self.change_watch = ChangeWatch(self.cache, config.lvm_change_paths,
                                            config.lvm_change_check_seconds,
                                            config.block_events)
        self.locks = InFlight()
        self.encryption = build_encryption(config, self.registry)
        self.rewrap: RewrapLoop | None = None
        if self.lvm is not None:
            self.rewrap = RewrapLoop(self.encryption, self.lvm, config.driver_name,
                                     config.encryption_rewrap_seconds, self.locks)
        self.identity = Identity(config, self.lvm, self.cache)
        self.jobs = Jobs(config.max_data_jobs, config.data_job_wait_seconds,
                         self.registry if config.mode is Mode.ALL else None,
                         max_waiting=max_job_waiters(config))
        self.controller = Controller(config, self.lvm, self.cache, self.locks,
                                     published_capacity(config), self.jobs,
                                     encryption=self.encryption)
        register: list[Callable[[grpc.Server], None]] = [
            lambda s: csi_pb2_grpc.add_IdentityServicer_to_server(self.identity, s),
            lambda s: csi_pb2_grpc.add_ControllerServicer_to_server(self.controller, s),
        ]
        self.node: NodeService | None = None
        if config.mode is Mode.ALL:
            assert self.lvm is not None and self.cache is not None
            node = NodeService(config, self.lvm, locks=self.locks,
                               on_lvm_change=self.cache.invalidate, encryption=self.encryption)
            self.node = node
            register.append(node.register)
        self.server = GrpcServer(
            config.endpoint, register,
            socket_mode=0o660 if config.socket_group else 0o600,
            socket_group=config.socket_group or None,
            max_workers=config.grpc_workers,
            metrics=RpcMetrics("csi_lvm", self.registry),
        )
        self.metrics: MetricsServer | None = None

    def start(self) -> None:
        if self.lvm is not None and self.cache is not None:
            sink = self.events
            swept = sweep(self.lvm, self.config.driver_name, metrics=self.sweep_metrics,
                          events=lambda reason, message, warning: sink.event(
                              reason, message, warning=warning))
            if swept.removed or swept.repaired or swept.failed:
                log.info("start-up sweep", extra={"removed": swept.removed,
                                                  "repaired": swept.repaired,
                                                  "repair_failed": swept.failed})
            try:
                self.cache.refresh()
            except LvmError as exc:
                log.warning("lvm report failed at start-up", extra={"error": exc.message})
            self.cache.start()
        if self.change_watch is not None:
            self.change_watch.start()
        if self.rewrap is not None:
            self.rewrap.start()
        if self.config.metrics_address:
            host, port = parse_host_port(self.config.metrics_address)
            checks = HealthChecks(ready={"lvm": self.identity.readiness})
            self.metrics = MetricsServer(host, port, registry=self.registry,
                                         checks=checks).start()
        self.server.start()
        log.info("csi-lvm started", extra={"mode": self.config.mode.value,
                                           "driver": self.config.driver_name,
                                           "node_id": self.config.node_id})

    def stop(self, grace: float = 10.0) -> None:
        self.server.stop(grace)
        self._stop_encryption()
        self._stop_cache()
        if self.metrics is not None:
            self.metrics.stop()

    def run_until_signal(self) -> None:
        self.start()
        self.server.run_until_signal(on_stop=self._after_stop)

    def _stop_cache(self) -> None:
        if self.change_watch is not None:
            self.change_watch.stop()
        if self.cache is not None:
            self.cache.stop()

    def _stop_encryption(self) -> None:
        if self.rewrap is not None:
            self.rewrap.stop()
        self.encryption.backends.close()

    def _after_stop(self) -> None:
        self._stop_encryption()
        self._stop_cache()
        if self.metrics is not None:
            self.metrics.stop()


def build_encryption(config: CsiConfig,
                     registry: CollectorRegistry | None = None) -> VolumeEncryption:
    """The node's key backends (from encryption_backends_file) and cryptsetup."""
    spec = None
    if config.encryption_backends_file:
        try:
            spec = load_backends_file(config.encryption_backends_file)
        except BackendsFileError as exc:
            raise ValueError(str(exc)) from None
    return VolumeEncryption(KeyBackends(spec),
                            Cryptsetup(timeout=config.cryptsetup_timeout_seconds),
                            metrics=KeyMetrics(registry) if registry is not None else None)
