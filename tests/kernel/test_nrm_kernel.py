"""Node resource manager on a real kernel (device-mapper, partition tables): a VG with a thin
pool from the guest's disks, and the safety checks that need a live kernel: partitions,
holders, device-mapper devices, multipath members.

Runs in the qemu guest (``python -m kernel_guest pytest tests/kernel/test_nrm_kernel.py``) on
``kernel_disks`` (/dev/vda, /dev/vdb there), which are scrubbed before and checked after each
test: every test removes what it built.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from edge_common.commands import run
from edge_common.loopdisk import device_fingerprint, write_gpt
from edge_common.lvm import Lvm
from node_resource_manager.devices import HostPaths, resolve
from node_resource_manager.events import LogSink
from node_resource_manager.identity import Pins
from node_resource_manager.journal import Journal
from node_resource_manager.plan import OVERPROVISION_TAG
from node_resource_manager.reconcile import Outcome, Reconciler, ReconcileResult
from node_resource_manager.safety import Reason, SafetyChecker, SafetySettings
from node_resource_manager.sources import config_from_text
from tests.nrm.conftest import ADMITTED, GATE, entry, topology_text
from tests.rigs.lvm import unique_vg_name

pytestmark = pytest.mark.kernel

MiB = 1 << 20


def reconcile(lvm: Lvm, tmp: Path, text: str, *, dry_run: bool = False,
              sink: LogSink | None = None) -> ReconcileResult:
    checker = SafetySettings(mount_tables=("/proc/self/mountinfo",))
    reconciler = Reconciler(node_name="guest", lvm=lvm, checker=SafetyChecker(checker),
                            journal=Journal(tmp / "state"), paths=HostPaths(), gate_key=GATE,
                            gate_value="true", sink=sink or LogSink())
    return reconciler.reconcile(config_from_text(text, "test", "1"), ADMITTED, dry_run=dry_run)


@contextlib.contextmanager
def removed_afterwards(lvm: Lvm, *vgs: str) -> Iterator[None]:
    """Test-rig cleanup (the agent never removes anything)."""
    try:
        yield
    finally:
        for vg in vgs:
            if lvm.get_vg(vg) is not None:
                pvs = [pv.name for pv in lvm.pvs() if pv.vg_name == vg]
                lvm.command("vgremove", "--yes", "--force", "--", vg)
                lvm.command("pvremove", "--yes", "--", *pvs)


@contextlib.contextmanager
def dm_linear(name: str, device: str, sectors: int = 2048, uuid: str | None = None
              ) -> Iterator[str]:
    """A device-mapper linear map over the first sectors of ``device`` (makes it a holder)."""
    argv = ["dmsetup", "create", name, "--table", f"0 {sectors} linear {device} 0"]
    if uuid:
        argv += ["--uuid", uuid]
    run(argv, timeout=60)
    try:
        # Without udev there is no /dev/mapper/NAME; devtmpfs has the /dev/dm-N node.
        kname = run(["dmsetup", "info", "--columns", "--noheadings", "-o", "blkdevname", name],
                    timeout=60).stdout_text.strip()
        yield f"/dev/{kname}"
    finally:
        run(["dmsetup", "remove", "--retry", name], timeout=60)


def reasons_for(result: ReconcileResult, listed: str) -> set[Reason]:
    assert result.plan is not None
    return {reason for r in result.plan.refusals if r.listed == listed for reason in r.reasons}


def test_volume_group_and_thin_pool_from_the_guest_disks(
    kernel_disks: list[str], lvm: Lvm, tmp_path: Path
) -> None:
    vg = unique_vg_name("nrmthin")
    spec = entry(vg, kernel_disks[:2],
                 thinPool={"name": "pool0", "sizePercent": 80, "overprovisionRatio": 4})
    with removed_afterwards(lvm, vg):
        result = reconcile(lvm, tmp_path, topology_text(spec))
        assert result.outcome is Outcome.CONVERGED, result.message
        found = lvm.get_vg(vg)
        assert found is not None and found.pv_count == 2
        pool = lvm.get_lv(vg, "pool0")
        assert pool is not None and pool.is_thin_pool
        assert f"{OVERPROVISION_TAG}4" in pool.tags
        assert 0.75 * found.size <= pool.size <= 0.80 * found.size
        (status_vg,) = result.status["volumeGroups"]
        assert status_vg["thinPool"]["name"] == "pool0"
        again = reconcile(lvm, tmp_path, topology_text(spec))
        assert again.outcome is Outcome.CONVERGED
        assert again.plan is not None and again.plan.actions == []


def test_overprovision_ratio_change_converges_on_an_existing_pool(
    kernel_disks: list[str], lvm: Lvm, tmp_path: Path
) -> None:
    """A new ratio is planned (dry run), applied as the ONE tag the CSI driver reads, evented,
    and the status shows what LVM holds."""
    vg = unique_vg_name("nrmratio")
    pool_cfg: dict[str, object] = {"name": "pool0", "sizePercent": 50, "overprovisionRatio": 4}
    with removed_afterwards(lvm, vg):
        assert reconcile(lvm, tmp_path, topology_text(
            entry(vg, kernel_disks[:1], thinPool=pool_cfg))).outcome is Outcome.CONVERGED
        lvm.addtag(vg, "pool0", [f"{OVERPROVISION_TAG}9"])  # a stale second tag
        pool_cfg["overprovisionRatio"] = 2.5
        text = topology_text(entry(vg, kernel_disks[:1], thinPool=pool_cfg))

        dry = reconcile(lvm, tmp_path, text, dry_run=True)
        assert dry.status["plannedActions"] == [
            f"set thin pool {vg}/pool0 overprovision ratio to 2.5 (was 4, 9; tag "
            f"{OVERPROVISION_TAG}2.5)"]
        (status_vg,) = dry.status["volumeGroups"]
        assert status_vg["thinPool"]["overprovisionRatio"] is None  # two tags: ambiguous
        assert status_vg["thinPool"]["overprovisionTags"] == ["4", "9"]
        pool = lvm.get_lv(vg, "pool0")
        assert pool is not None
        assert sorted(t for t in pool.tags if t.startswith(OVERPROVISION_TAG)) == [
            f"{OVERPROVISION_TAG}4", f"{OVERPROVISION_TAG}9"]

        sink = LogSink()
        done = reconcile(lvm, tmp_path, text, sink=sink)
        assert done.outcome is Outcome.CONVERGED, done.message
        pool = lvm.get_lv(vg, "pool0")
        assert pool is not None
        assert [t for t in pool.tags if t.startswith(OVERPROVISION_TAG)] == [
            f"{OVERPROVISION_TAG}2.5"]
        assert [m for r, m, _ in sink.events if r == "ThinPoolSettingsChanged"] == [
            f"thin pool {vg}/pool0: overprovision ratio set to 2.5 (was 4, 9)"]
        (status_vg,) = done.status["volumeGroups"]
        assert status_vg["thinPool"]["overprovisionRatio"] == 2.5
        assert status_vg["thinPool"]["configured"] == {"sizePercent": 50,
                                                       "overprovisionRatio": 2.5}
        assert "overprovisionTags" not in status_vg["thinPool"]
        again = reconcile(lvm, tmp_path, text)
        assert again.plan is not None and again.plan.actions == []


def test_guest_disk_identity_is_the_kernel_s_and_survives_reverification(
    kernel_disks: list[str], tmp_path: Path
) -> None:
    """diskseq and size as the real kernel reports them; a device-mapper map stacked on the
    pinned disk (a holder appearing) does not change the medium's identity."""
    paths = HostPaths()
    dev = resolve(kernel_disks[0], paths)
    name = dev.kname
    with Pins(paths) as pins:
        pinned = pins.pin(dev)
        ident = pinned.identity
        assert ident.diskseq == int(Path(f"/sys/class/block/{name}/diskseq").read_text())
        assert ident.size_sectors == int(Path(f"/sys/class/block/{name}/size").read_text())
        assert ident.backing_file is None
        with dm_linear("nrm-identity", kernel_disks[0]):
            assert pinned.verify(paths) == []


