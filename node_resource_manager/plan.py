"""The planner: desired volume groups (the selected topology entries) against what LVM reports.

Input is ONE LVM report per reconcile and one host snapshot; output is a Plan: the actions to
take (create a VG, extend a VG, create a thin pool, grow a thin pool to its percent of the
VG), the devices refused and why, and the PVs that are in a VG but no longer listed (reported,
never removed). The planner changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from edge_common.lvm import LogicalVolume, LvmReport, VolumeGroup
from edge_common.lvm.pool_tags import OVERPROVISION_TAG
from node_resource_manager.devices import BlockDevice, HostPaths, ResolveError, expand_pattern
from node_resource_manager.devices import resolve as resolve_device
from node_resource_manager.identity import IdentityUnknown, Pins
from node_resource_manager.journal import Journal
from node_resource_manager.safety import HostState, Reason, Refusal, SafetyChecker
from node_resource_manager.topology import (
    ConfigInvalid,
    ThinPoolSpec,
    TopologyType,
    VolumeGroupSpec,
)


@dataclass(frozen=True)
class DeviceRefusal:
    vg: str
    listed: str
    device: str | None  # the resolved /dev/<kernel name>, when the path resolved at all
    refusals: tuple[Refusal, ...]
    from_pattern: bool = False

    @property
    def reasons(self) -> tuple[Reason, ...]:
        return tuple(r.reason for r in self.refusals)

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            "volumeGroup": self.vg,
            "device": self.listed,
            "reasons": [r.to_dict() for r in self.refusals],
        }
        if self.device and self.device != self.listed:
            out["resolved"] = self.device
        if self.from_pattern:
            out["fromPattern"] = True
        return out


@dataclass(frozen=True)
class CreateVolumeGroup:
    vg: str
    devices: tuple[BlockDevice, ...]  # every one pinned (identity.Pins) by the planner
    new_pvs: tuple[BlockDevice, ...]  # devices that need pvcreate first
    adopted_pvs: tuple[tuple[int, str], ...] = ()  # (rdev, UUID) of our own orphan PVs (journal)


@dataclass(frozen=True)
class ExtendVolumeGroup:
    vg: str
    devices: tuple[BlockDevice, ...]
    new_pvs: tuple[BlockDevice, ...]
    adopted_pvs: tuple[tuple[int, str], ...] = ()


@dataclass(frozen=True)
class CreateThinPool:
    vg: str
    spec: ThinPoolSpec


@dataclass(frozen=True)
class ExtendThinPool:
    """Grow an existing thin pool's data (and metadata if needed) to ``size_percent`` of its VG.

    ``from_size``/``to_size`` are the pool's data sizes as the planner saw them; ``to_size`` is
    None when the same plan extends the VG first (the executor then sizes the pool from the
    grown VG). The executor always re-reads the VG and the pool and recomputes."""

    vg: str
    spec: ThinPoolSpec
    from_size: int
    to_size: int | None


@dataclass(frozen=True)
class RetagThinPool:
    """Converge an existing thin pool's settings carried as LVM tags (the overprovision ratio
    the CSI driver reads) to the config: ``stale`` tags are deleted and ``tag`` added in one
    lvchange."""

    vg: str
    spec: ThinPoolSpec
    tag: str
    stale: tuple[str, ...]


Action = CreateVolumeGroup | ExtendVolumeGroup | CreateThinPool | ExtendThinPool | RetagThinPool

MIB = 1 << 20


@dataclass(frozen=True)
class RemovedDevice:
    vg: str
    pv: str


@dataclass
class VolumeGroupPlan:
    spec: VolumeGroupSpec
    exists: bool
    members: list[str] = field(default_factory=list)  # PV paths already in the VG and listed


@dataclass
class Plan:
    volume_groups: list[VolumeGroupPlan] = field(default_factory=list)
    actions: list[Action] = field(default_factory=list)
    refusals: list[DeviceRefusal] = field(default_factory=list)  # listed devices refused
    skipped: list[DeviceRefusal] = field(default_factory=list)  # pattern matches not eligible
    removed: list[RemovedDevice] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # not about one device

    @property
    def converged(self) -> bool:
        return not self.actions


class Planner:
    def __init__(self, checker: SafetyChecker, journal: Journal, paths: HostPaths) -> None:
        self.checker = checker
        self.journal = journal
        self.paths = paths

    def plan(
        self, specs: Sequence[VolumeGroupSpec], report: LvmReport, host: HostState, pins: Pins
    ) -> Plan:
        """Raises ConfigInvalid when one device is claimed by two volume groups.

        Every device that may be written is pinned in ``pins`` (held open, its medium
        identified) BEFORE it is checked; the caller keeps ``pins`` open until the plan has
        been executed."""
        plan = Plan()
        resolved: dict[str, list[tuple[str, BlockDevice]]] = {}
        # 1. Explicit lists: resolve every path; a device in two VGs is a config error.
        owner: dict[int, str] = {}
        conflicts: list[str] = []
        for spec in specs:
            if spec.type is not TopologyType.DEVICE:
                continue
            entries: list[tuple[str, BlockDevice]] = []
            for listed in spec.devices:
                try:
                    dev = resolve_device(listed, self.paths)
                except ResolveError as exc:
                    reason = Reason.MISSING if exc.missing else Reason.NOT_BLOCK_DEVICE
                    plan.refusals.append(
                        DeviceRefusal(spec.name, listed, None, (Refusal(reason, str(exc)),))
                    )
                    continue
                entries.append((listed, dev))
                prev = owner.setdefault(dev.rdev, spec.name)
                if prev != spec.name:
                    conflicts.append(_conflict(dev, prev, spec.name))
            resolved[spec.name] = entries
        if conflicts:
            raise ConfigInvalid(sorted(set(conflicts)))

        # 2. Per volume group: membership, safety, actions.
        pattern_claims: dict[int, str] = {}
        for spec in specs:
            vg = report.vg(spec.name)
            vgp = VolumeGroupPlan(spec=spec, exists=vg is not None)
            plan.volume_groups.append(vgp)
            enumerated = True  # False: the devices could not be listed
            if spec.type is TopologyType.DEVICE:
                candidates = self._dedupe_listed(spec.name, resolved[spec.name], plan)
            else:
                try:
                    candidates = self._pattern_candidates(spec)
                except OSError as exc:
                    candidates, enumerated = [], False
                    plan.problems.append(f"volume group {spec.name!r}: its patterns cannot be "
                                         f"matched, the block devices cannot be listed ({exc}); "
                                         "no new device is used")
            eligible: list[BlockDevice] = []
            adopted: list[tuple[int, str]] = []
            wanted: set[int] = set()
            for dev in candidates:
                wanted.add(dev.rdev)
                pv = host.pvs_by_rdev.get(dev.rdev)
                if pv is not None and pv.vg_name == spec.name:
                    vgp.members.append(pv.name)
                    continue
                claimed = False
                try:
                    pinned = pins.pin(dev)
                except IdentityUnknown as exc:
                    refusals = [Refusal(Reason.IDENTITY_UNKNOWN, f"{exc}; not used while its "
                                                                 "medium is unknown")]
                else:
                    dev = pinned.device
                    claimed = pv is not None and not pv.vg_name and self.journal.claims(
                        pv.uuid, pinned.identity, spec.name)
                    refusals = self.checker.check(
                        dev, host, target_vg=spec.name, claimed_orphan=claimed
                    )
                if refusals:
                    target = plan.skipped if spec.type is TopologyType.PATTERN else plan.refusals
                    target.append(DeviceRefusal(spec.name, dev.listed, dev.node,
                                                tuple(refusals),
                                                from_pattern=spec.type is TopologyType.PATTERN))
                    continue
                if spec.type is TopologyType.PATTERN:
                    other = owner.get(dev.rdev) or pattern_claims.get(dev.rdev)
                    if other is not None and other != spec.name:
                        conflicts.append(_conflict(dev, other, spec.name))
                        continue
                    pattern_claims[dev.rdev] = spec.name
                eligible.append(dev)
                if claimed and pv is not None:
                    adopted.append((dev.rdev, pv.uuid))
            new_pvs = tuple(d for d in eligible if d.rdev not in host.pvs_by_rdev)
            if eligible and vg is None:
                plan.actions.append(CreateVolumeGroup(spec.name, tuple(eligible), new_pvs,
                                                      tuple(adopted)))
            elif eligible:
                plan.actions.append(ExtendVolumeGroup(spec.name, tuple(eligible), new_pvs,
                                                      tuple(adopted)))
            if vg is not None and enumerated:  # not enumerated: unknown, not removed
                for pv in report.pvs_of(spec.name):
                    rdev = _rdev_of(host, pv.name)
                    if rdev is None or rdev not in wanted:
                        plan.removed.append(RemovedDevice(spec.name, pv.name))
            if spec.thin_pool is not None and (vg is not None or eligible):
                self._plan_thin_pool(spec, spec.thin_pool, report, plan)
        if conflicts:
            raise ConfigInvalid(sorted(set(conflicts)))
        pins.keep_only({d.rdev for a in plan.actions
                        if isinstance(a, CreateVolumeGroup | ExtendVolumeGroup)
                        for d in a.devices})
        return plan

    def _dedupe_listed(
        self, vg: str, entries: list[tuple[str, BlockDevice]], plan: Plan
    ) -> list[BlockDevice]:
        """A device listed twice (same path twice, or a path and a link to it) is refused:
        the list is ambiguous, and the operator should see that."""
        by_rdev: dict[int, list[BlockDevice]] = {}
        for _, dev in entries:
            by_rdev.setdefault(dev.rdev, []).append(dev)
        out = []
        for devs in by_rdev.values():
            if len(devs) == 1:
                out.append(devs[0])
                continue
            names = ", ".join(d.listed for d in devs)
            for dev in dict.fromkeys(devs):
                plan.refusals.append(
                    DeviceRefusal(
                        vg, dev.listed, dev.node,
                        (Refusal(Reason.LISTED_TWICE,
                                 f"{dev.node} is listed {len(devs)} times for volume group "
                                 f"{vg!r} ({names}); list each device once"),),
                    )
                )
        return out

    def _pattern_candidates(self, spec: VolumeGroupSpec) -> list[BlockDevice]:
        out: dict[int, BlockDevice] = {}
        for pattern in spec.patterns:
            for path in expand_pattern(pattern, self.paths):
                try:
                    dev = resolve_device(path, self.paths)
                except ResolveError:
                    continue  # a link to nothing, a partition that just vanished: not a match
                out.setdefault(dev.rdev, dev)
        return list(out.values())

    def _plan_thin_pool(
        self, spec: VolumeGroupSpec, pool: ThinPoolSpec, report: LvmReport, plan: Plan
    ) -> None:
        existing = next(
            (lv for lv in report.lvs_of(spec.name) if lv.name == pool.name), None
        )
        if existing is None:
            plan.actions.append(CreateThinPool(spec.name, pool))
        elif not existing.is_thin_pool:
            plan.problems.append(
                f"volume group {spec.name!r}: logical volume {pool.name!r} exists and is not a "
                "thin pool; it is left alone"
            )
        else:
            vg = report.vg(spec.name)
            grows_vg = any(isinstance(a, ExtendVolumeGroup) and a.vg == spec.name
                           for a in plan.actions)
            growth = thin_pool_growth(vg, existing, pool) if vg is not None else None
            if growth is not None:
                plan.actions.append(
                    ExtendThinPool(spec.name, pool, existing.size, None if grows_vg else growth[0])
                )
            elif grows_vg:
                plan.actions.append(ExtendThinPool(spec.name, pool, existing.size, None))
            retag = pool_retag(existing, pool)
            if retag is not None:
                plan.actions.append(RetagThinPool(spec.name, pool, *retag))


def overprovision_tag(spec: ThinPoolSpec) -> str:
    return f"{OVERPROVISION_TAG}{spec.overprovision_ratio:g}"


def pool_retag(pool: LogicalVolume, spec: ThinPoolSpec) -> tuple[str, tuple[str, ...]] | None:
    """(tag to add, stale tags to delete) when the pool does not carry exactly the tag the
    config asks for; None when it does."""
    want = overprovision_tag(spec)
    carried = tuple(t for t in pool.tags if t.startswith(OVERPROVISION_TAG))
    if carried == (want,):
        return None
    return want, tuple(t for t in carried if t != want)


def overprovision_tags(pool: LogicalVolume) -> list[str]:
    """The ratio values the pool's tags carry (what the CSI driver sees), as written."""
    return [t[len(OVERPROVISION_TAG):] for t in pool.tags if t.startswith(OVERPROVISION_TAG)]


