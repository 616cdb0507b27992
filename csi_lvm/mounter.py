"""Mounts for the node service: mount, bind, unmount, and the mount table from mountinfo.

The mount table is read from ``/proc/self/mountinfo`` (no findmnt, no /etc/mtab): it is the
only source that shows per-mount flags (``ro`` of a bind mount), the device number of every
filesystem and the root of bind mounts. Changes run ``mount``/``umount`` from util-linux with
argument lists and a timeout (``edge_common.commands.run``); option strings coming from users
are checked first (``check_mount_options``).

Paths are compared after ``canonical_path``: the parent resolved (symlinks), the last
component kept as given, so a mount point whose filesystem is gone is never stat-ed.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from edge_common.commands import CommandError, CommandNotFound, CommandTimeout, run

MOUNTINFO = Path("/proc/self/mountinfo")
DEFAULT_TIMEOUT = 120.0
MAX_STACKED_MOUNTS = 16
_ESCAPE = re.compile(r"\\([0-7]{3})")

#: Per-mount flags (shown in the mount options column of mountinfo; changeable by a bind remount).
PER_MOUNT_FLAGS = frozenset({
    "ro", "rw", "nosuid", "suid", "nodev", "dev", "noexec", "exec", "noatime", "atime",
    "nodiratime", "diratime", "relatime", "norelatime", "strictatime", "nostrictatime",
    "nosymfollow",
})
#: What the kernel shows for a set flag (the negative spellings are the default, never shown).
_SHOWN_FLAGS = frozenset({"nosuid", "nodev", "noexec", "noatime", "nodiratime", "relatime",
                          "strictatime", "nosymfollow"})

#: Options that would change what the mount command does rather than how the filesystem is
#: mounted (a different source, a different operation, userspace helpers, loop devices).
_FORBIDDEN_OPTIONS = frozenset({
    "bind", "rbind", "move", "remount", "loop", "user", "users", "owner", "group", "defaults",
    "auto", "noauto", "_netdev", "nofail",
})
_FORBIDDEN_PREFIXES = ("make-", "x-", "X-", "loop=", "offset=", "sizelimit=", "encryption=",
                       "helper=", "comment=", "verity.")


class MountError(Exception):
    """A mount, bind or unmount failed (the message carries the tool's stderr)."""


class InvalidMountOption(ValueError):
    """A user-supplied mount option that cannot be passed on safely."""


@dataclass(frozen=True)
class MountEntry:
    """One line of /proc/self/mountinfo (see proc(5))."""

    mount_id: int
    parent_id: int
    major: int
    minor: int
    root: str  # the path inside the filesystem that is mounted here ("/" unless a bind)
    mount_point: str
    options: tuple[str, ...]  # per-mount options
    optional_fields: tuple[str, ...]  # shared:N, master:N, ...
    fs_type: str
    source: str
    super_options: tuple[str, ...]  # per-superblock options

    @property
    def devno(self) -> int:
        return os.makedev(self.major, self.minor)

    @property
    def read_only(self) -> bool:
        """This mount is read-only (per-mount flag)."""
        return "ro" in self.options

    @property
    def super_read_only(self) -> bool:
        """The filesystem itself is mounted read-only (every mount of it is)."""
        return "ro" in self.super_options


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo (three octal digits)."""
    if "\\" not in field:
        return field
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo_line(line: str) -> MountEntry:
    fields = line.rstrip("\n").split(" ")
    try:
        sep = fields.index("-", 6)
        mount_id, parent_id = int(fields[0]), int(fields[1])
        major_text, minor_text = fields[2].split(":", 1)
        fs_type, source = fields[sep + 1], fields[sep + 2]
        super_options = fields[sep + 3] if len(fields) > sep + 3 else ""
    except (ValueError, IndexError) as exc:
        raise ValueError(f"malformed mountinfo line: {line!r}") from exc
    return MountEntry(
        mount_id=mount_id,
        parent_id=parent_id,
        major=int(major_text),
        minor=int(minor_text),
        root=_unescape(fields[3]),
        mount_point=_unescape(fields[4]),
        options=tuple(fields[5].split(",")),
        optional_fields=tuple(fields[6:sep]),
        fs_type=_unescape(fs_type),
        source=_unescape(source),
        super_options=tuple(super_options.split(",")) if super_options else (),
    )


def parse_mountinfo(text: str) -> list[MountEntry]:
    """Every entry, in mount order (a later entry for the same mount point is on top)."""
    return [parse_mountinfo_line(line) for line in text.splitlines() if line.strip()]


def canonical_path(path: str | os.PathLike[str]) -> str:
    """Absolute, normalised, the parent's symlinks resolved; the last component not followed."""
    text = os.path.normpath(os.path.abspath(os.fspath(path)))
    if text == "/":
        return text
    parent, name = os.path.split(text)
    return os.path.join(os.path.realpath(parent), name)


def split_option_list(options: Iterable[str]) -> list[str]:
    """["noatime,nodev", "discard"] -> ["noatime", "nodev", "discard"] (empty parts dropped)."""
    out: list[str] = []
    for item in options:
        out.extend(part.strip() for part in item.split(",") if part.strip())
    return out


def check_mount_options(options: Iterable[str]) -> list[str]:
    """User-supplied mount options, split and checked; InvalidMountOption when one is unsafe."""
    out: list[str] = []
    for option in split_option_list(options):
        if any(ch in option for ch in "\x00\n\r\t ") or option.startswith("-"):
            raise InvalidMountOption(f"mount option {option!r} contains forbidden characters")
        name = option.split("=", 1)[0]
        if name in _FORBIDDEN_OPTIONS or option.startswith(_FORBIDDEN_PREFIXES):
            raise InvalidMountOption(f"mount option {option!r} is not allowed")
        if option not in out:
            out.append(option)
    return out


def per_mount_flags(options: Iterable[str]) -> list[str]:
    """The options of a list that are per-mount flags (what a bind remount can apply)."""
    return [opt for opt in options if opt in PER_MOUNT_FLAGS]


def flags_satisfied(entry: MountEntry, options: Iterable[str]) -> bool:
    """Does the mount carry every per-mount flag asked for (only flags the kernel shows)?"""
    return all(flag in entry.options for flag in options if flag in _SHOWN_FLAGS)


class Mounter:
    """Reads the mount table and changes mounts (thread-safe: no state besides settings)."""

    def __init__(self, *, mountinfo: Path = MOUNTINFO, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.mountinfo = mountinfo
        self.timeout = timeout

    # ------------------------------------------------------------------ reading

    def mounts(self) -> list[MountEntry]:
        return parse_mountinfo(self.mountinfo.read_text(encoding="utf-8",
                                                        errors="surrogateescape"))

    def mounts_at(self, path: str | os.PathLike[str]) -> list[MountEntry]:
        """Every mount whose mount point is path, bottom first."""
        target = canonical_path(path)
        return [m for m in self.mounts() if m.mount_point == target]

    def find(self, path: str | os.PathLike[str]) -> MountEntry | None:
        """The mount on top at path, or None when path is not a mount point."""
        found = self.mounts_at(path)
        return found[-1] if found else None

    def is_mount_point(self, path: str | os.PathLike[str]) -> bool:
        return self.find(path) is not None

    def filesystem_mounts(self, device: str) -> list[MountEntry]:
        """Mounts of the filesystem on ``device`` (matched by device number or source path)."""
        rdev = _rdev(device)
        real = os.path.realpath(device)
        return [m for m in self.mounts()
                if (rdev is not None and m.devno == rdev)
                or (m.source.startswith("/") and os.path.realpath(m.source) == real)]

    def device_binds(self, device: str) -> list[MountEntry]:
        """Mounts that place the device node of ``device`` on a file (raw block publishing)."""
        rdev = _rdev(device)
        if rdev is None:
            return []
        name = os.path.basename(os.path.realpath(device))
        found = []
        for m in self.mounts():
            if os.path.basename(m.root) != name:
                continue
            try:
                st = os.stat(m.mount_point)
            except OSError:
                continue
            if stat.S_ISBLK(st.st_mode) and st.st_rdev == rdev:
                found.append(m)
        return found

    # ------------------------------------------------------------------ changing

    def _run(self, argv: Sequence[str], what: str) -> None:
        try:
            run(argv, timeout=self.timeout)
        except CommandError as exc:
            raise MountError(f"{what} failed: {exc.result.stderr_text or exc}") from None
        except CommandTimeout:
            raise MountError(f"{what} did not finish within {self.timeout:.0f}s") from None
        except CommandNotFound as exc:
            raise MountError(f"{what}: {exc}") from None

    def mount(self, source: str, target: str, fs_type: str, options: Sequence[str] = ()) -> None:
        """mount -t fs_type -o options source target (options already checked by the caller)."""
        argv = ["mount", "-i", "-t", fs_type]
        if options:
            argv += ["-o", ",".join(options)]
        self._run([*argv, "--", source, target], f"mounting {source} on {target}")

    def bind(self, source: str, target: str, *, read_only: bool = False,
             flags: Sequence[str] = ()) -> None:
        """Bind source (a directory, or a device node onto a file) to target; then apply the
        per-mount flags (``ro`` first) with a bind remount. On a failed remount the bind is
        undone, so the target is never left writable by mistake."""
        self._run(["mount", "--bind", "--", source, target], f"binding {source} to {target}")
        wanted = (["ro"] if read_only else []) + [f for f in per_mount_flags(flags)
                                                  if f not in ("ro", "rw")]
        if not wanted:
            return
        try:
            self._run(["mount", "-o", ",".join(["remount", "bind", *wanted]), "--", target],
                      f"remounting {target} with {','.join(wanted)}")
        except MountError:
            self.unmount(target)
            raise

    def unmount(self, target: str) -> None:
        """Unmount the top mount at target (no lazy unmount: a busy mount is an error)."""
        self._run(["umount", "--", target], f"unmounting {target}")

    def unmount_all(self, target: str) -> int:
        """Unmount every mount stacked at target; returns how many were removed."""
        removed = 0
        while self.is_mount_point(target):
            if removed >= MAX_STACKED_MOUNTS:
                raise MountError(f"{target}: more than {MAX_STACKED_MOUNTS} stacked mounts")
            self.unmount(target)
            removed += 1
        return removed


def _rdev(device: str) -> int | None:
    try:
        st = os.stat(device)
    except OSError:
        return None
    return st.st_rdev if stat.S_ISBLK(st.st_mode) else None
