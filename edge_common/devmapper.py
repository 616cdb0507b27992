"""Device-mapper: does this kernel offer it (without it LVs cannot be activated), and what does
it say about one mapped device (openers, suspended) - read with one ioctl, no process."""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from dataclasses import dataclass
from pathlib import Path


def has_device_mapper(proc_misc: Path = Path("/proc/misc")) -> bool:
    try:
        text = proc_misc.read_text()
    except OSError:
        return False
    return any(line.split()[-1:] == ["device-mapper"] for line in text.splitlines())


# ---------------------------------------------------------------------------- DM_DEV_STATUS
# One ioctl on /dev/mapper/control answers what no LVM report or sysfs file does cheaply: how
# many openers a mapped device has, and whether it is suspended. No process is started.

_DM_IOCTL = 0xFD
_DM_DEV_SUSPEND_CMD = 6
_DM_DEV_STATUS_CMD = 7
_DM_STRUCT = struct.Struct("=3IIIIiIIIQ128s129s7s")  # struct dm_ioctl (linux/dm-ioctl.h)
_DM_VERSION = (4, 0, 0)
_DM_SUSPEND_FLAG = 1 << 1
_DM_ACTIVE_PRESENT_FLAG = 1 << 5
_DM_INACTIVE_PRESENT_FLAG = 1 << 6
_IOC_READ_WRITE = 3
DM_CONTROL = "/dev/mapper/control"


def _iowr(nr: int, size: int) -> int:
    return (_IOC_READ_WRITE << 30) | (size << 16) | (_DM_IOCTL << 8) | nr


class DmError(Exception):
    """The device-mapper control device did not answer as expected (state UNKNOWN)."""


@dataclass(frozen=True)
class DmInfo:
    """What the kernel says about one mapped device."""

    name: str
    devno: int  # os.makedev(major, minor)
    open_count: int
    suspended: bool
    live_table: bool
    inactive_table: bool
    uuid: str = ""  # the device-mapper UUID (LVM: "LVM-" + VG UUID + LV UUID [+ "-layer"])

    @property
    def lv_uuid(self) -> str:
        """The LVM LV UUID as LVM reports it (lv_uuid, 6-4-4-4-4-4-6), or "" when this is not
        an LVM device's top layer."""
        return lvm_lv_uuid(self.uuid)


def lvm_lv_uuid(dm_uuid: str) -> str:
    """lv_uuid from an LVM device-mapper UUID; "" for anything else (a layer such as -real,
    -tpool or -cow, or another subsystem's device)."""
    if not dm_uuid.startswith("LVM-") or len(dm_uuid) != 4 + 64:
        return ""
    raw = dm_uuid[4 + 32:]
    if not raw.isalnum():
        return ""
    groups, start = [], 0
    for width in (6, 4, 4, 4, 4, 4, 6):
        groups.append(raw[start:start + width])
        start += width
    return "-".join(groups)


def dm_name(vg: str, lv: str) -> str:
    """The device-mapper name LVM gives vg/lv ("-" doubled inside each part)."""
    return f"{vg.replace('-', '--')}-{lv.replace('-', '--')}"


def _decode_dev(value: int) -> int:
    # huge_encode_dev: minor's low 8 bits, then major, then minor's high bits.
    major = (value >> 8) & 0xFFF
    minor = (value & 0xFF) | ((value >> 12) & 0xFFF00)
    return os.makedev(major, minor)


def _dm_call(cmd: int, name: str, flags: int, control: str) -> bytes | None:
    """One device-mapper ioctl on the device ``name``; None when there is no such device."""
    encoded = name.encode()
    if not encoded or len(encoded) >= 128:
        raise ValueError(f"invalid device-mapper name: {name!r}")
    buffer = bytearray(_DM_STRUCT.pack(*_DM_VERSION, _DM_STRUCT.size, _DM_STRUCT.size, 0, 0,
                                       flags, 0, 0, 0, encoded, b"", b""))
    try:
        fd = os.open(control, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        if not has_device_mapper():
            return None  # nothing can be mapped on this kernel
        raise DmError(f"cannot open {control}: {exc.strerror}") from None
    try:
        fcntl.ioctl(fd, _iowr(cmd, _DM_STRUCT.size), buffer, True)
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            return None
        raise DmError(f"device-mapper ioctl {cmd} on {name}: {exc.strerror}") from None
    finally:
        os.close(fd)
    return bytes(buffer)


def dm_resume(name: str, control: str = DM_CONTROL) -> bool:
    """Resume the mapped device ``name`` (DM_DEV_SUSPEND without the suspend flag: what
    ``dmsetup resume`` does); False when there is no such device."""
    return _dm_call(_DM_DEV_SUSPEND_CMD, name, 0, control) is not None


def dm_info(name: str, control: str = DM_CONTROL) -> DmInfo | None:
    """The mapped device ``name``, or None when the kernel has no such device (ENXIO).

    Without device-mapper (no control node and none in /proc/misc) nothing is mapped: None.
    Any other failure is a DmError, never "absent"."""
    answer = _dm_call(_DM_DEV_STATUS_CMD, name, 0, control)
    return None if answer is None else parse_dm_status(name, answer)


def parse_dm_status(name: str, answer: bytes) -> DmInfo:
    """The kernel's answer to DM_DEV_STATUS (a struct dm_ioctl) as a DmInfo."""
    (_v0, _v1, _v2, _size, _start, _targets, open_count, flags, _event_nr, _padding, dev,
     _name, uuid, _data) = _DM_STRUCT.unpack(answer[:_DM_STRUCT.size])
    return DmInfo(name, _decode_dev(dev), open_count, bool(flags & _DM_SUSPEND_FLAG),
                  bool(flags & _DM_ACTIVE_PRESENT_FLAG), bool(flags & _DM_INACTIVE_PRESENT_FLAG),
                  uuid.split(b"\0", 1)[0].decode("ascii", "replace"))