def pool_metadata_size(data_bytes: int, extent: int) -> int:
    """Thin pool metadata for ``data_bytes`` of data: about 1/1000 (64 bytes per 64 KiB
    chunk), 4 MiB to 16 GiB, rounded up to whole extents."""
    meta = min(max(data_bytes // 1000, 4 * MIB), 16 << 30)
    return -(-meta // extent) * extent


def thin_pool_growth(
    vg: VolumeGroup, pool: LogicalVolume, spec: ThinPoolSpec
) -> tuple[int, int | None] | None:
    """New (data size, metadata size or None) for an existing thin pool smaller than
    ``size_percent`` of its VG, or None when it needs no growth.

    Never shrinks: the data only grows, and only by MORE than one extent (the extent rounding
    of the creation is no reason to act); the metadata is given only when it must grow (to
    1/1000 of the target, as at creation), and then its spare grows with it, so twice the
    metadata growth is kept free. Growth is capped by the VG's free space."""
    ext = max(vg.extent_size, 1)
    want = vg.size * spec.size_percent // 100
    meta: int | None = None
    meta_growth = 0
    if pool.metadata_size is not None:
        target_meta = pool_metadata_size(want, ext)
        if target_meta > pool.metadata_size:
            meta, meta_growth = target_meta, target_meta - pool.metadata_size
    if meta is not None and vg.free < 2 * meta_growth + 2 * ext:
        meta, meta_growth = None, 0  # no room for the metadata too: grow the data only
    data = min(want, pool.size + vg.free - 2 * meta_growth) // ext * ext
    if data - pool.size <= ext:
        return None
    return data, meta


def _conflict(dev: BlockDevice, first: str, second: str) -> str:
    a, b = sorted((first, second))
    return (
        f"device {dev.node} ({dev.majmin}) is claimed by volume groups {a!r} and {b!r}; "
        "a device can belong to one volume group only"
    )


def _rdev_of(host: HostState, pv_name: str) -> int | None:
    for rdev, pv in host.pvs_by_rdev.items():
        if pv.name == pv_name:
            return rdev
    return None


def extend_pool_text(act: ExtendThinPool) -> str:
    """``extend thin pool vg/pool from X MiB to Y MiB (N% of the VG)``; Y is "N% of the
    extended VG" when the VG grows in the same plan."""
    target = (f"{act.to_size // MIB} MiB ({act.spec.size_percent}% of the VG)"
              if act.to_size is not None
              else f"{act.spec.size_percent}% of the extended VG")
    return (f"extend thin pool {act.vg}/{act.spec.name} from {act.from_size // MIB} MiB "
            f"to {target}")


def retag_pool_text(act: RetagThinPool) -> str:
    was = ", ".join(t[len(OVERPROVISION_TAG):] for t in act.stale) or "none"
    return (f"set thin pool {act.vg}/{act.spec.name} overprovision ratio to "
            f"{act.spec.overprovision_ratio:g} (was {was}; tag {act.tag})")


def describe(plan: Plan) -> str:
    """The plan for people (``--dry-run``)."""
    lines: list[str] = []
    if not plan.volume_groups:
        lines.append("No volume group of the topology selects this node.")
    for vgp in plan.volume_groups:
        spec = vgp.spec
        acts = [a for a in plan.actions if a.vg == spec.name]
        if not acts:
            if vgp.exists:
                lines.append(f"volume group {spec.name}: up to date "
                             f"({len(vgp.members)} listed PV(s) in place)")
            else:
                lines.append(f"volume group {spec.name}: cannot be created, no eligible device")
        for act in acts:
            if isinstance(act, CreateVolumeGroup):
                lines.append(f"volume group {spec.name}: CREATE from "
                             f"{', '.join(d.describe() for d in act.devices)}")
            elif isinstance(act, ExtendVolumeGroup):
                lines.append(f"volume group {spec.name}: EXTEND with "
                             f"{', '.join(d.describe() for d in act.devices)}")
            elif isinstance(act, ExtendThinPool):
                lines.append(f"volume group {spec.name}: {extend_pool_text(act)}")
            elif isinstance(act, RetagThinPool):
                lines.append(f"volume group {spec.name}: {retag_pool_text(act)}")
            else:
                lines.append(f"volume group {spec.name}: CREATE THIN POOL {act.spec.name} "
                             f"({act.spec.size_percent}% of the VG, overprovision ratio "
                             f"{act.spec.overprovision_ratio:g})")
            new = getattr(act, "new_pvs", ())
            if new:
                lines.append(f"    pvcreate {' '.join(d.lvm_path for d in new)}")
    if plan.refusals:
        lines.append("Refused (left untouched):")
        for r in plan.refusals:
            for refusal in r.refusals:
                lines.append(f"  {r.vg}: {r.listed}: {refusal.reason}: {refusal.message}")
    if plan.skipped:
        lines.append("Matched by a pattern but not eligible (left untouched):")
        for r in plan.skipped:
            for refusal in r.refusals:
                lines.append(f"  {r.vg}: {r.listed}: {refusal.reason}: {refusal.message}")
    if plan.removed:
        lines.append("In a volume group but no longer listed (left in place, never removed):")
        for rem in plan.removed:
            lines.append(f"  {rem.vg}: {rem.pv}")
    for problem in plan.problems:
        lines.append(f"Problem: {problem}")
    if not plan.actions:
        lines.append("Nothing to change.")
    return "\n".join(lines)
