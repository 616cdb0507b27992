"""Start-up sweep: repair what interrupted operations left behind, remove what was never given out.

Runs before the socket opens, so no request of this process can be in flight. Only LVs
carrying our ownership tag are looked at.

Repaired (``lvchange --refresh``: the kernel table reloaded from the committed metadata, the
device resumed; if LVM leaves it suspended, a direct resume then a refresh again), with a
Warning Event and ``csi_lvm_startup_repairs_total``. The kernel decides (DM_DEV_STATUS, one
ioctl; lv_attr only when the kernel cannot be asked):
- an LV left suspended (a command killed between suspend and resume leaves the pod's I/O
  frozen), with a loaded inactive table, or mapped without a live table;
- an active LV whose kernel size differs from its metadata (an lvextend killed between its
  metadata commit and its table reload).

Removed (never answered to anyone, so nothing is lost):
- ``pending`` volumes (a CreateVolume that was filling them; the caller retries);
- kind=temporary snapshots (a clone's read side);
- snapshots that are not what their tags claim per LVM (csi_lvm/facts.py: a thick lvcreate
  killed between its two commits leaves a plain LV with snapshot tags).

``unfinished`` volumes are left alone: they may have been handed out (a plain CreateVolume
answers before its background finisher drops the tag, or without device-mapper before any
wipe); their first use finishes them (csi_lvm/finish.py).
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
from edge_common.devmapper import DmError, DmInfo, dm_info, dm_name, dm_resume
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


def _kernel_info(lv: LogicalVolume) -> DmInfo | None:
    try:
        return dm_info(dm_name(lv.vg_name, lv.name))
    except DmError:
        return None


def kernel_size(info: DmInfo) -> int | None:
    """Bytes of the live table of a mapped device (None when unreadable)."""
    path = SYS_DEV_BLOCK / f"{os.major(info.devno)}:{os.minor(info.devno)}" / "size"
    try:
        return int(path.read_text()) * 512
    except (OSError, ValueError):
        return None


def needs_refresh(lv: LogicalVolume, info: DmInfo | None = None) -> str | None:
    """Why the LV must be refreshed, or None. The kernel's own answer (DM_DEV_STATUS) decides;
    LVM's lv_attr state is the fallback when the kernel cannot be asked."""
    info = info if info is not None else _kernel_info(lv)
    if info is not None:
        if info.suspended:
            return "left suspended by an interrupted LVM command (its I/O is frozen)"
        if info.inactive_table:
            return "left with a loaded but inactive table by an interrupted LVM command"
        if not info.live_table:
            return "left mapped without a table by an interrupted LVM command"
        size = kernel_size(info)
        if size is not None and size != lv.size and not lv.is_thin_pool:
            return (f"its kernel device has {size} bytes, its metadata {lv.size}: an "
                    "interrupted resize")
        return None
    if lv.attr.state in NEEDS_REFRESH_STATES:
        what = {"s": "suspended", "S": "suspended", "d": "mapped without a table",
                "i": "mapped with an inactive table"}[lv.attr.state]
        return f"left {what} by an interrupted LVM command"
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
            why = needs_refresh(lv)
            if why is not None:
                _repair(lvm, lv, why, result, events, metrics)  # else lvremove may hang
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


def _still_suspended(lv: LogicalVolume) -> bool:
    info = _kernel_info(lv)
    return info is not None and info.suspended


def _repair(lvm: Lvm, lv: LogicalVolume, why: str, result: SweepResult, events: EventSink,
            metrics: SweepMetrics | None) -> None:
    with log_context(volume_id=lv.full_name):
        try:
            lvm.refresh(lv.vg_name, lv.name)
            if _still_suspended(lv):
                # LVM saw nothing to resume: resume the device as `dmsetup resume` would,
                # then reload the table from the committed metadata.
                dm_resume(dm_name(lv.vg_name, lv.name))
                lvm.refresh(lv.vg_name, lv.name)
            if _still_suspended(lv):
                raise LvmError([], None, "", message="the device is still suspended")
        except (LvmError, DmError) as exc:
            result.failed.append(lv.full_name)
            if metrics is not None:
                metrics.repairs.labels(action="refresh_failed").inc()
            events(EVENT_REPAIR_FAILED, f"volume {lv.full_name} was {why}; `lvchange --refresh` "
                   f"failed ({exc}): its I/O may be frozen, run `dmsetup resume "
                   f"{dm_name(lv.vg_name, lv.name)}` on the node", True)
            return
        result.repaired.append(lv.full_name)
        if metrics is not None:
            metrics.repairs.labels(action="refreshed").inc()
        events(EVENT_REPAIRED, f"volume {lv.full_name} was {why}; repaired at start-up "
               "(table reloaded from the committed metadata, device resumed)", True)
