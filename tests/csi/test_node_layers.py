"""The node service's layers on real loop devices: mounts, filesystems, usage figures.

mounter.py (mount, ro mount, bind of a device node onto a file, the mountinfo parser),
filesystem.py (blank detection that never formats data, mkfs ext4/xfs/btrfs, mkfsOptions
checks, online growth) and stats.py (statvfs, BLKGETSIZE64, BLKROGET).
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from csi_lvm import filesystem
from csi_lvm.filesystem import (
    FilesystemError,
    UnsafeMkfsOptions,
    blank_problem,
    grow,
    make_filesystem,
    mkfs_argv,
    parse_mkfs_options,
    probe,
)
from csi_lvm.mounter import (
    InvalidMountOption,
    Mounter,
    MountError,
    canonical_path,
    check_mount_options,
    flags_satisfied,
    parse_mountinfo,
)
from csi_lvm.stats import block_device_read_only, block_device_size, filesystem_usage
from edge_common.commands import run
from edge_common.loopdisk import LoopDisk, device_fingerprint, write_signature
from tests.rigs.loopdisks import LoopDiskFactory

MiB = 1 << 20
XFS_MIN = 320 * MiB  # mkfs.xfs 6.1 refuses filesystems under 300 MB


def has_cap_sys_resource() -> bool:
    """Online ext4 growth (EXT4_IOC_RESIZE_FS) needs CAP_SYS_RESOURCE."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) & (1 << 24))
    return False


@pytest.fixture
def mounter() -> Mounter:
    return Mounter(timeout=60)


@contextmanager
def mounted(mounter: Mounter, device: str, target: Path, fs_type: str,
            *options: str) -> Iterator[Path]:
    target.mkdir(exist_ok=True)
    mounter.mount(device, str(target), fs_type, list(options))
    try:
        yield target
    finally:
        mounter.unmount_all(str(target))


def grow_loop(disk: LoopDisk, new_size: int) -> None:
    """Grow the backing file and tell the loop driver (what lvextend does to an LV)."""
    os.truncate(disk.path, new_size)
    run(["losetup", "--set-capacity", disk.device], timeout=30)
    assert block_device_size(disk.device) == new_size


# ---------------------------------------------------------------------------- mountinfo


def test_mountinfo_parser_reads_escapes_optional_fields_and_super_options() -> None:
    text = (
        "36 35 98:0 /mnt1 /mnt/with\\040space rw,noatime master:1 shared:7 - ext4 /dev/root "
        "rw,errors=continue\n"
        "40 36 0:5 /dm-3 /var/lib/kubelet/x ro,nosuid - devtmpfs udev rw,size=1k\n"
        "41 36 0:39 / /b rw - btrfs /dev/loop0 rw,subvol=/\n"
    )
    first, bind, btrfs = parse_mountinfo(text)
    assert first.mount_point == "/mnt/with space"
    assert first.root == "/mnt1"
    assert (first.major, first.minor) == (98, 0)
    assert first.optional_fields == ("master:1", "shared:7")
    assert first.options == ("rw", "noatime") and not first.read_only
    assert first.super_options == ("rw", "errors=continue")
    assert first.fs_type == "ext4" and first.source == "/dev/root"
    assert bind.read_only and bind.root == "/dm-3" and not bind.super_read_only
    assert btrfs.devno == os.makedev(0, 39)


def test_mountinfo_parser_refuses_a_line_without_the_separator() -> None:
    with pytest.raises(ValueError):
        parse_mountinfo("36 35 98:0 / /mnt rw ext4 /dev/root rw\n")


