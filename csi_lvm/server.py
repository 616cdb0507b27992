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
from csi_lvm.identity import Identity
from csi_lvm.jobs import Jobs
from csi_lvm.locks import InFlight
from csi_lvm.node import NodeService
from csi_lvm.poolwatch import PoolWatch, make_sink
from csi_lvm.published import PublishedCapacity
from csi_lvm.recovery import SweepMetrics, sweep
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
    from edge_common.kubeapi import ApiError
    from node_resource_manager.kube import make_client

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
        self.sweep_metrics: SweepMetrics | None = None
        if config.mode is Mode.ALL:
            self.sweep_metrics = SweepMetrics(self.registry)
            self.lvm = Lvm(lvm_settings(config))
            self.cache = CapacityCache(
                self.lvm, config.capacity_refresh_seconds, config.thin_overprovision_ratio,
                PoolThresholds.of(config),
                recheck_seconds=config.vg_recheck_seconds)
            self.registry.register(LvmCollector(self.cache))
            self.pool_watch = PoolWatch(make_sink(config), config.thin_overprovision_ratio,
                                        PoolThresholds.of(config), config.node_id)
            self.cache.on_refresh(self.pool_watch)
        self.locks = InFlight()
        self.identity = Identity(config, self.lvm, self.cache)
        self.jobs = Jobs(config.max_data_jobs, config.data_job_wait_seconds,
                         self.registry if config.mode is Mode.ALL else None)
        self.controller = Controller(config, self.lvm, self.cache, self.locks,
                                     published_capacity(config), self.jobs)
        register: list[Callable[[grpc.Server], None]] = [
            lambda s: csi_pb2_grpc.add_IdentityServicer_to_server(self.identity, s),
            lambda s: csi_pb2_grpc.add_ControllerServicer_to_server(self.controller, s),
        ]
        self.node: NodeService | None = None
        if config.mode is Mode.ALL:
            assert self.lvm is not None and self.cache is not None
            node = NodeService(config, self.lvm, locks=self.locks,
                               on_lvm_change=self.cache.invalidate)
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
            swept = sweep(self.lvm, self.config.driver_name, metrics=self.sweep_metrics)
            if swept.removed or swept.repaired or swept.failed:
                log.info("start-up sweep", extra={"removed": swept.removed,
                                                  "repaired": swept.repaired,
                                                  "repair_failed": swept.failed})
            try:
                self.cache.refresh()
            except LvmError as exc:
                log.warning("lvm report failed at start-up", extra={"error": exc.message})
            self.cache.start()
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
        if self.cache is not None:
            self.cache.stop()
        if self.metrics is not None:
            self.metrics.stop()

    def run_until_signal(self) -> None:
        self.start()
        self.server.run_until_signal(on_stop=self._after_stop)

    def _after_stop(self) -> None:
        if self.cache is not None:
            self.cache.stop()
        if self.metrics is not None:
            self.metrics.stop()
