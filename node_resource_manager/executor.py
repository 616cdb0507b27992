"""The executor: carries out a Plan with pvcreate, vgcreate, vgextend, thin-pool lvcreate and
thin-pool lvextend (data, and metadata when needed; only ever larger).

It never runs vgremove, vgreduce, pvremove or lvremove, and never passes force flags (the LVM
layer does not offer them for these commands). An LVM error means the state is UNKNOWN: the
remaining actions of that volume group are skipped and the next reconcile starts from a fresh
report; it is never read as "the VG is absent".
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from edge_common.lvm import Lvm, LvmError, VolumeGroup
from node_resource_manager.journal import Journal
from node_resource_manager.plan import (
    Action,
    CreateThinPool,
    CreateVolumeGroup,
    ExtendThinPool,
    ExtendVolumeGroup,
    Plan,
    pool_metadata_size,
    thin_pool_growth,
)
from node_resource_manager.topology import ThinPoolSpec

log = logging.getLogger(__name__)

#: Tag on every VG this agent creates (lets operators find them: ``vgs @node-resource-manager``).
VG_TAG = "node-resource-manager"
#: The CSI driver reads a thin pool's overprovision ratio from this tag.
OVERPROVISION_TAG = "csi-lvm.edge.io/overprovision="

MIB = 1 << 20


@dataclass(frozen=True)
class Done:
    action: Action
    detail: str


@dataclass(frozen=True)
class Failed:
    action: Action
    error: LvmError


@dataclass
class Execution:
    done: list[Done] = field(default_factory=list)
    failed: list[Failed] = field(default_factory=list)
    skipped: list[Action] = field(default_factory=list)  # after a failure in the same VG
    unchanged: list[Action] = field(default_factory=list)  # nothing to do after all (re-read)

    @property
    def ok(self) -> bool:
        return not self.failed


def execute(plan: Plan, lvm: Lvm, journal: Journal) -> Execution:
    result = Execution()
    broken: set[str] = set()
    for action in plan.actions:
        if action.vg in broken:
            result.skipped.append(action)
            continue
        try:
            detail = _run(action, lvm, journal)
        except LvmError as exc:
            log.error("LVM command failed: state of the volume group is unknown",
                      extra={"vg": action.vg, "action": type(action).__name__,
                             "error": str(exc)})
            result.failed.append(Failed(action, exc))
            broken.add(action.vg)
            continue
        if detail is None:
            log.info("nothing to change after re-reading LVM",
                     extra={"vg": action.vg, "action": type(action).__name__})
            result.unchanged.append(action)
            continue
        log.info(detail, extra={"vg": action.vg, "action": type(action).__name__})
        result.done.append(Done(action, detail))
    return result


def _run(action: Action, lvm: Lvm, journal: Journal) -> str | None:
    if isinstance(action, CreateVolumeGroup | ExtendVolumeGroup):
        paths = [d.path for d in action.devices]
        if action.new_pvs:
            journal.add(action.vg, action.new_pvs)
            lvm.pvcreate([d.path for d in action.new_pvs])
        if isinstance(action, CreateVolumeGroup):
            lvm.vgcreate(action.vg, paths, tags=(VG_TAG,))
            journal.done(action.devices)
            return f"created volume group {action.vg} from {', '.join(paths)}"
        lvm.vgextend(action.vg, paths)
        journal.done(action.devices)
        return f"extended volume group {action.vg} with {', '.join(paths)}"
    if isinstance(action, ExtendThinPool):
        return _extend_thin_pool(action, lvm)
    return _create_thin_pool(action, lvm)


def _extend_thin_pool(action: ExtendThinPool, lvm: Lvm) -> str | None:
    """Sized from a fresh look at the VG and the pool (the VG may just have been extended);
    None when the pool needs no growth after all."""
    name = action.spec.name
    vg = lvm.get_vg(action.vg)
    pool = lvm.get_lv(action.vg, name) if vg is not None else None
    if vg is None or pool is None or not pool.is_thin_pool:
        raise LvmError((), None, "", message=f"thin pool {action.vg}/{name} changed before it "
                                             "could be extended; state unknown")
    growth = thin_pool_growth(vg, pool, action.spec)
    if growth is None:
        return None
    data, meta = growth
    lvm.extend_thin_pool(action.vg, name, data, metadata_size=meta)
    text = (f"extended thin pool {action.vg}/{name} from {pool.size // MIB} MiB to "
            f"{data // MIB} MiB ({action.spec.size_percent}% of the VG)")
    if meta is not None and pool.metadata_size is not None:
        text += f"; metadata from {pool.metadata_size // MIB} MiB to {meta // MIB} MiB"
    return text


def _create_thin_pool(action: CreateThinPool, lvm: Lvm) -> str:
    vg = lvm.get_vg(action.vg)
    if vg is None:
        raise LvmError((), None, "", message=f"volume group {action.vg} vanished before its "
                                             "thin pool could be created")
    sizes = thin_pool_sizes(vg, action.spec)
    if sizes is None:
        raise LvmError((), None, "", message=f"volume group {action.vg} has too little free "
                                             f"space for thin pool {action.spec.name}")
    data, meta = sizes
    tag = f"{OVERPROVISION_TAG}{action.spec.overprovision_ratio:g}"
    lvm.create_thin_pool(action.vg, action.spec.name, data, metadata_size=meta, tags=(tag,))
    return (f"created thin pool {action.vg}/{action.spec.name} of {data // MIB} MiB "
            f"(overprovision ratio {action.spec.overprovision_ratio:g})")


def thin_pool_sizes(vg: VolumeGroup, spec: ThinPoolSpec) -> tuple[int, int] | None:
    """Data and metadata sizes for a pool of ``size_percent`` of the VG.

    Metadata: about 1/1000 of the data (64 bytes per 64 KiB chunk), 4 MiB to 16 GiB, rounded up
    to extents; LVM keeps a spare metadata area of the same size, so twice that stays free."""
    ext = max(vg.extent_size, 1)
    want = vg.size * spec.size_percent // 100
    meta = pool_metadata_size(want, ext)
    data = min(want, vg.free - 2 * meta)
    data = data // ext * ext
    if data < ext:
        return None
    return data, meta
