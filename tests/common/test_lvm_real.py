"""edge_common.lvm against real lvm2 on loop disks (activation disabled on this kernel)."""

from __future__ import annotations

import pytest

from edge_common.commands import run
from edge_common.devmapper import has_device_mapper
from edge_common.lvm import Lvm, LvmError, LvmSettings
from tests.rigs.loopdisks import LoopDiskFactory, MiB, device_fingerprint, write_signature
from tests.rigs.lvm import VgFactory, unique_vg_name

EXTENT = 4 * MiB


def test_settings_for_this_kernel_disable_activation_exactly_when_device_mapper_is_missing() -> (
    None
):
    settings = Lvm.settings_for_this_kernel(timeout=7.0)
    assert settings.timeout == 7.0
    assert settings.activation_disabled is (not has_device_mapper())
    assert ("--driverloaded" in settings.extra_args) is (not has_device_mapper())


def test_vgcreate_reports_size_free_extents_and_tags(lvm: Lvm, vg_factory: VgFactory) -> None:
    vg = vg_factory(pvs=2, size=64 * MiB, tags=("owner.test", "tier=fast"))
    got = lvm.get_vg(vg.name)
    assert got is not None
    assert got.name == vg.name
    assert got.extent_size == EXTENT
    assert got.pv_count == 2
    assert got.lv_count == 0
    assert got.size == got.extent_count * EXTENT
    assert got.free == got.size == got.free_count * EXTENT
    assert 100 * MiB <= got.size < 128 * MiB  # two 64 MiB disks minus metadata
    assert set(got.tags) == {"owner.test", "tier=fast"}
    assert got.uuid


def test_vg_addtag_and_vg_deltag(lvm: Lvm, vg_factory: VgFactory) -> None:
    vg = vg_factory(tags=("a",))
    lvm.vg_addtag(vg.name, ["b", "c"])
    got = lvm.get_vg(vg.name)
    assert got is not None and set(got.tags) == {"a", "b", "c"}
    lvm.vg_deltag(vg.name, ["a"])
    got = lvm.get_vg(vg.name)
    assert got is not None and set(got.tags) == {"b", "c"}


def test_get_vg_of_a_missing_vg_is_none(lvm: Lvm) -> None:
    assert lvm.get_vg(unique_vg_name("missing")) is None


def test_get_lv_is_none_for_a_missing_lv_and_for_a_missing_vg(
    lvm: Lvm, vg_factory: VgFactory
) -> None:
    vg = vg_factory()
    assert lvm.get_lv(vg.name, "nope") is None
    assert lvm.get_lv(unique_vg_name("missing"), "nope") is None


def test_vgs_naming_a_missing_vg_raises_not_found(lvm: Lvm) -> None:
    with pytest.raises(LvmError) as info:
        lvm.vgs([unique_vg_name("missing")])
    assert info.value.is_not_found()
    assert info.value.exit_code == 5


def test_lvcreate_rounds_up_to_whole_extents_and_reports_bytes(
    lvm: Lvm, vg_factory: VgFactory
) -> None:
    vg = vg_factory()
    lvm.lvcreate(vg.name, "lv1", 5 * MiB + 1)
    lv = lvm.get_lv(vg.name, "lv1")
    assert lv is not None
    assert lv.size == 8 * MiB
    assert lv.vg_name == vg.name
    assert lv.path == f"/dev/{vg.name}/lv1"
    assert lv.segtype == "linear"
    assert lv.stripes == 1
    assert lv.pool_lv is None and lv.origin is None and lv.data_percent is None
    assert not lv.is_thin and not lv.is_thin_pool and not lv.is_snapshot
    if not has_device_mapper():
        assert not lv.is_active
        assert lv.attr.state_unknown
    vg_after = lvm.get_vg(vg.name)
    assert vg_after is not None
    assert vg_after.lv_count == 1
    assert vg_after.free == vg_after.size - 8 * MiB


