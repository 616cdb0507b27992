"""Usage figures for NodeGetVolumeStats: statvfs for filesystems, BLKGETSIZE64 for devices."""

from __future__ import annotations

import fcntl
import os
import stat
import struct
from dataclasses import dataclass

BLKGETSIZE64 = 0x80081272  # _IOR(0x12, 114, size_t)
BLKROGET = 0x125E  # _IO(0x12, 94)


@dataclass(frozen=True)
class FilesystemUsage:
    total_bytes: int
    available_bytes: int  # for unprivileged users (f_bavail)
    used_bytes: int
    total_inodes: int  # 0 when the filesystem has no fixed inode count (btrfs)
    free_inodes: int
    used_inodes: int


def filesystem_usage(path: str | os.PathLike[str]) -> FilesystemUsage:
    """statvfs of the filesystem mounted at (or containing) path."""
    st = os.statvfs(path)
    unit = st.f_frsize or st.f_bsize
    total = st.f_blocks * unit
    used = max(0, (st.f_blocks - st.f_bfree) * unit)
    available = max(0, st.f_bavail * unit)
    total_inodes = max(0, st.f_files)
    free_inodes = max(0, min(st.f_ffree, total_inodes))
    return FilesystemUsage(total, available, used, total_inodes, free_inodes,
                           total_inodes - free_inodes)


def block_device_size(path: str | os.PathLike[str]) -> int:
    """Size in bytes of the block device at path (a device node, or a file it is bound onto)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if not stat.S_ISBLK(os.fstat(fd).st_mode):
            raise OSError(f"{os.fspath(path)} is not a block device")
        buf = fcntl.ioctl(fd, BLKGETSIZE64, bytes(8))
        return int(struct.unpack("Q", buf)[0])
    finally:
        os.close(fd)


def block_device_read_only(path: str | os.PathLike[str]) -> bool:
    """The kernel's read-only flag of a block device (BLKROGET)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        buf = fcntl.ioctl(fd, BLKROGET, bytes(4))
        return bool(struct.unpack("i", buf)[0])
    finally:
        os.close(fd)
