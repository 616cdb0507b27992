"""Each safety check on real devices of this test: the refusal and its reason.

(Partitions need a kernel with partition table support, holders, device-mapper devices and
multipath members need device-mapper: they are pinned by tests/kernel/test_nrm_kernel.py in the
real-kernel suite.)
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_common.commands import run
from edge_common.loopdisk import write_gpt, write_signature
from edge_common.lvm import Lvm
from node_resource_manager.devices import BlockDevice, HostPaths, ResolveError, resolve
from node_resource_manager.mounts import parse_mountinfo, unescape
from node_resource_manager.safety import Reason, Refusal, SafetyChecker
from tests.nrm.conftest import NrmRig
from tests.rigs.lvm import VgFactory

PATHS = HostPaths()


def check(rig: NrmRig, device: str, *, vg: str = "target", claimed: bool = False,
          lvm: Lvm | None = None, **settings: object) -> list[Refusal]:
    checker = SafetyChecker(rig.safety_settings(**settings))
    host = checker.snapshot((lvm or rig.lvm).pvs())
    dev = resolve(device, rig.paths())
    return checker.check(dev, host, target_vg=vg, claimed_orphan=claimed)


def reasons(refusals: list[Refusal]) -> list[Reason]:
    return [r.reason for r in refusals]


@contextlib.contextmanager
def manual_loop(tmp: Path, *flags: str, size: int = 64 << 20) -> Iterator[str]:
    """A loop device attached with extra losetup flags (e.g. -r), detached afterwards."""
    backing = tmp / f"manual-{len(list(tmp.glob('manual-*')))}.img"
    with open(backing, "wb") as fh:
        fh.truncate(size)
    dev = run(["losetup", "--find", "--show", *flags, str(backing)], timeout=30).stdout_text
    dev = dev.strip()
    try:
        yield dev
    finally:
        run(["losetup", "--detach", dev], timeout=30)
        backing.unlink()


def test_blank_disk_passes_every_check(nrm: NrmRig) -> None:
    (disk,) = nrm.disks(1)
    assert check(nrm, disk.device) == []


def test_ext4_filesystem_is_refused_by_probe(nrm: NrmRig) -> None:
    (disk,) = nrm.disks(1)
    write_signature(disk.device, "ext4")
    refusals = check(nrm, disk.device)
    assert reasons(refusals) == [Reason.SIGNATURE]
    assert "ext4 (filesystem)" in refusals[0].message


def test_gpt_partition_table_is_refused_by_probe(nrm: NrmRig) -> None:
    (disk,) = nrm.disks(1)
    write_gpt(disk.device)
    refusals = check(nrm, disk.device)
    assert reasons(refusals) == [Reason.SIGNATURE]
    assert "gpt" in refusals[0].message


def test_swap_signature_is_refused(nrm: NrmRig) -> None:
    (disk,) = nrm.disks(1)
    write_signature(disk.device, "swap")
    refusals = check(nrm, disk.device)
    assert reasons(refusals) == [Reason.SIGNATURE]
    assert "swap" in refusals[0].message


def test_mounted_filesystem_is_refused_as_mounted(nrm: NrmRig) -> None:
    (disk,) = nrm.disks(1)
    write_signature(disk.device, "ext4")
    target = nrm.mount(disk.device)
    refusals = check(nrm, disk.device)
    assert reasons(refusals) == [Reason.MOUNTED]
    assert target in refusals[0].message


def test_bind_mounted_raw_block_volume_without_signature_is_refused_as_mounted(
    nrm: NrmRig,
) -> None:
    """A raw block volume handed to a pod carries no signature at all; its bind mount gives
    it away."""
    (disk,) = nrm.disks(1)
    target = nrm.bind_device(disk.device)
    refusals = check(nrm, disk.device)
    assert Reason.MOUNTED in reasons(refusals)
    assert target in refusals[0].message


def test_mount_in_the_configured_host_table_is_refused(nrm: NrmRig) -> None:
    """Only the configured table (standing in for the host's /proc/1/mountinfo) knows."""
    (disk,) = nrm.disks(1)
    mm = f"{os.major(disk.devno)}:{os.minor(disk.devno)}"
    nrm.extra_mountinfo.write_text(
        f"900 1 {mm} / /var/lib/kubelet/pods/x/volumes/data rw,relatime - xfs "
        f"/dev/some-other-name rw\n"
    )
    refusals = check(nrm, disk.device)
    assert reasons(refusals) == [Reason.MOUNTED]
    assert "/var/lib/kubelet/pods/x/volumes/data" in refusals[0].message
    # Without that table the same device passes: the table is what was read.
    assert check(nrm, disk.device, mount_tables=("/proc/self/mountinfo",)) == []


def test_device_backing_the_root_filesystem_is_refused(nrm: NrmRig) -> None:
    (disk,) = nrm.disks(1)
    mm = f"{os.major(disk.devno)}:{os.minor(disk.devno)}"
    nrm.extra_mountinfo.write_text(f"1 0 {mm} / / rw - ext4 /dev/root rw\n")
    assert Reason.ROOT_FILESYSTEM in reasons(check(nrm, disk.device))


def test_read_only_device_is_refused(nrm: NrmRig) -> None:
    with manual_loop(nrm.tmp, "-r") as dev:
        assert reasons(check(nrm, dev)) == [Reason.READ_ONLY]


def test_physical_volume_of_another_vg_is_refused(vg_factory: VgFactory, nrm: NrmRig) -> None:
    other = vg_factory(pvs=1)
    refusals = check(nrm, other.devices[0], vg="mine")
    assert reasons(refusals) == [Reason.OTHER_VG]
    assert repr(other.name) in refusals[0].message


def test_orphan_pv_is_refused_unless_our_journal_claims_it(nrm: NrmRig) -> None:
    (disk,) = nrm.disks(1)
    nrm.lvm.pvcreate([disk.device])
    assert reasons(check(nrm, disk.device)) == [Reason.UNCLAIMED_PV]
    assert check(nrm, disk.device, claimed=True) == []


def test_device_held_open_exclusively_is_refused_as_in_use(nrm: NrmRig) -> None:
    (disk,) = nrm.disks(1)
    fd = os.open(disk.device, os.O_RDONLY | os.O_EXCL)
    try:
        assert reasons(check(nrm, disk.device)) == [Reason.IN_USE]
    finally:
        os.close(fd)
    assert check(nrm, disk.device) == []


def test_empty_loop_device_is_refused_as_zero_size(nrm: NrmRig) -> None:
    with manual_loop(nrm.tmp, size=0) as dev:
        assert Reason.EMPTY in reasons(check(nrm, dev))


@pytest.mark.skipif(shutil.which("swapon") is None, reason="swapon not installed")
def test_active_swap_is_refused(nrm: NrmRig) -> None:
    (disk,) = nrm.disks(1)
    write_signature(disk.device, "swap")
    run(["swapon", disk.device], timeout=30)
    try:
        assert Reason.SWAP in reasons(check(nrm, disk.device))
    finally:
        run(["swapoff", disk.device], timeout=60)


def test_link_is_resolved_to_the_device_number(nrm: NrmRig) -> None:
    (disk,) = nrm.disks(1)
    link = nrm.link("wwn-0xtest", disk.device)
    dev = resolve(link, nrm.paths())
    assert dev == BlockDevice(listed=link, rdev=disk.devno, kname=disk.device[5:],
                              path=disk.device)
    assert dev.describe() == f"{link} -> {disk.device}"


def test_missing_path_regular_file_and_dangling_link_do_not_resolve(nrm: NrmRig) -> None:
    with pytest.raises(ResolveError, match="does not exist") as info:
        resolve(str(nrm.tmp / "nope"), PATHS)
    assert info.value.missing
    regular = nrm.tmp / "file"
    regular.write_bytes(b"x")
    with pytest.raises(ResolveError, match="is not a block device \\(a regular file\\)") as info:
        resolve(str(regular), PATHS)
    assert not info.value.missing
    dangling = nrm.link("gone", str(nrm.tmp / "nothing"))
    with pytest.raises(ResolveError, match="dangling link"):
        resolve(dangling, nrm.paths())


def test_mountinfo_parsing_handles_escapes_and_optional_fields() -> None:
    text = ("36 35 98:0 /mnt1 /mnt/with\\040space rw,noatime master:1 shared:2 - ext3 "
            "/dev/root rw,errors=continue\n")
    (entry,) = parse_mountinfo(text)
    assert entry.rdev == os.makedev(98, 0)
    assert entry.mount_point == "/mnt/with space"
    assert entry.fstype == "ext3"
    assert entry.source == "/dev/root"
    assert unescape("a\\134b") == "a\\b"
