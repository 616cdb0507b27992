"""Thin pools crossing their thresholds become Events (and log lines), once per crossing.

Fed by every capacity-cache refresh (no lvm call of its own). A pool past its data or
metadata threshold gets a Warning `ThinPoolOverThreshold` on this Node; when it is back below,
a Normal `ThinPoolBelowThreshold`. The gauge csi_lvm_thin_pool_over_threshold says the same
at every scrape (capacity.LvmCollector).

Events go to the Kubernetes API when the driver runs in a cluster (or has a kubeconfig), else
to the log only, through the Event sinks all three services share (edge_common.events).
"""

from __future__ import annotations

import logging
import os
from typing import Protocol

from csi_lvm.capacity import PoolThresholds, pool_space
from csi_lvm.config import CsiConfig
from edge_common.events import LogEvents, NodeEvents
from edge_common.kubeapi import ApiError, make_client
from edge_common.lvm import LvmReport

log = logging.getLogger(__name__)

COMPONENT = "csi-lvm"
OVER_THRESHOLD = "ThinPoolOverThreshold"
BELOW_THRESHOLD = "ThinPoolBelowThreshold"


class EventSink(Protocol):
    def event(self, reason: str, message: str, *, warning: bool) -> None: ...


class PoolWatch:
    """Call with each new report; emits an Event when a pool crosses a threshold."""

    def __init__(self, sink: EventSink, default_ratio: float, thresholds: PoolThresholds,
                 node: str) -> None:
        self.sink = sink
        self.default_ratio = default_ratio
        self.thresholds = thresholds
        self.node = node
        self.full: dict[tuple[str, str], str] = {}

    def __call__(self, report: LvmReport) -> None:
        seen = set()
        for lv in report.lvs:
            if not lv.is_thin_pool:
                continue
            key = (lv.vg_name, lv.name)
            seen.add(key)
            space = pool_space(report, lv.vg_name, lv.name, self.default_ratio, self.thresholds)
            if space is None:
                continue
            name = f"{lv.vg_name}/{lv.name}"
            if space.full and key not in self.full:
                why = "; ".join(space.problems)
                self.full[key] = why
                self.sink.event(OVER_THRESHOLD, (
                    f"thin pool {name} on node {self.node} is past its threshold ({why}): its "
                    "thin volumes are reported abnormal and no new or larger thin volume is "
                    "placed in it; grow the pool (or its VG) or free space"), warning=True)
            elif not space.full and key in self.full:
                del self.full[key]
                self.sink.event(BELOW_THRESHOLD, (
                    f"thin pool {name} on node {self.node} is below its thresholds again "
                    f"(data {space.pool.data_percent or 0:g}%, metadata "
                    f"{space.pool.metadata_percent or 0:g}%)"), warning=False)
        for gone in set(self.full) - seen:
            del self.full[gone]


def make_sink(config: CsiConfig) -> EventSink:
    """Kubernetes Events on this Node when in a cluster (or given a kubeconfig); else log."""
    if config.kube_events and (config.kubeconfig or os.environ.get("KUBERNETES_SERVICE_HOST")):
        try:
            api = make_client(config.kubeconfig)
        except (ApiError, OSError, ValueError, KeyError) as exc:
            log.warning("no Kubernetes API for Events; they go to the log only",
                        extra={"error": str(exc)})
        else:
            return NodeEvents(api, node_name=config.node_id, component=COMPONENT)
    return LogEvents()
