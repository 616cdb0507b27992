"""Filesystems on volumes: detect, create (blank devices only), grow online.

Detection is ``blkid -p`` (low-level probing of the device itself, no cache). A device is
*blank* only when blkid finds no signature at all (no filesystem, no partition table, no RAID
or LVM label, no swap, no "ambivalent" result) AND its first ``BLANK_HEAD_BYTES`` read as
zeros: data without a signature (a raw block volume's content) is never formatted over. LVM
zeroes the first 4 KiB of every new LV (``lvcreate -Zy``) and thin volumes read zeros until
written, so a fresh volume is blank.

mkfs options from a StorageClass (``mkfsOptions``) are split like a shell would (shlex, never
run through one) and checked against a per-filesystem allowlist: no positional arguments (a
second device, a size), no force/dry-run flags, nothing that reads or writes another file or
device (external journals and logs, prototype files, undo files), no "/" in any value.

Growth: ``resize2fs DEVICE`` (ext4, online when mounted), ``xfs_growfs MOUNTPOINT`` (xfs must
be mounted), ``btrfs filesystem resize max MOUNTPOINT``.
"""

from __future__ import annotations

import os
import shlex
import stat
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from edge_common.commands import CommandError, CommandNotFound, CommandTimeout, run

BLANK_HEAD_BYTES = 4096
PROBE_TIMEOUT = 30.0
MKFS_TIMEOUT = 600.0
GROW_TIMEOUT = 600.0

# blkid exit codes (blkid(8)): 2 = nothing found, 8 = ambivalent low-level probing result.
_BLKID_NOTHING = 2
_BLKID_AMBIVALENT = 8


class FilesystemError(Exception):
    """Probing, formatting or growing failed."""


class UnsafeMkfsOptions(ValueError):
    """mkfsOptions that could do something other than format this one device."""


@dataclass(frozen=True)
class Probe:
    """What blkid -p found on a device (empty when nothing)."""

    values: Mapping[str, str] = field(default_factory=dict)
    ambivalent: bool = False

    @property
    def fs_type(self) -> str | None:
        """TYPE of a filesystem signature (USAGE=filesystem), else None."""
        if self.values.get("USAGE", "filesystem") != "filesystem":
            return None
        return self.values.get("TYPE") or None

    @property
    def signature(self) -> str | None:
        """Whatever was found, for messages: "ext4", "swap", "LVM2_member", "gpt", ..."""
        if self.ambivalent:
            return "several signatures (ambivalent)"
        return self.values.get("TYPE") or self.values.get("PTTYPE") or None

    @property
    def empty(self) -> bool:
        return not self.ambivalent and not self.values.get("TYPE") and \
            not self.values.get("PTTYPE")


def probe(device: str, *, timeout: float = PROBE_TIMEOUT) -> Probe:
    """blkid -p -o export DEVICE; FilesystemError when blkid itself fails.

    blkid also says "nothing found" for a path that does not exist: the device is checked
    first, so a missing device is never taken for a blank one."""
    _check_block_device(device)
    try:
        result = run(["blkid", "-p", "-o", "export", "--", device], timeout=timeout, check=False)
    except (CommandTimeout, CommandNotFound) as exc:
        raise FilesystemError(f"probing {device}: {exc}") from None
    if result.returncode == _BLKID_NOTHING:
        return Probe()
    if result.returncode == _BLKID_AMBIVALENT:
        return Probe(ambivalent=True)
    if result.returncode != 0:
        raise FilesystemError(
            f"blkid -p {device} exited {result.returncode}: {result.stderr_text}")
    values: dict[str, str] = {}
    for line in result.stdout_text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key.strip()] = value.strip()
    return Probe(values)


def _check_block_device(device: str) -> None:
    try:
        st = os.stat(device)
    except OSError as exc:
        raise FilesystemError(f"{device}: {exc.strerror}") from None
    if not stat.S_ISBLK(st.st_mode):
        raise FilesystemError(f"{device} is not a block device")


