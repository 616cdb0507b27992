"""In-use detection without LVM (csi_lvm/inuse.py) and O_EXCL wipes (csi_lvm/blockdev.py), on
loop devices (issue 11, point 3). The DeleteVolume refusal on live LVs is pinned in the guest
(tests/kernel/test_csi_faults_kernel.py)."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from csi_lvm import blockdev, inuse
from csi_lvm.filesystem import make_filesystem
from csi_lvm.mounter import Mounter
from edge_common import devmapper
from edge_common.loopdisk import device_fingerprint
from tests.rigs.loopdisks import LoopDiskFactory

MiB = 1 << 20


def test_a_mounted_device_is_found_by_number_and_a_wipe_is_refused(
    loop_disks: LoopDiskFactory, tmp_path: Path
) -> None:
    (disk,) = loop_disks(1, 64 * MiB)
    make_filesystem("ext4", disk.device, "")
    devno = os.stat(disk.device).st_rdev
    mounter = Mounter(timeout=60)
    target = tmp_path / "mnt"
    target.mkdir()
    assert inuse.device_mounts(devno) == []
    mounter.mount(disk.device, str(target), "ext4", [])
    try:
        (target / "data").write_text("in use")
        assert inuse.device_mounts(devno) == [str(target)]
        before = device_fingerprint(disk.device)
        with pytest.raises(blockdev.DeviceBusy):
            blockdev.zero_range(disk.device, 0, MiB)
        with pytest.raises(blockdev.DeviceBusy):
            blockdev.zero_head_and_tail(disk.device, 64 * MiB)
        assert device_fingerprint(disk.device) == before
    finally:
        mounter.unmount_all(str(target))
    blockdev.zero_range(disk.device, 0, MiB)  # not in use any more: the wipe proceeds


def test_a_bind_mount_of_the_device_node_counts_as_in_use(
    loop_disks: LoopDiskFactory, tmp_path: Path
) -> None:
    # A published raw block volume: the device node bound onto a file, no pod needed.
    (disk,) = loop_disks(1, 16 * MiB)
    devno = os.stat(disk.device).st_rdev
    target = tmp_path / "block"
    target.touch()
    mounter = Mounter(timeout=60)
    mounter.bind(disk.device, str(target), read_only=False)
    try:
        assert inuse.device_mounts(devno) == [str(target)]
    finally:
        mounter.unmount_all(str(target))
    assert inuse.device_mounts(devno) == []


def test_usage_is_described_for_the_caller() -> None:
    usage = inuse.Usage(open_count=2, mounts=("/pods/a",), holders=("dm-7",))
    assert usage.in_use
    assert usage.describe() == "mounted at /pods/a; held by dm-7; open 2 time(s)"
    assert not inuse.Usage().in_use


def test_without_device_mapper_nothing_is_mapped() -> None:
    if devmapper.has_device_mapper():
        pytest.skip("this kernel has device-mapper")
    assert devmapper.dm_info("vg-lv") is None
    assert inuse.volume_usage("vg", "lv") == inuse.Usage()


def test_dm_ioctl_layout_and_names() -> None:
    assert devmapper._DM_STRUCT.size == 312  # sizeof(struct dm_ioctl)
    assert devmapper.dm_name("my-vg", "pvc-1") == "my--vg-pvc--1"
    # huge_encode_dev(makedev(253, 300)): minor low byte | major << 8 | minor high << 12
    encoded = (300 & 0xFF) | (253 << 8) | ((300 & ~0xFF) << 12)
    assert devmapper._decode_dev(encoded) == os.makedev(253, 300)
    assert struct.calcsize("=3IIIIiIIIQ") == 48


def test_a_dm_status_answer_is_decoded_field_by_field() -> None:
    # What the kernel writes back: open_count 2, suspended with a live and an inactive table,
    # on device 253:300 (padding and event_nr set to catch an off-by-one field).
    flags = (1 << 1) | (1 << 5) | (1 << 6)
    dev = (300 & 0xFF) | (253 << 8) | ((300 & ~0xFF) << 12)
    dm_uuid = "LVM-" + "V" * 32 + "abcdefGHIJklmnOPQRstuvWXYZ012345"
    answer = devmapper._DM_STRUCT.pack(4, 47, 0, 312, 312, 1, 2, flags, 77, 99, dev,
                                       b"vg-lv", dm_uuid.encode(), b"")
    info = devmapper.parse_dm_status("vg-lv", answer)
    assert info == devmapper.DmInfo("vg-lv", os.makedev(253, 300), 2, True, True, True,
                                    dm_uuid)
    assert info.lv_uuid == "abcdef-GHIJ-klmn-OPQR-stuv-WXYZ-012345"
    idle = devmapper.parse_dm_status("vg-lv", devmapper._DM_STRUCT.pack(
        4, 47, 0, 312, 312, 1, 0, 1 << 5, 0, 0, dev, b"vg-lv", b"", b""))
    assert (idle.open_count, idle.suspended, idle.live_table, idle.inactive_table) == \
        (0, False, True, False)