def test_lvcreate_tags_are_reported_and_lvs_selects_by_tag(lvm: Lvm, vg_factory: VgFactory) -> None:
    vg = vg_factory()
    lvm.lvcreate(vg.name, "owned", 4 * MiB, tags=("owner=csi", "pvc.ns"))
    lvm.lvcreate(vg.name, "foreign", 4 * MiB, tags=("owner=other",))
    lvm.lvcreate(vg.name, "untagged", 4 * MiB)
    assert {lv.name for lv in lvm.lvs(vg.name)} == {"owned", "foreign", "untagged"}
    owned = lvm.lvs(vg.name, tag="owner=csi")
    assert [lv.name for lv in owned] == ["owned"]
    assert set(owned[0].tags) == {"owner=csi", "pvc.ns"}
    assert [lv.name for lv in lvm.lvs(tag="owner=csi") if lv.vg_name == vg.name] == ["owned"]
    assert lvm.lvs(vg.name, tag="owner") == []  # a tag is matched whole, not as a prefix


def test_addtag_and_deltag_change_only_the_named_tags(lvm: Lvm, vg_factory: VgFactory) -> None:
    vg = vg_factory()
    lvm.lvcreate(vg.name, "lv", 4 * MiB, tags=("keep",))
    lvm.addtag(vg.name, "lv", ["a", "b"])
    lv = lvm.get_lv(vg.name, "lv")
    assert lv is not None and set(lv.tags) == {"keep", "a", "b"}
    lvm.deltag(vg.name, "lv", ["a"])
    lv = lvm.get_lv(vg.name, "lv")
    assert lv is not None and set(lv.tags) == {"keep", "b"}


def test_lvextend_grows_to_the_absolute_size(lvm: Lvm, vg_factory: VgFactory) -> None:
    vg = vg_factory()
    lvm.lvcreate(vg.name, "lv", 8 * MiB)
    lvm.lvextend(vg.name, "lv", 20 * MiB)
    lv = lvm.get_lv(vg.name, "lv")
    assert lv is not None and lv.size == 20 * MiB


def test_lvextend_to_a_smaller_size_fails_and_changes_nothing(
    lvm: Lvm, vg_factory: VgFactory
) -> None:
    vg = vg_factory()
    lvm.lvcreate(vg.name, "lv", 12 * MiB)
    with pytest.raises(LvmError) as info:
        lvm.lvextend(vg.name, "lv", 4 * MiB)
    assert not info.value.is_not_found()
    lv = lvm.get_lv(vg.name, "lv")
    assert lv is not None and lv.size == 12 * MiB


def test_lv_spanning_two_pvs_is_reported_once_with_its_total_size(
    lvm: Lvm, vg_factory: VgFactory
) -> None:
    vg = vg_factory(pvs=2, size=32 * MiB)
    lvm.lvcreate(vg.name, "small", 8 * MiB)
    lvm.lvcreate(vg.name, "big", 40 * MiB)  # more than one PV holds
    lvs = [lv for lv in lvm.lvs(vg.name) if lv.name == "big"]
    assert len(lvs) == 1 and lvs[0].size == 40 * MiB
    report = lvm.report([vg.name])
    assert [lv.size for lv in report.lvs if lv.name == "big"] == [40 * MiB]


def test_lvremove_removes_and_get_lv_then_is_none(lvm: Lvm, vg_factory: VgFactory) -> None:
    vg = vg_factory()
    lvm.lvcreate(vg.name, "lv", 4 * MiB)
    lvm.lvremove(vg.name, "lv")
    assert lvm.get_lv(vg.name, "lv") is None


def test_lvremove_of_a_missing_lv_is_not_found(lvm: Lvm, vg_factory: VgFactory) -> None:
    vg = vg_factory()
    with pytest.raises(LvmError) as info:
        lvm.lvremove(vg.name, "never-created")
    assert info.value.is_not_found()


def test_lvrename_moves_the_lv_to_the_new_name(lvm: Lvm, vg_factory: VgFactory) -> None:
    vg = vg_factory()
    lvm.lvcreate(vg.name, "old", 4 * MiB, tags=("t1",))
    lvm.lvrename(vg.name, "old", "new")
    assert lvm.get_lv(vg.name, "old") is None
    new = lvm.get_lv(vg.name, "new")
    assert new is not None and new.tags == ("t1",)