def test_thin_pool_grows_to_its_percent_when_the_volume_group_grows(
    kernel_disks: list[str], lvm: Lvm, tmp_path: Path
) -> None:
    vg = unique_vg_name("nrmgrow")
    pool_cfg = {"name": "pool0", "sizePercent": 50, "overprovisionRatio": 2}
    one = topology_text(entry(vg, kernel_disks[:1], thinPool=pool_cfg))
    two = topology_text(entry(vg, kernel_disks[:2], thinPool=pool_cfg))
    with removed_afterwards(lvm, vg):
        assert reconcile(lvm, tmp_path, one).outcome is Outcome.CONVERGED
        small = lvm.get_lv(vg, "pool0")
        assert small is not None and small.is_thin_pool and small.metadata_size is not None
        lvm.lvcreate(vg, "other", 64 * MiB)  # not the pool: never touched
        lvm.lvcreate(vg, "thin1", 32 * MiB, thin_pool="pool0")

        dry = reconcile(lvm, tmp_path, two, dry_run=True)
        assert dry.status["plannedActions"][-1] == (
            f"extend thin pool {vg}/pool0 from {small.size // MiB} MiB to 50% of the "
            "extended VG")
        unchanged = lvm.get_lv(vg, "pool0")  # a dry run changes nothing
        assert unchanged is not None
        assert (unchanged.size, unchanged.metadata_size) == (small.size, small.metadata_size)

        sink = LogSink()
        grown = reconcile(lvm, tmp_path, two, sink=sink)
        assert grown.outcome is Outcome.CONVERGED, grown.message
        found = lvm.get_vg(vg)
        pool = lvm.get_lv(vg, "pool0")
        assert found is not None and found.pv_count == 2
        assert pool is not None and pool.is_thin_pool
        ext = found.extent_size
        assert pool.size == found.size * 50 // 100 // ext * ext > small.size
        # 1/1000 of the grown data no longer fits the old metadata: it grew too.
        assert pool.metadata_size is not None and pool.metadata_size > small.metadata_size
        assert f"{OVERPROVISION_TAG}2" in pool.tags
        other = lvm.get_lv(vg, "other")
        assert other is not None and other.size == 64 * MiB
        thin1 = lvm.get_lv(vg, "thin1")
        assert thin1 is not None and thin1.pool_lv == "pool0"
        extended = [m for r, m, _ in sink.events if r == "ThinPoolExtended"]
        assert extended == [f"extended thin pool {vg}/pool0 from {small.size // MiB} MiB to "
                            f"{pool.size // MiB} MiB (50% of the VG); metadata from "
                            f"{small.metadata_size // MiB} MiB to "
                            f"{pool.metadata_size // MiB} MiB"]
        (status_vg,) = grown.status["volumeGroups"]
        assert status_vg["thinPool"]["size"] == pool.size
        assert status_vg["thinPool"]["extended"] == extended[0]

        again = reconcile(lvm, tmp_path, two)
        assert again.plan is not None and again.plan.actions == []

        # A larger percent in the config grows the pool without any new disk.
        pool_cfg["sizePercent"] = 70
        more = reconcile(lvm, tmp_path, topology_text(entry(vg, kernel_disks[:2],
                                                             thinPool=pool_cfg)))
        assert more.outcome is Outcome.CONVERGED, more.message
        bigger = lvm.get_lv(vg, "pool0")
        assert bigger is not None and bigger.size == found.size * 70 // 100 // ext * ext


