"""Start-up sweep: repair what interrupted operations left behind, remove what was never given out.

Runs before the socket opens, so no request of this process can be in flight. Only LVs
carrying our ownership tag are looked at.

Repaired (``lvchange --refresh``: the kernel table reloaded from the committed metadata, the
device resumed), with a Warning Event and ``csi_lvm_startup_repairs_total``:
- an LV left suspended (lv_attr state s/S; a command killed between suspend and resume leaves
  the pod's I/O frozen), or mapped without a live table / with an inactive one (d/i);
- an active LV whose kernel size differs from its metadata (an lvextend killed between its
  metadata commit and its table reload).

Removed (never answered to anyone, so nothing is lost):
- ``pending`` volumes (a CreateVolume that was filling them; the caller retries);
- kind=temporary snapshots (a clone's read side);
- snapshots that are not what their tags claim per LVM (csi_lvm/facts.py: a thick lvcreate
  killed between its two commits leaves a plain LV with snapshot tags).

``unfinished`` volumes are left alone: they may have been handed out (a plain CreateVolume
answers before their first use finishes them).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter

from csi_lvm.facts import snapshot_is_real
from csi_lvm.volume import KIND_SNAPSHOT, KIND_TEMPORARY, owner_tag, read_tags
from edge_common.devmapper import DmError, dm_info, dm_name
from edge_common.log import log_context
from edge_common.lvm import LogicalVolume, Lvm, LvmError

log = logging.getLogger(__name__)

#: lv_attr state characters of a mapped device that is not simply live (lvs(8)).
NEEDS_REFRESH_STATES = frozenset("sSdi")
SYS_DEV_BLOCK = Path("/sys/dev/block")
EVENT_REPAIRED = "VolumeRepaired"
EVENT_REPAIR_FAILED = "VolumeRepairFailed"

#: (reason, message, warning) -> None: where the sweep's Events go.
EventSink = Callable[[str, str, bool], None]


def log_event(reason: str, message: str, warning: bool) -> None:
    log.log(logging.WARNING if warning else logging.INFO, message,
            extra={"event_reason": reason})


class SweepMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.repairs = Counter(
            "csi_lvm_startup_repairs", "What the start-up sweep did to LVs of this driver left "
            "behind by interrupted commands: action=refreshed (resumed / table reloaded), "
            "refresh_failed, removed", ["action"], registry=registry)
        for action in ("refreshed", "refresh_failed", "removed"):
            self.repairs.labels(action=action)


@dataclass
class SweepResult:
    removed: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


def kernel_size(lv: LogicalVolume) -> int | None:
    """Bytes of the LV's live mapped device, None when it is not mapped (or unreadable)."""
    try:
        info = dm_info(dm_name(lv.vg_name, lv.name))
    except DmError:
        return None
    if info is None or not info.live_table:
        return None
    path = SYS_DEV_BLOCK / f"{os.major(info.devno)}:{os.minor(info.devno)}" / "size"
    try:
        return int(path.read_text()) * 512
    except (OSError, ValueError):
        return None


def needs_refresh(lv: LogicalVolume) -> str | None:
    """Why the LV must be refreshed, or None."""
    if lv.attr.state in NEEDS_REFRESH_STATES:
        what = {"s": "suspended", "S": "suspended", "d": "mapped without a table",
                "i": "mapped with an inactive table"}[lv.attr.state]
        return f"left {what} by an interrupted LVM command"
    if lv.is_active and not lv.is_thin_pool:
        size = kernel_size(lv)
        if size is not None and size != lv.size:
            return (f"its kernel device has {size} bytes, its metadata {lv.size}: an "
                    "interrupted resize")
    return None


def sweep(lvm: Lvm, driver_name: str, *, events: EventSink = log_event,
          metrics: SweepMetrics | None = None) -> SweepResult:
    """Repair and remove leftovers. LVM failures are logged, never fatal."""
    result = SweepResult()
    try:
        lvs = lvm.lvs(tag=owner_tag(driver_name))
    except LvmError as exc:
        log.warning("start-up sweep skipped: cannot list LVs", extra={"error": exc.message})
        return result
    leftovers = []
    for lv in lvs:
        own = read_tags(lv.tags, driver_name)
        if not own.owned:
            continue
        if own.pending or own.kind == KIND_TEMPORARY or (
                own.kind == KIND_SNAPSHOT and not snapshot_is_real(lv, own)):
            leftovers.append((own.kind != KIND_TEMPORARY, lv))  # temporaries first
            continue
        why = needs_refresh(lv)
        if why is not None:
            _repair(lvm, lv, why, result, events, metrics)
    for _, lv in sorted(leftovers, key=lambda item: item[0]):
        with log_context(volume_id=lv.full_name):
            if lv.attr.state in NEEDS_REFRESH_STATES:
                _repair(lvm, lv, "left suspended", result, events, metrics)  # else lvremove hangs
            try:
                lvm.lvremove(lv.vg_name, lv.name)
            except LvmError as exc:
                if not exc.is_not_found():
                    log.warning("could not remove a leftover LV", extra={"error": exc.message})
                    continue
            log.info("removed a leftover of an interrupted operation")
            result.removed.append(lv.full_name)
            if metrics is not None:
                metrics.repairs.labels(action="removed").inc()
    return result


def _repair(lvm: Lvm, lv: LogicalVolume, why: str, result: SweepResult, events: EventSink,
            metrics: SweepMetrics | None) -> None:
    with log_context(volume_id=lv.full_name):
        try:
            lvm.refresh(lv.vg_name, lv.name)
        except LvmError as exc:
            result.failed.append(lv.full_name)
            if metrics is not None:
                metrics.repairs.labels(action="refresh_failed").inc()
            events(EVENT_REPAIR_FAILED, f"volume {lv.full_name} was {why}; `lvchange --refresh` "
                   f"failed ({exc.message}): its I/O may be frozen, run `dmsetup resume "
                   f"{dm_name(lv.vg_name, lv.name)}` on the node", True)
            return
        result.repaired.append(lv.full_name)
        if metrics is not None:
            metrics.repairs.labels(action="refreshed").inc()
        events(EVENT_REPAIRED, f"volume {lv.full_name} was {why}; repaired at start-up "
               "(table reloaded from the committed metadata, device resumed)", True)
