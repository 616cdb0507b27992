"""What identifies a disk's MEDIUM, not its name: and a hold that keeps it from changing.

A device name and a device number survive a hot-swap, a loop device re-bound to another file or
a renumbering after a reboot; the medium behind them does not. So every device the agent may
write is identified when it is first checked (``diskseq``, WWN and serial where the kernel or
udev know them, the loop backing file, major:minor, size) and kept OPEN read-only from that
moment until the LVM write has finished: while a file descriptor is open, a loop device cannot
be re-bound (the kernel defers the detach, a new attach fails with EBUSY) and a removed disk's
device number is not handed to another disk. Right before pvcreate/vgcreate/vgextend the
identity is read again and compared; any difference refuses the device.

The open is not exclusive: pvcreate opens the device O_EXCL itself, which a plain reader does
not block.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from node_resource_manager.devices import (
    BlockDevice,
    HostPaths,
    host_path,
    majmin,
    read_attr,
    sys_dir,
)

#: The kernel's random id of this boot: a diskseq is only meaningful within one boot.
BOOT_ID_FILE = "/proc/sys/kernel/random/boot_id"


class IdentityUnknown(Exception):
    """The medium could not be identified (sysfs unreadable, device gone): fail closed."""


@dataclass(frozen=True)
class MediumIdentity:
    rdev: int
    kname: str
    size_sectors: int
    diskseq: int | None  # kernel 5.15+; unique per medium within one boot
    wwn: str | None
    serial: str | None
    backing_file: str | None  # loop devices: the file behind them
    boot_id: str

    @property
    def majmin(self) -> str:
        return majmin(self.rdev)

    def differences(self, now: MediumIdentity) -> list[str]:
        """What changed between this identity and ``now`` (empty: the same medium)."""
        out = []
        for name in ("rdev", "kname", "size_sectors", "diskseq", "wwn", "serial",
                     "backing_file", "boot_id"):
            before, after = getattr(self, name), getattr(now, name)
            if before != after:
                if name == "rdev":
                    before, after = majmin(before), majmin(after)
                out.append(f"{name} {before} -> {after}")
        return out

    def describe(self) -> str:
        parts = [f"dev {self.majmin}", f"size {self.size_sectors} sectors"]
        if self.diskseq is not None:
            parts.append(f"diskseq {self.diskseq}")
        if self.wwn:
            parts.append(f"wwn {self.wwn}")
        if self.serial:
            parts.append(f"serial {self.serial}")
        if self.backing_file:
            parts.append(f"backing file {self.backing_file}")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {"majmin": self.majmin, "kname": self.kname, "sizeSectors": self.size_sectors,
                "diskseq": self.diskseq, "wwn": self.wwn, "serial": self.serial,
                "backingFile": self.backing_file, "bootId": self.boot_id}

    def same_medium_as(self, recorded: Mapping[str, Any]) -> bool:
        """Is this the medium a journal entry (``to_dict`` of an earlier identity) describes?

        The size must match. Then the persistent identifiers recorded (WWN, serial, a loop
        device's backing file) decide, all of them must match, across re-plugs and reboots;
        without any, the diskseq decides, and only within the boot it was recorded in. The
        device number and name never count: they are reused."""
        if recorded.get("sizeSectors") != self.size_sectors:
            return False
        persistent = [(want, value) for want, value in (
            (recorded.get("wwn"), self.wwn), (recorded.get("serial"), self.serial),
            (recorded.get("backingFile"), self.backing_file)) if want]
        if persistent:
            return all(want == value for want, value in persistent)
        return (recorded.get("bootId") == self.boot_id and self.diskseq is not None
                and recorded.get("diskseq") == self.diskseq)


def boot_id() -> str:
    try:
        return Path(BOOT_ID_FILE).read_text().strip()
    except OSError:
        return ""


def read_identity(rdev: int, paths: HostPaths, *, boot: str | None = None) -> MediumIdentity:
    """Read the medium identity of block device ``rdev``; IdentityUnknown when sysfs cannot
    say (a missing diskseq file on a kernel older than 5.15 is not an error: None)."""
    directory = sys_dir(rdev, paths)
    try:
        kname = os.path.basename(os.path.realpath(directory, strict=True))
        size = read_attr(directory, "size")
        diskseq = read_attr(directory, "diskseq")
        backing = read_attr(directory / "loop", "backing_file")
        wwn = (read_attr(directory, "wwid") or read_attr(directory / "device", "wwid")
               or read_attr(directory / "device", "wwn"))
        serial = read_attr(directory, "serial") or read_attr(directory / "device", "serial")
    except OSError as exc:
        raise IdentityUnknown(f"sysfs of {majmin(rdev)} cannot be read: {exc}") from None
    if size is None or not size.isdigit():
        raise IdentityUnknown(f"sysfs of {majmin(rdev)} has no readable size ({size!r})")
    if diskseq is not None and not diskseq.isdigit():
        raise IdentityUnknown(f"sysfs of {majmin(rdev)} has an unreadable diskseq ({diskseq!r})")
    props = udev_properties(rdev, paths)
    return MediumIdentity(
        rdev=rdev, kname=kname, size_sectors=int(size),
        diskseq=int(diskseq) if diskseq is not None else None,
        wwn=wwn or props.get("ID_WWN_WITH_EXTENSION") or props.get("ID_WWN") or None,
        serial=serial or props.get("ID_SERIAL") or None,
        backing_file=backing.removesuffix(" (deleted)") if backing else None,
        boot_id=boot_id() if boot is None else boot,
    )


def udev_properties(rdev: int, paths: HostPaths) -> dict[str, str]:
    """udev's recorded properties of the device (``E:KEY=VALUE`` lines of its database
    entry); empty without udev. Only used as extra identifiers, never as a safety answer."""
    try:
        text = (paths.udev_data / f"b{majmin(rdev)}").read_text()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        if line.startswith("E:"):
            key, sep, value = line[2:].partition("=")
            if sep:
                out[key] = value
    return out


def lvm_path(identity: MediumIdentity, paths: HostPaths) -> str:
    """The most stable path to hand LVM, in the host's namespace (where LVM runs):
    ``/dev/disk/by-diskseq/N`` when that link exists here and leads to this very device
    (a name that can never point at another medium), else ``/dev/<kernel name>``."""
    if identity.diskseq is not None:
        link = f"/dev/disk/by-diskseq/{identity.diskseq}"
        try:
            st = os.stat(host_path(link, paths))
        except OSError:
            st = None
        if st is not None and stat.S_ISBLK(st.st_mode) and st.st_rdev == identity.rdev:
            return link
    return f"/dev/{identity.kname}"


@dataclass
class PinnedDevice:
    """A device held open read-only since it was first identified."""

    device: BlockDevice  # ``path``: where the agent opens it; ``lvm_path``: what LVM is given
    fd: int
    identity: MediumIdentity

    def verify(self, paths: HostPaths) -> list[str]:
        """Differences between the medium now and when it was pinned (empty: unchanged).
        Also checks that the path LVM will be given still leads to the held device."""
        problems = []
        try:
            held = os.fstat(self.fd).st_rdev
            now = read_identity(held, paths, boot=self.identity.boot_id)
        except (OSError, IdentityUnknown) as exc:
            return [f"cannot re-read the identity: {exc}"]
        problems += self.identity.differences(now)
        try:
            st = os.stat(host_path(self.device.lvm_path, paths))
            if not stat.S_ISBLK(st.st_mode) or st.st_rdev != self.identity.rdev:
                problems.append(f"{self.device.lvm_path} now leads to "
                                f"{majmin(st.st_rdev)}, not {self.identity.majmin}")
        except OSError as exc:
            problems.append(f"{self.device.lvm_path} cannot be examined: {exc.strerror}")
        return problems


class Pins:
    """The devices one reconcile holds open (close them all with ``close`` / ``with``)."""

    def __init__(self, paths: HostPaths) -> None:
        self.paths = paths
        self._boot = boot_id()
        self._held: dict[int, PinnedDevice] = {}

    def pin(self, dev: BlockDevice) -> PinnedDevice:
        """Open ``dev`` read-only and identify its medium; the same pin when already held.
        Raises IdentityUnknown when it cannot be opened or identified, or when the open
        reached another device than the one resolved."""
        if dev.rdev in self._held:
            return self._held[dev.rdev]
        try:
            fd = os.open(dev.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            code = errno.errorcode.get(exc.errno or 0, "?")
            raise IdentityUnknown(f"{dev.describe()} cannot be opened to pin it: "
                                  f"{exc.strerror} ({code})") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISBLK(st.st_mode) or st.st_rdev != dev.rdev:
                raise IdentityUnknown(f"{dev.path} changed between resolving and opening it "
                                      f"({dev.majmin} -> {majmin(st.st_rdev)})")
            identity = read_identity(dev.rdev, self.paths, boot=self._boot)
        except BaseException:
            os.close(fd)
            raise
        pinned = PinnedDevice(replace(dev, lvm_path=lvm_path(identity, self.paths)), fd,
                              identity)
        self._held[dev.rdev] = pinned
        return pinned

    def get(self, rdev: int) -> PinnedDevice | None:
        return self._held.get(rdev)

    def __iter__(self) -> Iterator[PinnedDevice]:
        return iter(list(self._held.values()))

    def keep_only(self, rdevs: set[int]) -> None:
        """Let go of every device not in ``rdevs`` (refused ones: nothing will be written)."""
        for rdev in [r for r in self._held if r not in rdevs]:
            os.close(self._held.pop(rdev).fd)

    def close(self) -> None:
        held, self._held = self._held, {}
        for pinned in held.values():
            os.close(pinned.fd)

    def __enter__(self) -> Pins:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
