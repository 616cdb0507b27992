"""Sparse-file loop disks as context managers (tests, benchmarks and the demo).

    with loop_disks(3, 64 << 20, tmp_path) as disks:
        lvm.vgcreate("vg1", [d.device for d in disks])

A LoopDisk creates a sparse backing file, attaches it with ``losetup --find --show``, and on
exit (exceptions included) detaches it and deletes the file. It only ever detaches a loop
device that still points at its own backing file.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import re
import struct
import time
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal

from edge_common.commands import run

MiB = 1 << 20
_SYS_BLOCK = Path("/sys/block")
_DELETED = " (deleted)"


class LoopDiskError(Exception):
    """A loop disk could not be attached or detached."""


@dataclass(frozen=True)
class AttachedLoop:
    device: str  # /dev/loopN
    backing_file: str  # as the kernel reports it, without a " (deleted)" suffix
    deleted: bool  # the backing file was unlinked while attached
    autoclear: bool = False  # detaches itself when last closed (e.g. a lazy losetup -d)


def attached_loops(sys_block: Path = _SYS_BLOCK) -> list[AttachedLoop]:
    """Every attached loop device on this host, read from sysfs (no process started)."""
    found = []
    for entry in sorted(sys_block.glob("loop*")):
        try:
            backing = (entry / "loop" / "backing_file").read_text().rstrip("\n")
        except OSError:
            continue  # not attached, or detached meanwhile
        deleted = backing.endswith(_DELETED)
        if deleted:
            backing = backing[: -len(_DELETED)]
        try:
            autoclear = (entry / "loop" / "autoclear").read_text().strip() == "1"
        except OSError:
            autoclear = False
        found.append(AttachedLoop(f"/dev/{entry.name}", backing, deleted, autoclear))
    return found


def attached_under(root: str | os.PathLike[str]) -> list[AttachedLoop]:
    """Attached loop devices whose backing file lives under ``root``."""
    prefix = os.path.join(os.path.abspath(root), "")
    return [loop for loop in attached_loops() if loop.backing_file.startswith(prefix)]


def backing_file_of(device: str) -> str | None:
    """The backing file of /dev/loopN (without " (deleted)"), or None when not attached."""
    name = os.path.basename(device)
    if not re.fullmatch(r"loop\d+", name):
        raise ValueError(f"not a loop device: {device}")
    try:
        backing = (_SYS_BLOCK / name / "loop" / "backing_file").read_text().rstrip("\n")
    except OSError:
        return None
    return backing[: -len(_DELETED)] if backing.endswith(_DELETED) else backing


class LoopDisk:
    """A sparse file of ``size_bytes`` in ``directory``, attached as a loop device."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        size_bytes: int,
        *,
        name: str | None = None,
        timeout: float = 30.0,
    ) -> None:
        if size_bytes <= 0 or size_bytes % 512:
            raise ValueError(f"size must be a positive multiple of 512 bytes: {size_bytes}")
        self.size_bytes = size_bytes
        self.timeout = timeout
        self.path = Path(os.path.abspath(directory)) / (name or f"disk-{uuid.uuid4().hex[:12]}")
        self._device: str | None = None

    @property
    def device(self) -> str:
        if self._device is None:
            raise LoopDiskError(f"{self.path} is not attached")
        return self._device

    @property
    def attached(self) -> bool:
        return self._device is not None

    @property
    def devno(self) -> int:
        """st_rdev of the loop device (compare devices by number, not by name)."""
        return os.stat(self.device).st_rdev

    def attach(self) -> str:
        if self._device is not None:
            raise LoopDiskError(f"{self.path} is already attached as {self._device}")
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, self.size_bytes)  # sparse: no blocks allocated
        finally:
            os.close(fd)
        try:
            result = run(["losetup", "--find", "--show", str(self.path)], timeout=self.timeout)
        except BaseException:
            self.path.unlink(missing_ok=True)
            raise
        device = result.stdout_text.strip()
        if not re.fullmatch(r"/dev/loop\d+", device):
            self.path.unlink(missing_ok=True)
            raise LoopDiskError(f"losetup printed no loop device: {device!r}")
        self._device = device
        return device

    def detach(self, *, settle: float = 5.0) -> None:
        """Detach (only if the device still points at our file) and delete the file.

        A busy device (mounted, or held by device-mapper) is only detached lazily by the
        kernel; we wait up to ``settle`` seconds for it to go, else raise LoopDiskError."""
        device, self._device = self._device, None
        try:
            if device is not None and backing_file_of(device) == str(self.path):
                run(["losetup", "--detach", device], timeout=self.timeout)
                deadline = time.monotonic() + settle
                while backing_file_of(device) == str(self.path):
                    if time.monotonic() > deadline:
                        raise LoopDiskError(f"{device} ({self.path}) is busy: still attached")
                    time.sleep(0.05)
        finally:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> LoopDisk:
        self.attach()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.detach()

    def __repr__(self) -> str:
        return f"LoopDisk({self._device or 'detached'}, {self.path}, {self.size_bytes})"


