"""Block-device data operations on live LVs: zeroing, discarding and copying.

Zeroing uses the BLKZEROOUT ioctl (the device offloads it where it can: WRITE ZEROES, loop's
fallocate, thin provisioning), falling back to writing zero buffers. Discard uses BLKDISCARD.
Copies read and write in 4 MiB chunks; a copy into a thin volume skips all-zero chunks, so a
restored thin volume stays thin (the pool returns zeros for unwritten blocks).

Every descriptor that writes is opened with O_EXCL: the kernel then refuses (EBUSY,
DeviceBusy) a device that is mounted or claimed by another driver (device-mapper, md, a
filesystem), so a wipe or a copy never lands on a volume in use.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

BLKDISCARD = 0x1277
BLKZEROOUT = 0x127F
CHUNK = 4 << 20
ZERO_STEP = 256 << 20  # BLKZEROOUT per call: progress between calls
MiB = 1 << 20
_ZEROS = bytes(CHUNK)
_UNSUPPORTED = (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL, errno.ENOSYS)


class BlockDeviceError(Exception):
    pass


class DeviceBusy(BlockDeviceError):
    """The device is mounted or held by another kernel user (O_EXCL open refused)."""


def open_for_writing(path: str) -> int:
    """An exclusive write descriptor for a block device (DeviceBusy when it is in use)."""
    try:
        return os.open(path, os.O_WRONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise DeviceBusy(f"{path} is in use (mounted or held by another device)") from None
        raise BlockDeviceError(f"cannot open {path}: {exc.strerror}") from None


def wait_for_device(path: str, timeout: float = 10.0) -> None:
    """LVM creates /dev/<vg>/<lv> itself (or udev does); wait for it briefly."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise BlockDeviceError(f"{path} did not appear within {timeout:.0f}s")
        time.sleep(0.05)


def _range_ioctl(fd: int, request: int, start: int, length: int) -> None:
    fcntl.ioctl(fd, request, struct.pack("QQ", start, length))


def zero_range(path: str, start: int, length: int, *,
               progress: Callable[[int], None] | None = None) -> None:
    """Make [start, start+length) read as zeros (BLKZEROOUT, else write zeros); progress(n)
    hears the bytes done so far, every ZERO_STEP."""
    if length <= 0:
        return
    fd = open_for_writing(path)
    try:
        offset, end = start, start + length
        while offset < end:
            n = min(ZERO_STEP, end - offset)
            try:
                _range_ioctl(fd, BLKZEROOUT, offset, n)
            except OSError as exc:
                if exc.errno not in _UNSUPPORTED:
                    raise BlockDeviceError(f"zeroing {path}: {exc}") from exc
                _write_zeros(fd, offset, n)
                os.fsync(fd)
            offset += n
            if progress is not None:
                progress(offset - start)
    finally:
        os.close(fd)


def _write_zeros(fd: int, start: int, length: int) -> None:
    offset, end = start, start + length
    while offset < end:
        n = min(CHUNK, end - offset)
        written = os.pwrite(fd, _ZEROS if n == CHUNK else _ZEROS[:n], offset)
        if written <= 0:
            raise BlockDeviceError("short write while zeroing")
        offset += written


def zero_head_and_tail(path: str, size: int, span: int = MiB) -> None:
    """Zero the first and last `span` bytes: partition tables, superblocks, RAID/LUKS headers."""
    zero_range(path, 0, min(span, size))
    if size > span:
        tail = max(span, size - span)
        zero_range(path, tail, size - tail)


def discard(path: str, size: int) -> bool:
    """BLKDISCARD the whole device; False when the device does not support discard."""
    fd = open_for_writing(path)
    try:
        _range_ioctl(fd, BLKDISCARD, 0, size)
        return True
    except OSError as exc:
        if exc.errno in _UNSUPPORTED:
            return False
        raise BlockDeviceError(f"discarding {path}: {exc}") from exc
    finally:
        os.close(fd)


def copy(
    src: str,
    dst: str,
    length: int,
    *,
    skip_zero_chunks: bool = False,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Copy `length` bytes from src to dst (both block devices); returns the bytes written.

    With skip_zero_chunks the destination must already read as zeros (a fresh thin volume on a
    zeroing pool, or a zeroed LV); all-zero chunks are then not written.
    """
    written = 0
    sfd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        dfd = open_for_writing(dst)
        try:
            os.posix_fadvise(sfd, 0, length, os.POSIX_FADV_SEQUENTIAL)
            offset = 0
            while offset < length:
                n = min(CHUNK, length - offset)
                data = os.pread(sfd, n, offset)
                if len(data) != n:
                    raise BlockDeviceError(f"short read from {src} at {offset}")
                if not (skip_zero_chunks and data == (_ZEROS if n == CHUNK else _ZEROS[:n])):
                    view = memoryview(data)
                    done = 0
                    while done < n:
                        done += os.pwrite(dfd, view[done:], offset + done)
                    written += n
                offset += n
                if progress is not None:
                    progress(offset)
            os.fsync(dfd)
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)
    log.info("copied block device", extra={"source": src, "target": dst, "bytes": length,
                                            "written": written})
    return written
