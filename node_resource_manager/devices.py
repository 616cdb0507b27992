"""Block devices by device number: resolve listed paths and expand patterns.

Names change across reboots and links point anywhere; the device number (st_rdev) does not lie.
Every comparison in this agent is by device number, never by path string.
"""

from __future__ import annotations

import errno
import fnmatch
import glob
import os
import stat
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class HostPaths:
    """Where the host's device and sysfs trees are (configurable for containers and tests)."""

    dev: Path = Path("/dev")
    sys: Path = Path("/sys")
    dev_disk: Path = Path("/dev/disk")
    udev_data: Path = Path("/run/udev/data")


@dataclass(frozen=True)
class BlockDevice:
    listed: str  # the path as written in the config (or found by a pattern)
    rdev: int
    kname: str  # kernel name, e.g. loop5, sdb1
    path: str  # where the agent opens it: <dev dir>/<kname> when it is the same device
    # What LVM is given: a path in the HOST's namespace (LVM runs there), /dev/<kname> or a
    # by-diskseq link once the device is pinned (identity.Pins); never the agent's --dev-dir.
    lvm_path: str = ""

    def __post_init__(self) -> None:
        if not self.lvm_path:
            object.__setattr__(self, "lvm_path", f"/dev/{self.kname}")

    @property
    def majmin(self) -> str:
        return f"{os.major(self.rdev)}:{os.minor(self.rdev)}"

    @property
    def node(self) -> str:
        """The device node as the host names it (reports and messages)."""
        return f"/dev/{self.kname}"

    def describe(self) -> str:
        """``/dev/disk/by-id/x -> /dev/sdb`` or just ``/dev/sdb`` (host paths, as written)."""
        return self.listed if self.listed == self.node else f"{self.listed} -> {self.node}"


class ResolveError(Exception):
    """The listed path is not a usable block device; ``missing`` tells absent from wrong type."""

    def __init__(self, message: str, *, missing: bool) -> None:
        self.missing = missing
        super().__init__(message)


def majmin(rdev: int) -> str:
    return f"{os.major(rdev)}:{os.minor(rdev)}"


def sys_dir(rdev: int, paths: HostPaths) -> Path:
    """The device's sysfs directory (via /sys/dev/block/MAJ:MIN, which is a link)."""
    return paths.sys / "dev" / "block" / majmin(rdev)


def host_path(listed: str, paths: HostPaths) -> str:
    """Where a path of the config is on this agent's view of the host: ``/dev/disk/...`` in
    the configured /dev/disk tree, other ``/dev/...`` paths in the configured /dev."""
    if listed.startswith("/dev/disk/"):
        return str(paths.dev_disk / listed[len("/dev/disk/"):])
    if listed.startswith("/dev/") and paths.dev != Path("/dev"):
        return str(paths.dev / listed[len("/dev/"):])
    return listed


def resolve(listed: str, paths: HostPaths) -> BlockDevice:
    """Follow links to the block device and identify it by device number.

    ``listed`` is kept as written (for reports); it is looked up with ``host_path``."""
    where = host_path(listed, paths)
    try:
        st = os.stat(where)
    except FileNotFoundError:
        if os.path.islink(where):
            target = os.readlink(where)
            raise ResolveError(f"{listed} is a dangling link to {target}", missing=True) from None
        raise ResolveError(f"{listed} does not exist", missing=True) from None
    except OSError as exc:
        raise ResolveError(f"{listed} cannot be examined: {exc.strerror}", missing=False) from None
    if not stat.S_ISBLK(st.st_mode):
        real = os.path.realpath(where)
        shown = listed if real == listed else f"{listed} -> {real}"
        raise ResolveError(f"{shown} is not a block device ({_kind(st.st_mode)})", missing=False)
    rdev = st.st_rdev
    sysdir = sys_dir(rdev, paths)
    try:
        kname = os.path.basename(os.path.realpath(sysdir, strict=True))
    except OSError:
        raise ResolveError(
            f"{listed} is block device {majmin(rdev)}, which the kernel does not list in sysfs",
            missing=True,
        ) from None
    candidate = str(paths.dev / kname)
    try:
        same = os.stat(candidate).st_rdev == rdev and stat.S_ISBLK(os.stat(candidate).st_mode)
    except OSError:
        same = False
    path = candidate if same else os.path.realpath(where)
    return BlockDevice(listed=listed, rdev=rdev, kname=kname, path=path)


def expand_pattern(pattern: str, paths: HostPaths) -> list[str]:
    """Paths matching one pattern of a ``type: pattern`` topology.

    ``/dev/disk/...`` globs are matched against the links in the (configurable) /dev/disk tree;
    any other pattern (``sd[b-z]``, ``/dev/nvme*n1``) against kernel block device names."""
    disk_prefix = "/dev/disk/"
    if pattern.startswith(disk_prefix):
        root = str(paths.dev_disk)
        found = sorted(glob.glob(os.path.join(root, pattern[len(disk_prefix):])))
        return [disk_prefix + os.path.relpath(p, root) for p in found]
    name_glob = pattern[len("/dev/"):] if pattern.startswith("/dev/") else pattern
    return ["/dev/" + name for name in match_kernel_names(name_glob, paths)]


def match_kernel_names(name_glob: str, paths: HostPaths) -> list[str]:
    """OSError when sysfs cannot list the block devices (unknown, not "none")."""
    names = os.listdir(paths.sys / "class" / "block")
    return sorted(fnmatch.filter(names, name_glob))


def read_attr(directory: Path, name: str) -> str | None:
    """A sysfs attribute, stripped; None when the file does not exist."""
    try:
        return (directory / name).read_text().strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return None
        raise


def parse_majmin(text: str) -> int | None:
    major, sep, minor = text.strip().partition(":")
    if not sep:
        return None
    try:
        return os.makedev(int(major), int(minor))
    except ValueError:
        return None


def _kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "a regular file"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a device"