def test_lvrename_of_a_missing_lv_is_not_found(lvm: Lvm, vg_factory: VgFactory) -> None:
    vg = vg_factory()
    with pytest.raises(LvmError) as info:
        lvm.lvrename(vg.name, "ghost", "other")
    assert info.value.is_not_found()


def test_striped_lv_reports_segtype_and_stripe_count(lvm: Lvm, vg_factory: VgFactory) -> None:
    vg = vg_factory(pvs=2)
    lvm.lvcreate(vg.name, "striped", 16 * MiB, stripes=2, stripe_size=64 * 1024)
    lv = lvm.get_lv(vg.name, "striped")
    assert lv is not None
    assert lv.segtype == "striped"
    assert lv.stripes == 2
    assert lv.size == 16 * MiB


def test_striped_lv_needs_as_many_pvs_as_stripes(lvm: Lvm, vg_factory: VgFactory) -> None:
    vg = vg_factory(pvs=1)
    with pytest.raises(LvmError) as info:
        lvm.lvcreate(vg.name, "striped", 8 * MiB, stripes=2)
    assert not info.value.is_not_found()
    assert lvm.get_lv(vg.name, "striped") is None


def test_striped_lv_without_room_on_every_pv_is_no_space(lvm: Lvm, vg_factory: VgFactory) -> None:
    vg = vg_factory(pvs=2, size=32 * MiB)
    lvm.lvcreate(vg.name, "filler", 24 * MiB)  # fills most of one PV
    with pytest.raises(LvmError) as info:
        lvm.lvcreate(vg.name, "striped", 16 * MiB, stripes=2)
    assert info.value.is_no_space()
    assert lvm.get_lv(vg.name, "striped") is None


def test_lvcreate_larger_than_free_space_is_no_space(lvm: Lvm, vg_factory: VgFactory) -> None:
    vg = vg_factory(size=32 * MiB)
    with pytest.raises(LvmError) as info:
        lvm.lvcreate(vg.name, "huge", 1024 * MiB)
    assert info.value.is_no_space()
    assert not info.value.is_not_found()
    assert not info.value.is_already_exists()


def test_lvcreate_with_a_taken_name_is_already_exists(lvm: Lvm, vg_factory: VgFactory) -> None:
    vg = vg_factory()
    lvm.lvcreate(vg.name, "lv", 4 * MiB)
    with pytest.raises(LvmError) as info:
        lvm.lvcreate(vg.name, "lv", 4 * MiB)
    assert info.value.is_already_exists()
    assert not info.value.is_not_found()


def test_lvcreate_in_a_missing_vg_is_not_found(lvm: Lvm) -> None:
    with pytest.raises(LvmError) as info:
        lvm.lvcreate(unique_vg_name("missing"), "lv", 4 * MiB)
    assert info.value.is_not_found()


def test_vgcreate_with_a_taken_name_is_already_exists(
    lvm: Lvm, vg_factory: VgFactory, loop_disks: LoopDiskFactory
) -> None:
    vg = vg_factory()
    (disk,) = loop_disks(1)
    with pytest.raises(LvmError) as info:
        lvm.vgcreate(vg.name, [disk.device])
    assert info.value.is_already_exists()


def test_vgextend_adds_the_new_pv_and_its_space(
    lvm: Lvm, vg_factory: VgFactory, loop_disks: LoopDiskFactory
) -> None:
    vg = vg_factory(pvs=1, size=32 * MiB)
    before = lvm.get_vg(vg.name)
    (disk,) = loop_disks(1, 32 * MiB)
    lvm.pvcreate([disk.device])
    lvm.vgextend(vg.name, [disk.device])
    after = lvm.get_vg(vg.name)
    assert before is not None and after is not None
    assert after.pv_count == 2
    assert after.size == 2 * before.size
    pvs = {pv.name: pv for pv in lvm.pvs([disk.device])}
    assert pvs[disk.device].vg_name == vg.name


def test_vgextend_of_a_missing_vg_is_not_found(lvm: Lvm, loop_disks: LoopDiskFactory) -> None:
    (disk,) = loop_disks(1)
    with pytest.raises(LvmError) as info:
        lvm.vgextend(unique_vg_name("missing"), [disk.device])
    assert info.value.is_not_found()


