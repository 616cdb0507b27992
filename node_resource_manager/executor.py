"""The executor: carries out a Plan with pvcreate, vgcreate, vgextend, thin-pool lvcreate and
thin-pool lvextend (data, and metadata when needed; only ever larger).

Before any write to a disk (pvcreate, and vgcreate/vgextend, which write the VG metadata) every
device of the action is verified against the identity the planner pinned (identity.Pins, held
open since the first check): another medium, another size, a path that now leads elsewhere
refuses that device for this round (``Execution.refused``) and nothing is written to it.

It never runs vgremove, vgreduce, pvremove or lvremove, and never passes force flags (the LVM
layer does not offer them for these commands). An LVM error means the state is UNKNOWN: the
remaining actions of that volume group are skipped and the next reconcile starts from a fresh
report; it is never read as "the VG is absent".
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from edge_common.lvm import Lvm, LvmError, VolumeGroup
from node_resource_manager.devices import HostPaths
from node_resource_manager.identity import PinnedDevice, Pins
from node_resource_manager.journal import Journal, new_pv_uuid
from node_resource_manager.plan import (
    Action,
    CreateThinPool,
    CreateVolumeGroup,
    DeviceRefusal,
    ExtendThinPool,
    ExtendVolumeGroup,
    Plan,
    RetagThinPool,
    overprovision_tag,
    pool_metadata_size,
    pool_retag,
    thin_pool_growth,
)
from node_resource_manager.safety import Reason, Refusal
from node_resource_manager.topology import ThinPoolSpec

log = logging.getLogger(__name__)

#: Tag on every VG this agent creates (lets operators find them: ``vgs @node-resource-manager``).
VG_TAG = "node-resource-manager"

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
    refused: list[DeviceRefusal] = field(default_factory=list)  # medium changed before writing

    @property
    def ok(self) -> bool:
        return not self.failed


class _NothingLeft(Exception):
    """Every device of a volume group action was refused at write time."""


def execute(plan: Plan, lvm: Lvm, journal: Journal, pins: Pins, paths: HostPaths) -> Execution:
    result = Execution()
    broken: set[str] = set()
    for action in plan.actions:
        if action.vg in broken:
            result.skipped.append(action)
            continue
        try:
            detail = _run(action, lvm, journal, _Verifier(pins, paths, result))
        except _NothingLeft:
            broken.add(action.vg)
            result.skipped.append(action)
            continue
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


@dataclass
class _Verifier:
    pins: Pins
    paths: HostPaths
    result: Execution

    def still_same(self, vg: str, devices: tuple[PinnedDevice, ...]) -> tuple[PinnedDevice, ...]:
        """The devices whose medium is still the one checked; the others are refused."""
        kept = []
        for pinned in devices:
            problems = pinned.verify(self.paths)
            if not problems:
                kept.append(pinned)
                continue
            dev = pinned.device
            text = (f"{dev.describe()} is no longer the medium that was checked "
                    f"({'; '.join(problems)}); nothing was written to it")
            log.warning(text, extra={"vg": vg})
            self.result.refused.append(DeviceRefusal(
                vg, dev.listed, dev.node, (Refusal(Reason.IDENTITY_CHANGED, text),)))
        return tuple(kept)

    def pinned(self, vg: str, action: CreateVolumeGroup | ExtendVolumeGroup
               ) -> tuple[PinnedDevice, ...]:
        out = []
        for dev in action.devices:
            pinned = self.pins.get(dev.rdev)
            if pinned is None:  # a planner bug; never write an unpinned device
                self.result.refused.append(DeviceRefusal(vg, dev.listed, dev.node, (Refusal(
                    Reason.IDENTITY_UNKNOWN, f"{dev.describe()} was not pinned"),)))
                continue
            out.append(pinned)
        return tuple(out)


def _run(action: Action, lvm: Lvm, journal: Journal, verifier: _Verifier) -> str | None:
    if isinstance(action, CreateVolumeGroup | ExtendVolumeGroup):
        return _build_volume_group(action, lvm, journal, verifier)
    if isinstance(action, ExtendThinPool):
        return _extend_thin_pool(action, lvm)
    if isinstance(action, RetagThinPool):
        return _retag_thin_pool(action, lvm)
    return _create_thin_pool(action, lvm)


def _retag_thin_pool(action: RetagThinPool, lvm: Lvm) -> str | None:
    """From a fresh look at the pool's tags; None when it already carries the config's."""
    name = action.spec.name
    pool = lvm.get_lv(action.vg, name)
    if pool is None or not pool.is_thin_pool:
        raise LvmError((), None, "", message=f"thin pool {action.vg}/{name} changed before its "
                                             "settings could be applied; state unknown")
    retag = pool_retag(pool, action.spec)
    if retag is None:
        return None
    tag, stale = retag
    lvm.retag(action.vg, name, add=(tag,), delete=stale)
    was = ", ".join(t.rpartition("=")[2] for t in stale) or "none"
    return (f"thin pool {action.vg}/{name}: overprovision ratio set to "
            f"{action.spec.overprovision_ratio:g} (was {was})")


def _build_volume_group(action: CreateVolumeGroup | ExtendVolumeGroup, lvm: Lvm,
                        journal: Journal, verifier: _Verifier) -> str:
    """pvcreate each new device (one at a time: each gets the UUID the journal recorded
    first), then ONE vgcreate/vgextend; every device verified right before each write."""
    vg = action.vg
    devices = list(verifier.still_same(vg, verifier.pinned(vg, action)))
    new = {d.rdev for d in action.new_pvs}
    created: list[tuple[int, str]] = []  # (rdev, PV UUID) of the PVs made here
    for pinned in list(devices):
        if pinned.device.rdev not in new:
            continue
        if not verifier.still_same(vg, (pinned,)):  # right before THIS device's pvcreate
            devices.remove(pinned)
            continue
        pv_uuid = new_pv_uuid()
        journal.add(vg, pv_uuid, pinned.identity, pinned.device.lvm_path)
        lvm.pvcreate([pinned.device.lvm_path], uuid=pv_uuid)
        created.append((pinned.device.rdev, pv_uuid))
    kept = verifier.still_same(vg, tuple(devices))
    if not kept:
        raise _NothingLeft(vg)
    paths = [d.device.lvm_path for d in kept]
    in_vg = {d.device.rdev for d in kept}
    # Journal entries of devices left out stay: those orphan PVs are still ours to finish.
    finished = [pv_uuid for rdev, pv_uuid in (*created, *action.adopted_pvs) if rdev in in_vg]
    if isinstance(action, CreateVolumeGroup):
        lvm.vgcreate(vg, paths, tags=(VG_TAG,))
        journal.done(finished)
        return f"created volume group {vg} from {', '.join(paths)}"
    lvm.vgextend(vg, paths)
    journal.done(finished)
    return f"extended volume group {vg} with {', '.join(paths)}"


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
    lvm.create_thin_pool(action.vg, action.spec.name, data, metadata_size=meta,
                         tags=(overprovision_tag(action.spec),))
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