def test_canonical_path_resolves_the_parent_but_not_the_last_component(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    (real / "leaf").symlink_to("/nonexistent")
    assert canonical_path(tmp_path / "link" / "leaf") == str(real / "leaf")
    assert canonical_path(str(tmp_path / "link" / ".." / "real" / "x")) == str(real / "x")


# ---------------------------------------------------------------------------- mount options


def test_mount_options_are_split_deduplicated_and_kept() -> None:
    assert check_mount_options(["noatime,nodev", "discard", "noatime", " commit=30 "]) == [
        "noatime", "nodev", "discard", "commit=30"]


@pytest.mark.parametrize("option", [
    "bind", "rbind", "remount", "move", "loop", "loop=/dev/loop9", "offset=4096",
    "X-mount.mkdir", "x-systemd.automount", "make-shared", "helper=evil", "defaults",
    "noatime nodev", "-o", "user",
])
def test_mount_options_that_change_the_operation_are_refused(option: str) -> None:
    with pytest.raises(InvalidMountOption):
        check_mount_options([option])


# ---------------------------------------------------------------------------- mounts


def test_mount_and_unmount_ext4_shows_in_mountinfo_by_device_number(
    loop_disks: LoopDiskFactory, mounter: Mounter, tmp_path: Path
) -> None:
    (disk,) = loop_disks(1)
    make_filesystem("ext4", disk.device)
    target = tmp_path / "mnt"
    with mounted(mounter, disk.device, target, "ext4", "noatime"):
        entry = mounter.find(target)
        assert entry is not None
        assert entry.fs_type == "ext4" and entry.root == "/"
        assert entry.devno == os.stat(disk.device).st_rdev
        assert flags_satisfied(entry, ["noatime", "discard"])  # discard is not a mount flag
        assert not flags_satisfied(entry, ["nodev"])
        assert [m.mount_point for m in mounter.filesystem_mounts(disk.device)] == [str(target)]
        assert (target / "lost+found").is_dir()
    assert not mounter.is_mount_point(target)
    assert mounter.filesystem_mounts(disk.device) == []


def test_read_only_mount_refuses_writes(
    loop_disks: LoopDiskFactory, mounter: Mounter, tmp_path: Path
) -> None:
    (disk,) = loop_disks(1)
    make_filesystem("ext4", disk.device)
    with mounted(mounter, disk.device, tmp_path / "ro", "ext4", "ro") as target:
        entry = mounter.find(target)
        assert entry is not None and entry.read_only
        with pytest.raises(OSError) as info:
            (target / "file").write_text("x")
        assert info.value.errno == errno.EROFS


def test_bind_of_a_device_node_onto_a_file_read_only(
    loop_disks: LoopDiskFactory, mounter: Mounter, tmp_path: Path
) -> None:
    (disk,) = loop_disks(1)
    payload = os.urandom(4096)
    fd = os.open(disk.device, os.O_WRONLY)
    try:
        os.pwrite(fd, payload, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    target = tmp_path / "block-target"
    target.touch()
    mounter.bind(disk.device, str(target), read_only=True)
    try:
        assert target.is_block_device()
        assert os.stat(target).st_rdev == os.stat(disk.device).st_rdev
        entry = mounter.find(target)
        assert entry is not None and entry.read_only
        assert [m.mount_point for m in mounter.device_binds(disk.device)] == [str(target)]
        with open(target, "rb") as f:
            assert f.read(4096) == payload
        assert block_device_size(target) == disk.size_bytes
    finally:
        assert mounter.unmount_all(str(target)) == 1
    assert not target.is_block_device()
    assert mounter.device_binds(disk.device) == []


def test_unmount_of_a_path_that_is_not_mounted_is_an_error_and_unmount_all_counts_layers(
    loop_disks: LoopDiskFactory, mounter: Mounter, tmp_path: Path
) -> None:
    target = tmp_path / "plain"
    target.mkdir()
    with pytest.raises(MountError):
        mounter.unmount(str(target))
    assert mounter.unmount_all(str(target)) == 0
    (disk,) = loop_disks(1)
    make_filesystem("ext4", disk.device)
    other = tmp_path / "other"
    other.mkdir()
    mounter.mount(disk.device, str(target), "ext4")
    try:
        mounter.bind(str(other), str(target))  # stacked on top
        assert [m.fs_type for m in mounter.mounts_at(target)][0] == "ext4"
        assert len(mounter.mounts_at(target)) == 2
    finally:
        assert mounter.unmount_all(str(target)) == 2
    assert not mounter.is_mount_point(target)


# ---------------------------------------------------------------------------- blank detection


def test_fresh_loop_device_is_blank(loop_disks: LoopDiskFactory) -> None:
    (disk,) = loop_disks(1)
    assert probe(disk.device).empty
    assert blank_problem(disk.device) is None


@pytest.mark.parametrize("kind", ["ext4", "gpt", "swap"])
def test_a_device_with_a_signature_is_never_formatted(
    loop_disks: LoopDiskFactory, kind: str
) -> None:
    (disk,) = loop_disks(1)
    write_signature(disk.device, kind)  # type: ignore[arg-type]
    before = device_fingerprint(disk.device)
    assert blank_problem(disk.device) is not None
    for fs_type in ("ext4", "xfs"):
        with pytest.raises(FilesystemError, match="refusing to format"):
            make_filesystem(fs_type, disk.device)
    assert device_fingerprint(disk.device) == before


def test_raw_data_without_any_signature_is_never_formatted(loop_disks: LoopDiskFactory) -> None:
    (disk,) = loop_disks(1)
    fd = os.open(disk.device, os.O_WRONLY)
    try:
        os.pwrite(fd, b"database page 0 " * 64, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    assert probe(disk.device).empty  # blkid sees nothing...
    before = device_fingerprint(disk.device)
    problem = blank_problem(disk.device)
    assert problem is not None and "not zero" in problem  # ...but the data is there
    with pytest.raises(FilesystemError):
        make_filesystem("ext4", disk.device)
    assert device_fingerprint(disk.device) == before


def test_existing_ext4_keeps_its_files_when_formatting_is_asked_again(
    loop_disks: LoopDiskFactory, mounter: Mounter, tmp_path: Path
) -> None:
    (disk,) = loop_disks(1)
    make_filesystem("ext4", disk.device, "-L keepme")
    assert probe(disk.device).fs_type == "ext4"
    with mounted(mounter, disk.device, tmp_path / "m", "ext4") as target:
        (target / "precious").write_text("tenant data")
    with pytest.raises(FilesystemError, match="holds ext4"):
        make_filesystem("ext4", disk.device)
    with mounted(mounter, disk.device, tmp_path / "m", "ext4") as target:
        assert (target / "precious").read_text() == "tenant data"
    assert probe(disk.device).values.get("LABEL") == "keepme"


# ---------------------------------------------------------------------------- mkfs options


@pytest.mark.parametrize(("fs_type", "text", "words"), [
    ("ext4", "-E lazy_itable_init=0 -m 1", ["-E", "lazy_itable_init=0", "-m", "1"]),
    ("ext4", "-b4096 -qj -L 'my data'", ["-b4096", "-qj", "-L", "my data"]),
    ("ext4", "-O ^has_journal -t ext4", ["-O", "^has_journal", "-t", "ext4"]),
    ("xfs", "-m crc=1,reflink=1 -i size=512", ["-m", "crc=1,reflink=1", "-i", "size=512"]),
    ("xfs", "-d su=64k,sw=4 -K", ["-d", "su=64k,sw=4", "-K"]),
    ("btrfs", "--csum xxhash --label=x -m single", ["--csum", "xxhash", "--label=x", "-m",
                                                    "single"]),
    ("ext4", "", []),
])
def test_allowed_mkfs_options_pass_through_as_argv_words(
    fs_type: str, text: str, words: list[str]
) -> None:
    assert parse_mkfs_options(fs_type, text) == words
    assert mkfs_argv(fs_type, "/dev/x", text)[-2:] == ["--", "/dev/x"]


@pytest.mark.parametrize(("fs_type", "text"), [
    ("ext4", "/dev/sdb"),  # a second device
    ("ext4", "-L x /dev/sdb"),
    ("ext4", "-- -L x"),
    ("ext4", "-L x 1000"),  # a size
    ("ext4", "-F"),  # force
    ("ext4", "-qF"),  # force hidden in a group
    ("ext4", "-n"),  # dry run: nothing would be created
    ("ext4", "-S"),  # superblock only
    ("ext4", "-J device=UUID=1234"),  # external journal
    ("ext4", "-O journal_dev"),
    ("ext4", "-E offset=4096"),
    ("ext4", "-d rootfs"),  # populate from a host directory
    ("ext4", "-z undo"),  # undo file on the host
    ("ext4", "-t ext2"),
    ("ext4", "-l badblocks.txt"),
    ("ext4", "-L"),  # missing value
    ("ext4", "-L 'unbalanced"),
    ("ext4", "$(reboot)"),
    ("ext4", "-L x; reboot"),
    ("xfs", "-f"),
    ("xfs", "-N"),
    ("xfs", "-d name=other"),
    ("xfs", "-d file,size=1g"),
    ("xfs", "-l logdev=sdc,size=10m"),
    ("xfs", "-p protofile"),
    ("xfs", "-c options=cfg"),
    ("btrfs", "-f"),
    ("btrfs", "--rootdir=x"),
    ("btrfs", "-r x"),
    ("btrfs", "-L x other-device"),
    ("nilfs2", "-q"),
])
def test_mkfs_options_that_could_reach_beyond_the_device_are_refused(
    fs_type: str, text: str
) -> None:
    with pytest.raises(UnsafeMkfsOptions):
        parse_mkfs_options(fs_type, text)


def test_mkfs_options_injection_leaves_another_device_untouched(
    loop_disks: LoopDiskFactory,
) -> None:
    mine, other = loop_disks(2)
    write_signature(other.device, "ext4")
    before = device_fingerprint(other.device)
    for text in (other.device, f"-J device={other.device}", f"-L x -- {other.device}"):
        with pytest.raises(UnsafeMkfsOptions):
            make_filesystem("ext4", mine.device, text)
    assert device_fingerprint(other.device) == before
    assert blank_problem(mine.device) is None  # nothing was written to ours either


def test_mkfs_options_reach_mkfs(loop_disks: LoopDiskFactory) -> None:
    (disk,) = loop_disks(1)
    make_filesystem("ext4", disk.device, "-L csi-vol -b 1024")
    found = probe(disk.device)
    assert found.fs_type == "ext4"
    assert found.values["LABEL"] == "csi-vol"
    assert found.values["BLOCK_SIZE"] == "1024"


# ---------------------------------------------------------------------------- growth


def test_xfs_grows_online_while_mounted(
    loop_disks: LoopDiskFactory, mounter: Mounter, tmp_path: Path
) -> None:
    (disk,) = loop_disks(1, XFS_MIN)
    make_filesystem("xfs", disk.device)
    assert probe(disk.device).fs_type == "xfs"
    with mounted(mounter, disk.device, tmp_path / "x", "xfs") as target:
        (target / "data").write_bytes(b"x" * 65536)
        before = filesystem_usage(target).total_bytes
        grow_loop(disk, XFS_MIN + 128 * MiB)
        grow("xfs", disk.device, str(target))
        after = filesystem_usage(target).total_bytes
        assert after - before >= 120 * MiB
        assert (target / "data").read_bytes() == b"x" * 65536
        grow("xfs", disk.device, str(target))  # nothing to do: still fine
        assert filesystem_usage(target).total_bytes == after


@pytest.mark.skipif(not has_cap_sys_resource(),
                    reason="online ext4 resize needs CAP_SYS_RESOURCE (the guest suite has it)")
def test_ext4_grows_online_while_mounted(
    loop_disks: LoopDiskFactory, mounter: Mounter, tmp_path: Path
) -> None:
    (disk,) = loop_disks(1)
    make_filesystem("ext4", disk.device)
    with mounted(mounter, disk.device, tmp_path / "e", "ext4") as target:
        before = filesystem_usage(target).total_bytes
        grow_loop(disk, 128 * MiB)
        grow("ext4", disk.device, str(target))
        assert filesystem_usage(target).total_bytes - before >= 56 * MiB


def test_ext4_grows_to_fill_its_device(
    loop_disks: LoopDiskFactory, mounter: Mounter, tmp_path: Path
) -> None:
    (disk,) = loop_disks(1)
    make_filesystem("ext4", disk.device)
    with mounted(mounter, disk.device, tmp_path / "e", "ext4") as target:
        (target / "kept").write_text("still here")
        before = filesystem_usage(target).total_bytes
    grow_loop(disk, 128 * MiB)
    grow("ext4", disk.device, None)  # unmounted: resize2fs works offline too
    with mounted(mounter, disk.device, tmp_path / "e", "ext4") as target:
        assert filesystem_usage(target).total_bytes - before >= 56 * MiB
        assert (target / "kept").read_text() == "still here"


@pytest.mark.skipif(shutil.which("mkfs.btrfs") is None, reason="btrfs-progs not installed")
def test_btrfs_is_created_and_grows_online(
    loop_disks: LoopDiskFactory, mounter: Mounter, tmp_path: Path
) -> None:
    (disk,) = loop_disks(1, 256 * MiB)
    make_filesystem("btrfs", disk.device)
    assert probe(disk.device).fs_type == "btrfs"
    with mounted(mounter, disk.device, tmp_path / "b", "btrfs") as target:
        entry = mounter.find(target)
        assert entry is not None
        # btrfs reports an anonymous device number: the mount is found by its source.
        assert [m.mount_point for m in mounter.filesystem_mounts(disk.device)] == [str(target)]
        before = filesystem_usage(target).total_bytes
        grow_loop(disk, 384 * MiB)
        grow("btrfs", disk.device, str(target))
        assert filesystem_usage(target).total_bytes - before >= 120 * MiB


def test_growing_xfs_or_btrfs_needs_a_mount_point() -> None:
    for fs_type in ("xfs", "btrfs"):
        with pytest.raises(FilesystemError, match="mounted"):
            grow(fs_type, "/dev/null", None)
    with pytest.raises(FilesystemError):
        grow("vfat", "/dev/null", "/mnt")


# ---------------------------------------------------------------------------- stats


def test_filesystem_usage_counts_bytes_and_inodes(
    loop_disks: LoopDiskFactory, mounter: Mounter, tmp_path: Path
) -> None:
    (disk,) = loop_disks(1)
    make_filesystem("ext4", disk.device)
    with mounted(mounter, disk.device, tmp_path / "s", "ext4") as target:
        empty = filesystem_usage(target)
        assert 0 < empty.total_bytes <= disk.size_bytes
        assert empty.available_bytes <= empty.total_bytes - empty.used_bytes
        assert empty.total_inodes > 0 and empty.used_inodes > 0
        with open(target / "big", "wb") as f:
            f.write(os.urandom(8 * MiB))
            f.flush()
            os.fsync(f.fileno())
        for i in range(10):
            (target / f"small{i}").write_text("x")
        os.sync()
        full = filesystem_usage(target)
        assert full.total_bytes == empty.total_bytes
        assert full.used_bytes - empty.used_bytes >= 8 * MiB
        assert full.used_inodes - empty.used_inodes == 11
        assert full.free_inodes == full.total_inodes - full.used_inodes


def test_block_device_size_and_read_only_flag(loop_disks: LoopDiskFactory,
                                              tmp_path: Path) -> None:
    (disk,) = loop_disks(1, 48 * MiB)
    assert block_device_size(disk.device) == 48 * MiB
    assert block_device_read_only(disk.device) is False
    plain = tmp_path / "file"
    plain.write_bytes(b"x" * 4096)
    with pytest.raises(OSError):
        block_device_size(plain)
    ro_loop = run(["losetup", "--find", "--show", "--read-only", str(disk.path)],
                  timeout=30).stdout_text.strip()
    try:
        assert block_device_read_only(ro_loop) is True
    finally:
        run(["losetup", "--detach", ro_loop], timeout=30)


def test_a_missing_or_non_block_device_is_an_error_never_blank(tmp_path: Path) -> None:
    plain = tmp_path / "plain-file"
    plain.write_bytes(bytes(8192))
    for path in (tmp_path / "does-not-exist", plain):
        with pytest.raises(FilesystemError):
            filesystem.probe(str(path))
        with pytest.raises(FilesystemError):
            blank_problem(str(path))
        with pytest.raises(FilesystemError):
            make_filesystem("ext4", str(path))
    assert plain.read_bytes() == bytes(8192)
