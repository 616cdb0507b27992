"""Is a volume in use? Decided without any LVM process, so DeleteVolume can stay one lvremove.

In use means any of:
- its mapped device has openers (DM_DEV_STATUS open count): a pod doing raw I/O, a mounted
  filesystem, any process holding it;
- its filesystem is mounted, matched by device number, in this mount namespace and in the
  host's (/proc/1, the DaemonSet runs with hostPID);
- its device node is bind-mounted onto a file (a published raw block volume, even while no
  pod has it open) - the stale path would later reach whatever LV reuses the minor number;
- another device is stacked on it (sysfs holders: dm-crypt, md, ...).
An LV that is not mapped (inactive) cannot be in use. A kernel that does not answer is an
error (unknown), never "not in use".
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from csi_lvm.mounter import parse_mountinfo
from edge_common.devmapper import dm_info, dm_name

SELF_MOUNTINFO = Path("/proc/self/mountinfo")
HOST_PROC = Path("/proc/1")
SYS_DEV_BLOCK = Path("/sys/dev/block")


@dataclass(frozen=True)
class Usage:
    open_count: int = 0
    mounts: tuple[str, ...] = ()
    holders: tuple[str, ...] = ()

    @property
    def in_use(self) -> bool:
        return bool(self.open_count or self.mounts or self.holders)

    def describe(self) -> str:
        parts = []
        if self.mounts:
            parts.append("mounted at " + ", ".join(self.mounts))
        if self.holders:
            parts.append("held by " + ", ".join(self.holders))
        if self.open_count:
            parts.append(f"open {self.open_count} time(s)")
        return "; ".join(parts) or "not in use"


def volume_usage(vg: str, lv: str) -> Usage:
    """How vg/lv is in use right now (DmError when the kernel cannot tell)."""
    info = dm_info(dm_name(vg, lv))
    if info is None:
        return Usage()
    return Usage(info.open_count, tuple(dict.fromkeys(device_mounts(info.devno))),
                 tuple(holders(info.devno)))


def _mount_tables() -> Iterator[tuple[Path, Path]]:
    """(mountinfo, root to resolve its mount points) for this namespace and the host's."""
    yield SELF_MOUNTINFO, Path("/")
    try:
        same = os.readlink("/proc/self/ns/mnt") == os.readlink(HOST_PROC / "ns" / "mnt")
    except OSError:
        return  # no access to the host's namespace: this one is all we can see
    if not same:
        yield HOST_PROC / "mountinfo", HOST_PROC / "root"


def device_mounts(devno: int, tables: Sequence[tuple[Path, Path]] | None = None) -> list[str]:
    """Mount points of the filesystem on devno and bind mounts of its device node."""
    found = []
    for mountinfo, root in tables if tables is not None else list(_mount_tables()):
        text = mountinfo.read_text(encoding="utf-8", errors="surrogateescape")
        for entry in parse_mountinfo(text):
            if entry.devno == devno:
                found.append(entry.mount_point)
            elif entry.root != "/" and _is_device_node(root, entry.mount_point, devno):
                found.append(entry.mount_point)
    return found


def _is_device_node(root: Path, mount_point: str, devno: int) -> bool:
    try:
        st = os.stat(root / mount_point.lstrip("/"))
    except OSError:
        return False
    return stat.S_ISBLK(st.st_mode) and st.st_rdev == devno


def holders(devno: int) -> list[str]:
    directory = SYS_DEV_BLOCK / f"{os.major(devno)}:{os.minor(devno)}" / "holders"
    try:
        return sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
