"""Prometheus metrics of the agent (served by edge_common.metrics on /metrics)."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from edge_common.lvm import VolumeGroup


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.vg_size = Gauge("nrm_volume_group_size_bytes",
                             "Size of each managed volume group", ["vg"], registry=r)
        self.vg_free = Gauge("nrm_volume_group_free_bytes",
                             "Free bytes of each managed volume group", ["vg"], registry=r)
        self.vg_pvs = Gauge("nrm_volume_group_physical_volumes",
                            "Physical volumes in each managed volume group", ["vg"], registry=r)
        self.devices_rejected = Gauge(
            "nrm_devices_rejected", "Listed devices refused by the last reconcile, by reason",
            ["reason"], registry=r)
        self.reconciles = Counter("nrm_reconciles_total",
                                  "Reconciles, by result", ["result"], registry=r)
        self.reconcile_errors = Counter(
            "nrm_reconcile_errors_total",
            "Reconciles that ended in an LVM or config error", registry=r)
        self.reconcile_duration = Histogram(
            "nrm_reconcile_duration_seconds", "Duration of one reconcile", registry=r,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.actions = Counter("nrm_lvm_actions_total", "LVM changes made, by action and result",
                               ["action", "result"], registry=r)
        self._vgs: set[str] = set()
        self._reasons: set[str] = set()

    def set_volume_groups(self, vgs: Iterable[VolumeGroup], pv_counts: dict[str, int]) -> None:
        seen = set()
        for vg in vgs:
            seen.add(vg.name)
            self.vg_size.labels(vg.name).set(vg.size)
            self.vg_free.labels(vg.name).set(vg.free)
            self.vg_pvs.labels(vg.name).set(pv_counts.get(vg.name, vg.pv_count))
        for gone in self._vgs - seen:
            for gauge in (self.vg_size, self.vg_free, self.vg_pvs):
                gauge.remove(gone)
        self._vgs = seen

    def set_rejected(self, counts: dict[str, int]) -> None:
        for reason in self._reasons | set(counts):
            self.devices_rejected.labels(reason).set(counts.get(reason, 0))
        self._reasons |= set(counts)
