"""Smoke tests of the real-kernel environment: device-mapper works, LVs activate and mount.

These prove the guest (or a host with device-mapper) is fit for the lifecycle tests; they go
through the project's own LVM layer (edge_common.lvm) on the disks of ``kernel_disks``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from edge_common.commands import run
from edge_common.devmapper import has_device_mapper
from edge_common.lvm import Lvm
from tests.rigs.lvm import unique_vg_name

pytestmark = pytest.mark.kernel

MiB = 1 << 20


@contextmanager
def mounted(device: str, mountpoint: Path, *options: str) -> Iterator[Path]:
    mountpoint.mkdir(parents=True, exist_ok=True)
    argv = ["mount"]
    if options:
        argv += ["-o", ",".join(options)]
    run([*argv, device, str(mountpoint)], timeout=60)
    try:
        yield mountpoint
    finally:
        run(["umount", str(mountpoint)], timeout=60)


def dm_table(device: str) -> str:
    """The device-mapper table of an active LV (its target types say what the kernel runs)."""
    return run(["dmsetup", "table", os.path.realpath(device)], timeout=60).stdout_text


def test_kernel_has_device_mapper_and_the_guest_disks_are_block_devices(
    kernel_disks: list[str],
) -> None:
    assert has_device_mapper()
    assert Path("/dev/mapper/control").is_char_device()
    assert len(kernel_disks) >= 2
    for disk in kernel_disks:
        assert Path(disk).is_block_device(), disk


def test_linear_lv_activates_takes_ext4_and_keeps_data_across_remount(
    kernel_disks: list[str], lvm: Lvm, tmp_path: Path
) -> None:
    vg = unique_vg_name("smoke")
    lvm.vgcreate(vg, kernel_disks[:2])
    try:
        lvm.lvcreate(vg, "linear", 64 * MiB)
        lv = lvm.get_lv(vg, "linear")
        assert lv is not None and lv.is_active
        assert Path(lv.path).is_block_device()
        assert dm_table(lv.path).split()[2] == "linear"

        run(["mkfs.ext4", "-q", lv.path], timeout=120)
        payload = os.urandom(256 * 1024)
        with mounted(lv.path, tmp_path / "mnt") as mnt:
            (mnt / "data.bin").write_bytes(payload)
        with mounted(lv.path, tmp_path / "mnt", "ro") as mnt:
            assert (mnt / "data.bin").read_bytes() == payload
        lvm.lvremove(vg, "linear")
        assert not Path(lv.path).exists()
    finally:
        lvm.command("vgremove", "--yes", "--force", "--", vg)


def test_thin_pool_volume_and_snapshots_carry_the_origin_data(
    kernel_disks: list[str], lvm: Lvm, tmp_path: Path
) -> None:
    vg = unique_vg_name("thin")
    lvm.vgcreate(vg, kernel_disks[:2])
    try:
        lvm.create_thin_pool(vg, "pool", 256 * MiB)
        lvm.lvcreate(vg, "thin", 1024 * MiB, thin_pool="pool")
        thin = lvm.get_lv(vg, "thin")
        assert thin is not None and thin.is_thin and thin.is_active
        assert dm_table(thin.path).split()[2] == "thin"

        run(["mkfs.ext4", "-q", thin.path], timeout=120)
        with mounted(thin.path, tmp_path / "origin") as mnt:
            (mnt / "hello.txt").write_text("before snapshot\n")

        # Thin snapshot: skips activation by default, so activate it explicitly.
        lvm.create_snapshot(vg, "thin", "thinsnap")
        lvm.activate(vg, "thinsnap", ignore_skip=True)
        snap = lvm.get_lv(vg, "thinsnap")
        assert snap is not None and snap.is_snapshot and snap.origin == "thin"

        # Thick copy-on-write snapshot of a linear LV: dm-snapshot.
        lvm.lvcreate(vg, "thick", 64 * MiB)
        thick = lvm.get_lv(vg, "thick")
        assert thick is not None
        run(["mkfs.ext4", "-q", thick.path], timeout=120)
        with mounted(thick.path, tmp_path / "thick") as mnt:
            (mnt / "hello.txt").write_text("thick origin\n")
        lvm.create_snapshot(vg, "thick", "cow", size_bytes=32 * MiB)
        cow = lvm.get_lv(vg, "cow")
        assert cow is not None and cow.is_snapshot and cow.is_active
        assert dm_table(cow.path).split()[2] == "snapshot"

        with mounted(thin.path, tmp_path / "origin") as mnt:
            (mnt / "hello.txt").write_text("changed after snapshot\n")
        # An ext4 snapshot taken while unmounted is clean; noload skips the journal anyway.
        with mounted(snap.path, tmp_path / "snap", "ro", "noload") as mnt:
            assert (mnt / "hello.txt").read_text() == "before snapshot\n"
        with mounted(cow.path, tmp_path / "cow", "ro", "noload") as mnt:
            assert (mnt / "hello.txt").read_text() == "thick origin\n"
    finally:
        lvm.command("vgremove", "--yes", "--force", "--", vg)


def test_scrub_removes_mounts_mappings_vgs_and_partitions_left_on_the_disks(
    kernel_disks: list[str], lvm: Lvm, tmp_path: Path
) -> None:
    from tests.kernel.conftest import scrub_disks

    first, second = kernel_disks[:2]
    vg = unique_vg_name("left")
    lvm.vgcreate(vg, [first])
    lvm.lvcreate(vg, "lv", 16 * MiB)
    run(["mkfs.ext4", "-q", f"/dev/{vg}/lv"], timeout=120)
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    run(["mount", f"/dev/{vg}/lv", str(mountpoint)], timeout=60)
    sectors = 32 * MiB // 512
    name = f"{vg}-raw"
    run(["dmsetup", "create", name, "--table", f"0 {sectors} linear {second} 0"], timeout=60)

    found = scrub_disks(lvm, kernel_disks)

    assert f"mount {mountpoint}" in found
    assert f"VG {vg}" in found
    assert f"device-mapper {name}" in found
    assert not os.path.ismount(mountpoint)
    assert lvm.get_vg(vg) is None
    assert not Path(f"/dev/mapper/{name}").exists()
    for disk in kernel_disks:
        assert run(["wipefs", "--no-act", disk], timeout=60).stdout_text.strip() == ""
        assert not list(Path("/sys/class/block", Path(disk).name, "holders").iterdir())
    assert scrub_disks(lvm, kernel_disks) == []