def head_is_zero(device: str, length: int = BLANK_HEAD_BYTES) -> bool:
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
        try:
            data = os.pread(fd, length, 0)
        finally:
            os.close(fd)
    except OSError as exc:
        raise FilesystemError(f"reading {device}: {exc.strerror}") from None
    return data.count(0) == len(data)


def blank_problem(device: str) -> str | None:
    """Why the device is not blank (None when it is)."""
    found = probe(device)
    if not found.empty:
        return f"{device} holds {found.signature}"
    if not head_is_zero(device):
        return (f"{device} has no recognisable signature but its first {BLANK_HEAD_BYTES} "
                "bytes are not zero (data written as a raw block volume?)")
    return None


# ------------------------------------------------------------------ mkfs options


Validator = Callable[[str, str], None]


def _no_keys(*keys: str) -> Validator:
    """A value validator refusing comma-separated sub-options named ``keys`` (key or key=...)."""

    def check(option: str, value: str) -> None:
        for part in value.split(","):
            name = part.split("=", 1)[0].strip().lstrip("^")
            if name in keys:
                raise UnsafeMkfsOptions(f"{option} {part}: not allowed")

    return check


def _equals(expected: str) -> Validator:
    def check(option: str, value: str) -> None:
        if value != expected:
            raise UnsafeMkfsOptions(f"{option} {value}: only {expected!r} is allowed here")

    return check


def _accept(option: str, value: str) -> None:
    return None


@dataclass(frozen=True)
class MkfsSpec:
    command: str
    base_args: tuple[str, ...]
    flags: frozenset[str]  # options without a value
    valued: Mapping[str, Validator]  # options taking a value -> its validator
    long_flags: frozenset[str] = frozenset()
    long_valued: Mapping[str, Validator] = field(default_factory=dict)


MKFS: dict[str, MkfsSpec] = {
    "ext4": MkfsSpec(
        command="mkfs.ext4",
        base_args=("-q",),
        flags=frozenset({"-j", "-q", "-v", "-D"}),
        valued={
            "-b": _accept, "-C": _accept, "-e": _accept, "-g": _accept, "-G": _accept,
            "-i": _accept, "-I": _accept, "-L": _accept, "-m": _accept, "-N": _accept,
            "-o": _accept, "-r": _accept, "-T": _accept, "-U": _accept,
            "-E": _no_keys("offset", "android_sparse"),
            "-J": _no_keys("device"),
            "-O": _no_keys("journal_dev"),
            "-t": _equals("ext4"),
        },
    ),
    "xfs": MkfsSpec(
        command="mkfs.xfs",
        base_args=("-q",),
        flags=frozenset({"-q", "-K"}),
        valued={
            "-b": _accept, "-i": _accept, "-m": _accept, "-n": _accept, "-s": _accept,
            "-L": _accept,
            "-d": _no_keys("name", "file"),
            "-l": _no_keys("logdev", "name", "file"),
        },
    ),
    "btrfs": MkfsSpec(
        command="mkfs.btrfs",
        base_args=("-q",),
        flags=frozenset({"-q", "-K", "-M", "-v"}),
        valued={
            "-d": _accept, "-m": _accept, "-L": _accept, "-n": _accept, "-s": _accept,
            "-O": _accept, "-R": _accept, "-U": _accept, "-b": _accept,
        },
        long_flags=frozenset({"--quiet", "--nodiscard", "--mixed", "--verbose"}),
        long_valued={
            "--data": _accept, "--metadata": _accept, "--label": _accept, "--nodesize": _accept,
            "--sectorsize": _accept, "--features": _accept, "--runtime-features": _accept,
            "--csum": _accept, "--checksum": _accept, "--uuid": _accept, "--byte-count": _accept,
        },
    ),
}