@contextlib.contextmanager
def loop_disks(
    count: int, size_bytes: int, directory: str | os.PathLike[str]
) -> Iterator[list[LoopDisk]]:
    """``count`` loop disks of ``size_bytes`` in ``directory``; all detached and deleted on
    exit, also when attaching one of them fails half-way."""
    if count < 1:
        raise ValueError(f"count must be >= 1: {count}")
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(LoopDisk(directory, size_bytes)) for _ in range(count)]


# ------------------------------------------------------------------ content helpers


def _read_uncached(fd: int, offset: int, length: int) -> bytes:
    """pread through O_DIRECT when possible (what is on the device, not a stale page cache)."""
    buf = mmap.mmap(-1, length)  # page aligned, as O_DIRECT requires
    try:
        got = os.preadv(fd, [buf], offset)
        return bytes(buf[:got])
    finally:
        buf.close()


def device_fingerprint(path: str | os.PathLike[str], span: int = MiB) -> bytes:
    """SHA-256 over the size and the first and last ``span`` bytes of a device or file.

    Two equal fingerprints mean "head and tail unchanged byte for byte"."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        direct = True
    except OSError:
        fd = os.open(path, os.O_RDONLY)
        direct = False
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        head_len = min(span, size)
        tail_off = max(size - span, 0)
        digest = hashlib.sha256(struct.pack("<Q", size))
        if direct and size % 4096 == 0 and span % 4096 == 0:
            digest.update(_read_uncached(fd, 0, head_len))
            digest.update(_read_uncached(fd, tail_off, size - tail_off))
        else:
            if direct:
                os.close(fd)
                fd = os.open(path, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            digest.update(os.pread(fd, head_len, 0))
            digest.update(os.pread(fd, size - tail_off, tail_off))
        return digest.digest()
    finally:
        os.close(fd)


SignatureKind = Literal["ext4", "gpt", "swap"]


def write_signature(device: str, kind: SignatureKind, *, timeout: float = 60.0) -> None:
    """Put a recognisable signature on a device we own (adversarial tests): an ext4
    filesystem, a GPT partition table with one partition, or a swap area."""
    if kind == "ext4":
        run(["mkfs.ext4", "-q", "-F", "-E", "nodiscard", device], timeout=timeout)
    elif kind == "swap":
        run(["mkswap", device], timeout=timeout)
    elif kind == "gpt":
        write_gpt(device)
    else:
        raise ValueError(f"unknown signature kind: {kind}")


_LINUX_FS_GUID = uuid.UUID("0FC63DAF-8483-4772-8E79-3D69D8477DE4")
_SECTOR = 512
_ENTRIES = 128
_ENTRY_SIZE = 128


def write_gpt(device: str) -> None:
    """Write a valid GPT (protective MBR, primary and backup headers) with one Linux partition
    spanning the usable area. Written by us from the UEFI spec; no partitioning tool needed."""
    fd = os.open(device, os.O_RDWR)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        last = size // _SECTOR - 1
        entries_sectors = _ENTRIES * _ENTRY_SIZE // _SECTOR  # 32
        first_usable = 2 + entries_sectors
        last_usable = last - 1 - entries_sectors
        start = 2048 if last_usable > 4096 else first_usable
        if last_usable <= start:
            raise ValueError(f"{device} is too small for a GPT")
        entry = struct.pack(
            "<16s16sQQQ72s",
            _LINUX_FS_GUID.bytes_le,
            uuid.uuid4().bytes_le,
            start,
            last_usable,
            0,
            "edge-test".encode("utf-16-le"),
        )
        entries = entry + bytes(_ENTRIES * _ENTRY_SIZE - len(entry))
        entries_crc = zlib.crc32(entries)
        disk_guid = uuid.uuid4().bytes_le

        def header(current: int, backup: int, entries_lba: int) -> bytes:
            def pack(crc: int) -> bytes:
                return struct.pack(
                    "<8sIIIIQQQQ16sQIII",
                    b"EFI PART",
                    0x00010000,
                    92,
                    crc,
                    0,
                    current,
                    backup,
                    first_usable,
                    last_usable,
                    disk_guid,
                    entries_lba,
                    _ENTRIES,
                    _ENTRY_SIZE,
                    entries_crc,
                )

            raw = pack(zlib.crc32(pack(0)))
            return raw + bytes(_SECTOR - len(raw))

        mbr = bytearray(_SECTOR)
        # One partition record of type 0xEE covering the disk (protective MBR).
        mbr[446:462] = struct.pack(
            "<B3sB3sII", 0, b"\x00\x02\x00", 0xEE, b"\xff\xff\xff", 1, min(last, 0xFFFFFFFF)
        )
        mbr[510:512] = b"\x55\xaa"
        os.pwrite(fd, bytes(mbr), 0)
        os.pwrite(fd, header(1, last, 2), _SECTOR)
        os.pwrite(fd, entries, 2 * _SECTOR)
        os.pwrite(fd, entries, (last - entries_sectors) * _SECTOR)
        os.pwrite(fd, header(last, 1, last - entries_sectors), last * _SECTOR)
        os.fsync(fd)
    finally:
        os.close(fd)
