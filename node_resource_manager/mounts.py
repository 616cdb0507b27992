"""What the host has mounted and swapped on: read from mount tables, by device number.

The host's table is /proc/1/mountinfo when the agent shares the host's PID namespace (it runs
with hostPID in the DaemonSet); the agent's own /proc/self/mountinfo is read too. Paths are
configurable so tests can add a table of their own.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field

from node_resource_manager.devices import HostPaths, host_path, parse_majmin

DEFAULT_MOUNT_TABLES: tuple[str, ...] = ("/proc/1/mountinfo", "/proc/self/mountinfo")
_HOST = HostPaths()


@dataclass(frozen=True)
class MountEntry:
    rdev: int  # the mounted filesystem's device number (field 3)
    root: str  # the path inside that filesystem which is mounted (field 4)
    mount_point: str
    fstype: str
    source: str


@dataclass
class MountTable:
    """Device number -> where it is mounted; plus the devices the root filesystem sits on."""

    mounted: dict[int, list[str]] = field(default_factory=dict)
    root_devices: set[int] = field(default_factory=set)  # rdev of "/" in each table read
    unreadable: list[str] = field(default_factory=list)  # tables that could not be read

    def where(self, rdev: int) -> list[str]:
        return self.mounted.get(rdev, [])


def unescape(text: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo octal."""
    if "\\" not in text:
        return text
    out = []
    i = 0
    while i < len(text):
        digits = text[i + 1 : i + 4]
        if text[i] == "\\" and len(digits) == 3 and all(c in "01234567" for c in digits):
            out.append(chr(int(digits, 8)))
            i += 4
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[MountEntry]:
    entries = []
    for line in text.splitlines():
        fields = line.split(" ")
        if len(fields) < 10 or "-" not in fields[6:]:
            continue
        sep = fields.index("-", 6)
        rdev = parse_majmin(fields[2])
        if rdev is None or len(fields) < sep + 3:
            continue
        entries.append(
            MountEntry(
                rdev=rdev,
                root=unescape(fields[3]),
                mount_point=unescape(fields[4]),
                fstype=fields[sep + 1],
                source=unescape(fields[sep + 2]),
            )
        )
    return entries


def read_mount_tables(tables: Iterable[str], paths: HostPaths = _HOST) -> MountTable:
    """Union of the given mountinfo files.

    A device counts as mounted when a mount's device number is its own, when a mount's source
    path resolves to it (filesystems like btrfs report an anonymous device number), or when
    the device node itself is bind-mounted (a raw block volume handed to a pod: devtmpfs
    mounted with root ``/<kernel name>``). Paths in the tables are the host's; they are
    looked up in the agent's view of the host's /dev (``paths``)."""
    table = MountTable()
    seen_sources: dict[str, int | None] = {}
    for path in tables:
        try:
            with open(path) as fh:
                text = fh.read()
        except OSError:
            table.unreadable.append(path)
            continue
        for entry in parse_mountinfo(text):
            where = entry.mount_point
            if entry.mount_point == "/":
                table.root_devices.add(entry.rdev)
            _add(table, entry.rdev, where)
            if entry.source.startswith("/dev/"):
                if entry.source not in seen_sources:
                    seen_sources[entry.source] = _block_rdev(host_path(entry.source, paths))
                src = seen_sources[entry.source]
                if src is not None and src != entry.rdev:
                    _add(table, src, where)
                    if entry.mount_point == "/":
                        table.root_devices.add(src)
            if entry.fstype in ("devtmpfs", "tmpfs") and entry.root not in ("/", ""):
                node = os.path.join(paths.dev, entry.root.lstrip("/"))
                if node not in seen_sources:
                    seen_sources[node] = _block_rdev(node)
                bound = seen_sources[node]
                if bound is not None:
                    _add(table, bound, f"{where} (bind mount of the device node)")
    return table


def _add(table: MountTable, rdev: int, where: str) -> None:
    places = table.mounted.setdefault(rdev, [])
    if where not in places:
        places.append(where)


def _block_rdev(path: str) -> int | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_rdev if stat.S_ISBLK(st.st_mode) else None


def read_swaps(path: str = "/proc/swaps", paths: HostPaths = _HOST) -> dict[int, str]:
    """Active swap devices: device number -> the path /proc/swaps names.

    OSError when the list cannot be read, or names a device node under /dev that the agent
    cannot find (then it cannot tell which device is swap: unknown, never "none")."""
    with open(path) as fh:
        lines = fh.read().splitlines()[1:]
    out: dict[int, str] = {}
    for line in lines:
        parts = line.split()
        if not parts:
            continue
        name = unescape(parts[0])
        where = host_path(name, paths)
        rdev = _block_rdev(where)
        if rdev is not None:
            out[rdev] = name
        elif name.startswith("/dev/") and not os.path.exists(where):
            raise OSError(f"active swap {name} is not visible at {where}")
    return out