def parse_mkfs_options(fs_type: str, text: str | Sequence[str]) -> list[str]:
    """mkfsOptions -> checked argv words; UnsafeMkfsOptions on anything not allowlisted."""
    spec = MKFS.get(fs_type)
    if spec is None:
        raise UnsafeMkfsOptions(f"unsupported filesystem type {fs_type!r}")
    if isinstance(text, str):
        try:
            words = shlex.split(text)
        except ValueError as exc:
            raise UnsafeMkfsOptions(f"mkfsOptions: {exc}") from None
    else:
        words = list(text)
    for word in words:
        if "/" in word or any(ch in word for ch in "\x00\n\r"):
            raise UnsafeMkfsOptions(
                f"mkfsOptions: {word!r}: paths (and control characters) are not allowed")
    i = 0
    while i < len(words):
        word = words[i]
        i += 1
        if word == "--" or not word.startswith("-") or word == "-":
            raise UnsafeMkfsOptions(
                f"mkfsOptions: {word!r}: positional arguments are not allowed "
                "(they would name another device or a size)")
        if word.startswith("--"):
            name, sep, value = word.partition("=")
            if name in spec.long_flags and not sep:
                continue
            check = spec.long_valued.get(name)
            if check is None:
                raise UnsafeMkfsOptions(f"mkfsOptions: {name} is not allowed for {fs_type}")
            if not sep:
                if i >= len(words):
                    raise UnsafeMkfsOptions(f"mkfsOptions: {name} needs a value")
                value = words[i]
                i += 1
            check(name, value)
            continue
        # Short options, getopt style: "-qj", "-b4096", "-b 4096".
        for pos in range(1, len(word)):
            option = "-" + word[pos]
            if option in spec.flags:
                continue
            check = spec.valued.get(option)
            if check is None:
                raise UnsafeMkfsOptions(f"mkfsOptions: {option} is not allowed for {fs_type}")
            value = word[pos + 1:]
            if not value:
                if i >= len(words):
                    raise UnsafeMkfsOptions(f"mkfsOptions: {option} needs a value")
                value = words[i]
                i += 1
            check(option, value)
            break
    return words


def mkfs_argv(fs_type: str, device: str, options: str | Sequence[str] = "") -> list[str]:
    spec = MKFS.get(fs_type)
    if spec is None:
        raise FilesystemError(f"unsupported filesystem type {fs_type!r}")
    words = parse_mkfs_options(fs_type, options)
    return [spec.command, *spec.base_args, *words, "--", device]


def make_filesystem(fs_type: str, device: str, options: str | Sequence[str] = "", *,
                    timeout: float = MKFS_TIMEOUT) -> None:
    """Create a filesystem on a BLANK device (checked again here; never forced)."""
    argv = mkfs_argv(fs_type, device, options)
    problem = blank_problem(device)
    if problem is not None:
        raise FilesystemError(f"refusing to format: {problem}")
    _run(argv, timeout, f"mkfs.{fs_type} {device}")


def grow(fs_type: str, device: str, mount_point: str | None, *,
         timeout: float = GROW_TIMEOUT) -> None:
    """Grow the filesystem to fill its device (online when mounted; xfs/btrfs must be)."""
    if fs_type in ("ext4", "ext3", "ext2"):
        argv = ["resize2fs", "--", device]
    elif fs_type == "xfs":
        if not mount_point:
            raise FilesystemError("xfs can only grow while mounted")
        argv = ["xfs_growfs", "--", mount_point]
    elif fs_type == "btrfs":
        if not mount_point:
            raise FilesystemError("btrfs can only grow while mounted")
        argv = ["btrfs", "filesystem", "resize", "--", "max", mount_point]
    else:
        raise FilesystemError(f"cannot grow a {fs_type} filesystem")
    _run(argv, timeout, f"growing the {fs_type} filesystem on {device}")


def _run(argv: Sequence[str], timeout: float, what: str) -> None:
    try:
        run(argv, timeout=timeout)
    except CommandError as exc:
        detail = exc.result.stderr_text or exc.result.stdout_text.strip()
        raise FilesystemError(f"{what} failed (exit {exc.returncode}): {detail[:1000]}") from None
    except (CommandTimeout, CommandNotFound) as exc:
        raise FilesystemError(f"{what}: {exc}") from None