def test_report_returns_vgs_lvs_and_orphan_pvs_from_one_call(
    lvm: Lvm, vg_factory: VgFactory, loop_disks: LoopDiskFactory
) -> None:
    vg = vg_factory(pvs=2)
    lvm.lvcreate(vg.name, "a", 4 * MiB, tags=("x",))
    lvm.lvcreate(vg.name, "b", 8 * MiB, stripes=2)
    (orphan,) = loop_disks(1)
    lvm.pvcreate([orphan.device])
    try:
        report = lvm.report()
        ours = report.vg(vg.name)
        assert ours is not None and ours.lv_count == 2
        lvs = {lv.name: lv for lv in report.lvs_of(vg.name)}
        assert set(lvs) == {"a", "b"}
        assert lvs["a"].tags == ("x",) and lvs["a"].size == 4 * MiB
        assert lvs["b"].segtype == "striped" and lvs["b"].stripes == 2
        assert {pv.name for pv in report.pvs_of(vg.name)} == set(vg.devices)
        orphans = [pv for pv in report.pvs if pv.name == orphan.device]
        assert len(orphans) == 1 and orphans[0].vg_name is None
        assert orphans[0].dev_size == 64 * MiB
        assert report.lvs_of(vg.name) == tuple(
            lv for lv in lvm.report([vg.name]).lvs if lv.vg_name == vg.name
        )
    finally:
        lvm.command("pvremove", "--yes", "--", orphan.device)


def test_report_agrees_with_vgs_lvs_and_pvs(lvm: Lvm, vg_factory: VgFactory) -> None:
    vg = vg_factory(pvs=2, tags=("t",))
    lvm.lvcreate(vg.name, "lv", 12 * MiB, tags=("u",))
    report = lvm.report([vg.name])
    assert list(report.vgs) == lvm.vgs([vg.name])
    assert list(report.lvs) == lvm.lvs(vg.name)
    assert sorted(report.pvs, key=lambda p: p.name) == sorted(
        (pv for pv in lvm.pvs() if pv.vg_name == vg.name), key=lambda p: p.name
    )


def test_pvs_of_a_device_that_is_no_pv_is_not_found(lvm: Lvm, loop_disks: LoopDiskFactory) -> None:
    (disk,) = loop_disks(1)
    with pytest.raises(LvmError) as info:
        lvm.pvs([disk.device])
    assert info.value.is_not_found()


def test_pvcreate_refuses_a_device_with_a_filesystem_and_leaves_it_untouched(
    lvm: Lvm, loop_disks: LoopDiskFactory
) -> None:
    (disk,) = loop_disks(1)
    write_signature(disk.device, "ext4")
    before = device_fingerprint(disk.device)
    with pytest.raises(LvmError) as info:
        lvm.pvcreate([disk.device])
    assert not info.value.is_not_found()
    assert device_fingerprint(disk.device) == before
    assert disk.device not in {pv.name for pv in lvm.pvs()}


def test_vgcreate_refuses_a_device_with_a_partition_table_and_leaves_it_untouched(
    lvm: Lvm, loop_disks: LoopDiskFactory
) -> None:
    (disk,) = loop_disks(1)
    write_signature(disk.device, "gpt")
    before = device_fingerprint(disk.device)
    name = unique_vg_name()
    with pytest.raises(LvmError):
        lvm.vgcreate(name, [disk.device])
    assert device_fingerprint(disk.device) == before
    assert lvm.get_vg(name) is None


def test_lvm_version_answers(lvm: Lvm) -> None:
    assert "LVM version" in lvm.version()


def test_an_unknown_lvm_subcommand_is_an_error_but_not_not_found(lvm: Lvm) -> None:
    with pytest.raises(LvmError) as info:
        lvm.command("definitely-not-a-subcommand")
    assert info.value.exit_code not in (0, None)
    assert not info.value.is_not_found()


