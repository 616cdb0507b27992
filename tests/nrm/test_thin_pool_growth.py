"""Growing a VG's thin pool to its configured percent when the VG grows: the planner's view
(from an LVM report; no device-mapper needed). The real lvextend runs in
tests/kernel/test_nrm_kernel.py."""

from __future__ import annotations

import dataclasses

from edge_common.lvm import LogicalVolume, LvmReport, VolumeGroup
from edge_common.lvm.attr import LvAttr
from node_resource_manager.devices import HostPaths
from node_resource_manager.identity import Pins
from node_resource_manager.journal import Journal
from node_resource_manager.plan import (
    OVERPROVISION_TAG,
    ExtendThinPool,
    ExtendVolumeGroup,
    Plan,
    Planner,
    RetagThinPool,
    describe,
    thin_pool_growth,
)
from node_resource_manager.safety import SafetyChecker
from node_resource_manager.topology import (
    Operator,
    ThinPoolSpec,
    TopologyType,
    VolumeGroupSpec,
)
from tests.nrm.conftest import NrmRig

MiB = 1 << 20
GiB = 1 << 30
EXT = 4 * MiB


def _vg(size: int, free: int, name: str = "vg1") -> VolumeGroup:
    return VolumeGroup(name, "vg-uuid", size, free, EXT, size // EXT, free // EXT, 2, 1)


def _lv(name: str, size: int, *, attr: str = "twi-a-tz--", meta: int | None = 8 * MiB,
        vg: str = "vg1", tags: tuple[str, ...] = (f"{OVERPROVISION_TAG}4",)) -> LogicalVolume:
    return LogicalVolume(name=name, vg_name=vg, uuid=f"uuid-{name}", size=size,
                         attr=LvAttr.parse(attr), metadata_size=meta, segtype="thin-pool",
                         tags=tags)


def _spec(percent: int = 80, pool: str = "pool0", devices: tuple[str, ...] = ()
          ) -> VolumeGroupSpec:
    return VolumeGroupSpec(name="vg1", key="storage", operator=Operator.EXISTS, value=None,
                           type=TopologyType.DEVICE, devices=devices,
                           thin_pool=ThinPoolSpec(pool, percent, 4))


def _plan(spec: VolumeGroupSpec, report: LvmReport, paths: HostPaths | None = None) -> Plan:
    checker = SafetyChecker()
    planner = Planner(checker, Journal(None), paths or HostPaths())
    with Pins(planner.paths) as pins:
        return planner.plan([spec], report, checker.snapshot(report.pvs), pins)


def test_pool_smaller_than_its_percent_of_a_grown_vg_is_planned_to_grow() -> None:
    # Created at 80% of a 1000 MiB VG (800 MiB), then the VG grew to 2000 MiB.
    vg = _vg(2000 * MiB, 2000 * MiB - 800 * MiB - 16 * MiB)
    report = LvmReport(vgs=(vg,), lvs=(_lv("pool0", 800 * MiB),))
    plan = _plan(_spec(80), report)
    assert plan.actions == [ExtendThinPool("vg1", ThinPoolSpec("pool0", 80, 4), 800 * MiB,
                                           1600 * MiB)]
    assert "extend thin pool vg1/pool0 from 800 MiB to 1600 MiB (80% of the VG)" in describe(plan)
    assert plan.problems == []


def test_pool_within_one_extent_of_its_percent_is_left_alone() -> None:
    vg = _vg(2000 * MiB, 1000 * MiB)
    want = 1600 * MiB
    for size in (want, want - EXT):  # extent rounding is no reason to act
        report = LvmReport(vgs=(vg,), lvs=(_lv("pool0", size),))
        assert _plan(_spec(80), report).actions == [], size
    report = LvmReport(vgs=(vg,), lvs=(_lv("pool0", want - 2 * EXT),))
    (action,) = _plan(_spec(80), report).actions
    assert isinstance(action, ExtendThinPool) and action.to_size == want


def test_pool_larger_than_its_percent_is_never_shrunk() -> None:
    # The operator lowered sizePercent from 90 to 50: nothing happens.
    vg = _vg(2000 * MiB, 180 * MiB)
    report = LvmReport(vgs=(vg,), lvs=(_lv("pool0", 1800 * MiB),))
    plan = _plan(_spec(50), report)
    assert plan.actions == []
    assert "Nothing to change." in describe(plan)


def test_metadata_grows_with_the_data_only_when_it_must() -> None:
    # 40 GiB pool with 44 MiB metadata in a VG grown to 100 GiB; 80% -> 80 GiB needs
    # 80 GiB / 1000 = 81.92 MiB -> 84 MiB of metadata (whole extents).
    vg = _vg(100 * GiB, 60 * GiB - 88 * MiB)
    pool = _lv("pool0", 40 * GiB, meta=44 * MiB)
    growth = thin_pool_growth(vg, pool, ThinPoolSpec("pool0", 80))
    assert growth == (80 * GiB, 84 * MiB)
    # Metadata already large enough: only the data is given (lvm refuses a size that is not
    # larger than the current one).
    roomy = dataclasses.replace(pool, metadata_size=128 * MiB)
    assert thin_pool_growth(vg, roomy, ThinPoolSpec("pool0", 80)) == (80 * GiB, None)


def test_growth_is_capped_by_the_free_space_keeping_room_for_the_metadata_spare() -> None:
    # Other LVs took most of the new space: the pool gets what is free, minus twice the
    # metadata growth (the metadata and its spare both grow).
    vg = _vg(100 * GiB, 1 * GiB)
    pool = _lv("pool0", 40 * GiB, meta=44 * MiB)
    data, meta = thin_pool_growth(vg, pool, ThinPoolSpec("pool0", 80)) or (0, None)
    assert meta == 84 * MiB
    assert data == 40 * GiB + 1 * GiB - 2 * (84 - 44) * MiB
    # Too little room for the metadata growth as well: data only, within the free space.
    tight = _vg(100 * GiB, 64 * MiB)
    data, meta = thin_pool_growth(tight, pool, ThinPoolSpec("pool0", 80)) or (0, None)
    assert (data, meta) == (40 * GiB + 64 * MiB, None)
    # Nothing free: nothing to do.
    assert thin_pool_growth(_vg(100 * GiB, 0), pool, ThinPoolSpec("pool0", 80)) is None


def test_only_the_configured_thin_pool_is_extended() -> None:
    vg = _vg(2000 * MiB, 1100 * MiB)
    other_pool = _lv("otherpool", 400 * MiB)
    linear = _lv("pool0", 400 * MiB, attr="-wi-a-----", meta=None)
    report = LvmReport(vgs=(vg,), lvs=(other_pool, linear))
    plan = _plan(_spec(80), report)
    # pool0 is not a thin pool: reported, not touched; otherpool is not the configured pool.
    assert plan.actions == []
    assert plan.problems == ["volume group 'vg1': logical volume 'pool0' exists and is not a "
                             "thin pool; it is left alone"]


def test_pool_is_planned_to_grow_after_the_vg_is_extended_in_the_same_plan(
    nrm: NrmRig,
) -> None:
    disks = nrm.disks(2)
    vg = nrm.vg_name()
    nrm.lvm.vgcreate(vg, [disks[0].device])
    real = nrm.lvm.report()
    found = real.vg(vg)
    assert found is not None
    # The pool as it would be at 80% of the one-disk VG (thin pools need device-mapper,
    # which this kernel lacks, so it is added to the report).
    size = found.size * 80 // 100 // found.extent_size * found.extent_size
    pool = _lv("pool0", size, vg=vg)
    report = dataclasses.replace(real, lvs=(*real.lvs, pool))
    spec = dataclasses.replace(_spec(80, devices=(disks[0].device, disks[1].device)), name=vg)
    plan = _plan(spec, report, nrm.paths())
    kinds = [type(a) for a in plan.actions]
    assert kinds == [ExtendVolumeGroup, ExtendThinPool]
    grow = plan.actions[1]
    assert isinstance(grow, ExtendThinPool) and grow.from_size == size and grow.to_size is None
    assert f"extend thin pool {vg}/pool0 from {size // MiB} MiB to 80% of the extended VG" in (
        describe(plan))
    # Without the new disk the pool is at its percent: nothing to do.
    alone = dataclasses.replace(spec, devices=(disks[0].device,))
    assert _plan(alone, report, nrm.paths()).actions == []


# ---------------------------------------------------------------------- settings carried as tags


def test_changed_overprovision_ratio_is_planned_as_a_retag() -> None:
    vg = _vg(2000 * MiB, 200 * MiB)
    report = LvmReport(vgs=(vg,), lvs=(_lv("pool0", 1600 * MiB),))  # carries ratio 4
    spec = dataclasses.replace(_spec(80), thin_pool=ThinPoolSpec("pool0", 80, 2.5))
    plan = _plan(spec, report)
    assert plan.actions == [RetagThinPool("vg1", ThinPoolSpec("pool0", 80, 2.5),
                                          f"{OVERPROVISION_TAG}2.5", (f"{OVERPROVISION_TAG}4",))]
    assert ("volume group vg1: set thin pool vg1/pool0 overprovision ratio to 2.5 (was 4; tag "
            f"{OVERPROVISION_TAG}2.5)") in describe(plan)


def test_missing_or_extra_overprovision_tags_converge_to_exactly_one() -> None:
    vg = _vg(2000 * MiB, 200 * MiB)
    untagged = LvmReport(vgs=(vg,), lvs=(_lv("pool0", 1600 * MiB, tags=("other",)),))
    (act,) = _plan(_spec(80), untagged).actions
    assert act == RetagThinPool("vg1", ThinPoolSpec("pool0", 80, 4), f"{OVERPROVISION_TAG}4", ())
    twice = LvmReport(vgs=(vg,), lvs=(_lv("pool0", 1600 * MiB, tags=(
        f"{OVERPROVISION_TAG}4", f"{OVERPROVISION_TAG}9")),))
    (act,) = _plan(_spec(80), twice).actions
    assert isinstance(act, RetagThinPool) and act.stale == (f"{OVERPROVISION_TAG}9",)
    in_sync = LvmReport(vgs=(vg,), lvs=(_lv("pool0", 1600 * MiB),))
    assert _plan(_spec(80), in_sync).actions == []
