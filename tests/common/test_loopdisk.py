"""edge_common.loopdisk: real loop devices, cleaned up on every path."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from edge_common import loopdisk
from edge_common.commands import CommandError, run
from edge_common.loopdisk import (
    LoopDisk,
    LoopDiskError,
    MiB,
    attached_under,
    backing_file_of,
    device_fingerprint,
    loop_disks,
    write_signature,
)


def blkid_type(device: str) -> str:
    result = run(["blkid", "-p", "-o", "export", device], timeout=30, check=False)
    return result.stdout_text


def test_loop_disk_is_a_sparse_file_attached_as_a_block_device(tmp_path: Path) -> None:
    with LoopDisk(tmp_path, 64 * MiB) as disk:
        assert disk.device.startswith("/dev/loop")
        assert backing_file_of(disk.device) == str(disk.path)
        assert os.path.getsize(disk.path) == 64 * MiB
        assert os.stat(disk.path).st_blocks * 512 < 64 * MiB  # sparse
        assert disk.devno == os.stat(disk.device).st_rdev
        with open(disk.device, "rb") as dev:
            assert dev.seek(0, os.SEEK_END) == 64 * MiB
        device = disk.device
    assert not disk.attached
    assert backing_file_of(device) != str(disk.path)
    assert not disk.path.exists()
    assert attached_under(tmp_path) == []


def test_loop_disks_are_detached_and_deleted_when_the_body_raises(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with loop_disks(3, 16 * MiB, tmp_path) as disks:
            assert len(attached_under(tmp_path)) == 3
            raise RuntimeError("boom")
    assert attached_under(tmp_path) == []
    assert [p for p in tmp_path.iterdir()] == []
    assert len({d.path for d in disks}) == 3


def test_loop_disks_detach_the_first_ones_when_a_later_attach_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    real_run = loopdisk.run

    def second_losetup_fails(argv, **kw):  # type: ignore[no-untyped-def]
        if argv[:2] == ["losetup", "--find"]:
            calls.append(argv)
            if len(calls) == 2:
                # A real failing losetup: attaching a file that does not exist.
                return real_run(["losetup", "--find", "--show", str(tmp_path / "nope")], **kw)
        return real_run(argv, **kw)

    monkeypatch.setattr(loopdisk, "run", second_losetup_fails)
    with pytest.raises(CommandError):
        with loop_disks(3, 16 * MiB, tmp_path):
            pytest.fail("the body must not run")
    assert len(calls) == 2
    assert attached_under(tmp_path) == []
    assert list(tmp_path.iterdir()) == []


def test_detach_leaves_alone_a_loop_device_now_pointing_at_another_file(tmp_path: Path) -> None:
    disk = LoopDisk(tmp_path, 16 * MiB)
    device = disk.attach()
    run(["losetup", "--detach", device], timeout=30)  # someone else detached it ...
    other = tmp_path / "other"
    other.write_bytes(bytes(MiB))
    other_dev = run(["losetup", "--find", "--show", str(other)], timeout=30).stdout_text.strip()
    try:
        disk.detach()  # ... and the number may now be reused: it must not be touched
        assert backing_file_of(other_dev) == str(other)
        assert not disk.path.exists()
    finally:
        run(["losetup", "--detach", other_dev], timeout=30)


def test_detaching_a_busy_device_raises_and_still_deletes_the_file(tmp_path: Path) -> None:
    disk = LoopDisk(tmp_path, 32 * MiB)
    disk.attach()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    write_signature(disk.device, "ext4")
    run(["mount", disk.device, str(mnt)], timeout=30)
    device = disk.device
    try:
        with pytest.raises(LoopDiskError, match="busy"):
            disk.detach(settle=0.2)
    finally:
        run(["umount", str(mnt)], timeout=30)
    assert not disk.path.exists()
    # The kernel detaches it lazily once unmounted (autoclear): nothing stays behind.
    for _ in range(100):
        if backing_file_of(device) != str(disk.path):
            break
        subprocess.run(["sleep", "0.05"], check=True)
    assert attached_under(tmp_path) == []


def test_sizes_that_are_not_whole_sectors_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        LoopDisk(tmp_path, 1000)
    with pytest.raises(ValueError):
        LoopDisk(tmp_path, 0)


def test_fingerprint_sees_head_and_tail_changes_but_not_the_middle(tmp_path: Path) -> None:
    with LoopDisk(tmp_path, 8 * MiB) as disk:
        first = device_fingerprint(disk.device)
        assert first == device_fingerprint(disk.device)
        assert first == device_fingerprint(disk.path)  # same bytes through the file
        fd = os.open(disk.device, os.O_WRONLY)
        try:
            os.pwrite(fd, b"middle", 4 * MiB)
            os.fsync(fd)
            assert device_fingerprint(disk.device) == first
            os.pwrite(fd, b"x", 8 * MiB - 1)  # last byte
            os.fsync(fd)
            tail_changed = device_fingerprint(disk.device)
            assert tail_changed != first
            os.pwrite(fd, b"x", 0)  # first byte
            os.fsync(fd)
            assert device_fingerprint(disk.device) not in (first, tail_changed)
        finally:
            os.close(fd)


def test_fingerprint_depends_on_the_size(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(bytes(3 * MiB))
    b.write_bytes(bytes(4 * MiB))
    assert device_fingerprint(a) != device_fingerprint(b)


@pytest.mark.parametrize(
    ("kind", "expected"), [("ext4", "TYPE=ext4"), ("gpt", "PTTYPE=gpt"), ("swap", "TYPE=swap")]
)
def test_write_signature_is_detected_by_blkid(tmp_path: Path, kind: str, expected: str) -> None:
    with LoopDisk(tmp_path, 32 * MiB) as disk:
        assert blkid_type(disk.device) == ""  # a fresh disk is blank
        write_signature(disk.device, kind)  # type: ignore[arg-type]
        assert expected in blkid_type(disk.device)


def test_gpt_is_also_seen_by_wipefs_with_both_headers(tmp_path: Path) -> None:
    with LoopDisk(tmp_path, 32 * MiB) as disk:
        write_signature(disk.device, "gpt")
        out = run(["wipefs", "--no-act", disk.device], timeout=30).stdout_text
        assert out.count("gpt") == 2 and "PMBR" in out


def test_attached_under_lists_only_devices_below_the_directory(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "ab").mkdir()
    with LoopDisk(tmp_path / "a", MiB) as a, LoopDisk(tmp_path / "ab", MiB) as ab:
        assert [lp.device for lp in attached_under(tmp_path / "a")] == [a.device]
        assert {lp.device for lp in attached_under(tmp_path)} == {a.device, ab.device}


def test_a_deleted_backing_file_is_still_reported_as_ours(tmp_path: Path) -> None:
    disk = LoopDisk(tmp_path, MiB)
    disk.attach()
    try:
        disk.path.unlink()
        (loop,) = attached_under(tmp_path)
        assert loop.deleted and loop.backing_file == str(disk.path)
    finally:
        disk.detach()
    assert attached_under(tmp_path) == []