def test_our_own_logical_volume_is_refused_as_a_device_mapper_device(
    kernel_disks: list[str], lvm: Lvm, tmp_path: Path
) -> None:
    vg, other = unique_vg_name("nrmdm"), unique_vg_name("nrmdm")
    with removed_afterwards(lvm, vg):
        lvm.vgcreate(vg, kernel_disks[:1])
        lvm.lvcreate(vg, "data", 16 * MiB)
        lv_path = f"/dev/{vg}/data"
        before = device_fingerprint(lv_path)
        result = reconcile(lvm, tmp_path, topology_text(entry(other, [lv_path])))
        assert reasons_for(result, lv_path) == {Reason.DEVICE_MAPPER}
        assert device_fingerprint(lv_path) == before
        assert lvm.get_vg(other) is None
        # The disk under the VG is held by that LV (and is another VG's PV).
        result = reconcile(lvm, tmp_path, topology_text(entry(other, kernel_disks[:1])))
        assert reasons_for(result, kernel_disks[0]) >= {Reason.HOLDERS, Reason.OTHER_VG}


def test_disk_held_by_a_mapping_is_refused_as_having_holders(
    kernel_disks: list[str], lvm: Lvm, tmp_path: Path
) -> None:
    disk = kernel_disks[1]
    vg = unique_vg_name("nrmhold")
    with dm_linear(f"nrm-hold-{os.getpid()}", disk):
        before = device_fingerprint(disk)
        result = reconcile(lvm, tmp_path, topology_text(entry(vg, [disk])))
        assert reasons_for(result, disk) == {Reason.HOLDERS}
        assert device_fingerprint(disk) == before
        assert lvm.get_vg(vg) is None