def test_config_setting_is_passed_to_lvm(vg_factory: VgFactory, lvm: Lvm) -> None:
    vg = vg_factory()
    # A filter that rejects every device: lvm then cannot see the VG at all.
    blind = Lvm(
        LvmSettings(
            command=lvm.settings.command,
            extra_args=lvm.settings.extra_args,
            config='devices { filter = [ "r|.*|" ] }',
        )
    )
    assert lvm.get_vg(vg.name) is not None
    assert blind.get_vg(vg.name) is None


# ---------------------------------------------------------------- real kernel only


@pytest.mark.kernel
def test_lvcreate_activates_and_wipes_a_previous_tenants_signature(
    lvm: Lvm, vg_factory: VgFactory
) -> None:
    vg = vg_factory()
    lvm.lvcreate(vg.name, "tenant1", 16 * MiB)
    lv = lvm.get_lv(vg.name, "tenant1")
    assert lv is not None and lv.is_active
    write_signature(lv.path, "ext4")
    lvm.lvremove(vg.name, "tenant1")
    lvm.lvcreate(vg.name, "tenant2", 16 * MiB)  # the same extents again
    lv2 = lvm.get_lv(vg.name, "tenant2")
    assert lv2 is not None and lv2.is_active
    with open(lv2.path, "rb") as f:
        head = f.read(4096)
    assert head == bytes(4096)  # --zero y: the start is zeroed
    probe = run(["blkid", "-p", "-o", "export", lv2.path], timeout=30, check=False)
    assert "TYPE=" not in probe.stdout_text  # --wipesignatures y: no ext4 left to find


@pytest.mark.kernel
def test_activate_and_deactivate_change_the_lv_state(lvm: Lvm, vg_factory: VgFactory) -> None:
    vg = vg_factory()
    lvm.lvcreate(vg.name, "lv", 8 * MiB, activate=False)
    lv = lvm.get_lv(vg.name, "lv")
    assert lv is not None and not lv.is_active
    lvm.activate(vg.name, "lv")
    lv = lvm.get_lv(vg.name, "lv")
    assert lv is not None and lv.is_active
    lvm.deactivate(vg.name, "lv")
    lv = lvm.get_lv(vg.name, "lv")
    assert lv is not None and not lv.is_active


@pytest.mark.kernel
def test_thin_pool_thin_volume_and_thin_snapshot(lvm: Lvm, vg_factory: VgFactory) -> None:
    vg = vg_factory(size=128 * MiB)
    lvm.create_thin_pool(vg.name, "pool", 64 * MiB, tags=("pool",))
    pool = lvm.get_lv(vg.name, "pool")
    assert pool is not None and pool.is_thin_pool and pool.segtype == "thin-pool"
    assert pool.data_percent is not None and pool.metadata_percent is not None
    lvm.lvcreate(vg.name, "thin", 256 * MiB, thin_pool="pool")  # overprovisioned
    thin = lvm.get_lv(vg.name, "thin")
    assert thin is not None and thin.is_thin and thin.pool_lv == "pool"
    assert thin.size == 256 * MiB and not thin.is_snapshot
    lvm.create_snapshot(vg.name, "thin", "snap")
    snap = lvm.get_lv(vg.name, "snap")
    assert snap is not None and snap.is_thin and snap.is_snapshot and snap.origin == "thin"
    assert snap.attr.skips_activation
    lvm.activate(vg.name, "snap", ignore_skip=True)
    snap = lvm.get_lv(vg.name, "snap")
    assert snap is not None and snap.is_active
    assert all(not lv.name.startswith("[") for lv in lvm.lvs(vg.name))  # no hidden LVs


@pytest.mark.kernel
def test_thick_snapshot_has_a_cow_size_and_an_origin(lvm: Lvm, vg_factory: VgFactory) -> None:
    vg = vg_factory(size=128 * MiB)
    lvm.lvcreate(vg.name, "origin", 32 * MiB)
    lvm.create_snapshot(vg.name, "origin", "snap", size_bytes=8 * MiB, tags=("s",))
    snap = lvm.get_lv(vg.name, "snap")
    assert snap is not None and snap.is_snapshot and not snap.is_thin
    assert snap.origin == "origin" and snap.tags == ("s",)
    origin = lvm.get_lv(vg.name, "origin")
    assert origin is not None and origin.attr.origin