def test_multipath_member_is_refused(kernel_disks: list[str], lvm: Lvm, tmp_path: Path) -> None:
    disk = kernel_disks[1]
    vg = unique_vg_name("nrmmp")
    name = f"nrm-mpath-{os.getpid()}"
    with dm_linear(name, disk, uuid=f"mpath-{name}") as mapped:
        result = reconcile(lvm, tmp_path, topology_text(entry(vg, [disk])))
        assert reasons_for(result, disk) == {Reason.MULTIPATH_MEMBER}
        # The multipath map itself is a device-mapper device: refused as well.
        result = reconcile(lvm, tmp_path, topology_text(entry(vg, [mapped])))
        assert reasons_for(result, mapped) == {Reason.DEVICE_MAPPER}
        assert lvm.get_vg(vg) is None


def _partitioned(disk: str) -> str:
    write_gpt(disk)
    run(["blockdev", "--rereadpt", disk], timeout=60)
    part = resolve(disk, HostPaths()).kname
    candidates = [f"/dev/{part}1", f"/dev/{part}p1"]
    found = [c for c in candidates if Path(c).is_block_device()]
    assert found, f"the kernel shows no partition of {disk}"
    return found[0]


def _forget_partitions(disk: str, partitions: Sequence[str]) -> None:
    run(["wipefs", "--all", "--quiet", *partitions], timeout=60)
    run(["wipefs", "--all", "--quiet", disk], timeout=60)
    run(["blockdev", "--rereadpt", disk], timeout=60)


def test_disk_with_partitions_is_refused_but_its_listed_partition_is_used(
    kernel_disks: list[str], lvm: Lvm, tmp_path: Path
) -> None:
    disk = kernel_disks[1]
    part = _partitioned(disk)
    vg = unique_vg_name("nrmpart")
    try:
        with removed_afterwards(lvm, vg):
            result = reconcile(lvm, tmp_path, topology_text(entry(vg, [disk])))
            assert reasons_for(result, disk) == {Reason.PARTITIONS}
            assert lvm.get_vg(vg) is None

            result = reconcile(lvm, tmp_path, topology_text(entry(vg, [part])))
            assert result.outcome is Outcome.CONVERGED, result.message
            assert [pv.name for pv in lvm.pvs() if pv.vg_name == vg] == [part]
    finally:
        _forget_partitions(disk, [part])


def test_whole_disk_under_a_root_partition_is_refused(
    kernel_disks: list[str], lvm: Lvm, tmp_path: Path
) -> None:
    disk = kernel_disks[1]
    part = _partitioned(disk)
    try:
        prdev = os.stat(part).st_rdev
        table = tmp_path / "mountinfo"
        table.write_text(f"1 0 {os.major(prdev)}:{os.minor(prdev)} / / rw - ext4 {part} rw\n")
        checker = SafetyChecker(SafetySettings(mount_tables=(str(table),)))
        host = checker.snapshot(lvm.pvs())
        found = {r.reason for r in checker.check(resolve(disk, HostPaths()), host,
                                                 target_vg="x", claimed_orphan=False)}
        assert {Reason.ROOT_FILESYSTEM, Reason.PARTITIONS} <= found
    finally:
        _forget_partitions(disk, [part])
