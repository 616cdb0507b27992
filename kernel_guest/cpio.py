"""A writer for the "newc" cpio format (the format the kernel unpacks as an initramfs).

Each entry is a 110-byte ASCII header (magic ``070701`` then 13 eight-digit hex fields), the
NUL-terminated name padded to a multiple of 4 bytes, then the data padded likewise.  The
archive ends with an entry named ``TRAILER!!!``.
"""

from __future__ import annotations

import stat
from typing import BinaryIO

NEWC_MAGIC = b"070701"
TRAILER = "TRAILER!!!"


def _pad4(length: int) -> bytes:
    return b"\0" * (-length % 4)


class CpioWriter:
    """Writes entries to a binary stream; call :meth:`close` to add the trailer."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._ino = 0
        self._written = 0
        self._dirs: set[str] = set()
        self._closed = False

    def _entry(
        self,
        name: str,
        mode: int,
        data: bytes = b"",
        nlink: int = 1,
        rdev: tuple[int, int] = (0, 0),
    ) -> None:
        if self._closed:
            raise ValueError("archive already closed")
        name = name.lstrip("/")
        if not name:
            raise ValueError("empty entry name")
        self._ino += 1
        encoded = name.encode() + b"\0"
        fields = (
            self._ino,  # ino
            mode,
            0,  # uid
            0,  # gid
            nlink,
            0,  # mtime: fixed, so the same inputs give the same archive
            len(data),
            0,  # devmajor
            0,  # devminor
            rdev[0],  # rdevmajor
            rdev[1],  # rdevminor
            len(encoded),
            0,  # check
        )
        header = NEWC_MAGIC + b"".join(b"%08X" % value for value in fields)
        chunk = header + encoded
        chunk += _pad4(len(chunk))
        self._out.write(chunk)
        self._out.write(data)
        self._out.write(_pad4(len(data)))
        self._written += len(chunk) + len(data) + len(_pad4(len(data)))

    def add_dir(self, name: str, mode: int = 0o755) -> None:
        """Add a directory (and its missing parents)."""
        parts = name.strip("/").split("/")
        for depth in range(1, len(parts) + 1):
            path = "/".join(parts[:depth])
            if path not in self._dirs:
                self._dirs.add(path)
                self._entry(path, stat.S_IFDIR | mode, nlink=2)

    def _parents(self, name: str) -> None:
        parent = name.strip("/").rpartition("/")[0]
        if parent:
            self.add_dir(parent)

    def add_file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._parents(name)
        self._entry(name, stat.S_IFREG | mode, data)

    def add_symlink(self, name: str, target: str) -> None:
        self._parents(name)
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def add_char_device(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._parents(name)
        self._entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def close(self) -> None:
        if not self._closed:
            self._entry(TRAILER, 0, nlink=1)
            self._closed = True
            # Pad the whole archive to a 512-byte boundary, as cpio tools do.
            self._out.write(b"\0" * (-self._written % 512))


def read_newc(data: bytes) -> list[tuple[str, int, bytes]]:
    """Parse a newc archive into (name, mode, data) entries (used to check what we wrote)."""
    entries: list[tuple[str, int, bytes]] = []
    pos = 0
    while True:
        header = data[pos : pos + 110]
        if len(header) < 110 or header[:6] != NEWC_MAGIC:
            raise ValueError(f"bad cpio header at offset {pos}")
        fields = [int(header[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        mode, filesize, namesize = fields[1], fields[6], fields[11]
        pos += 110
        name = data[pos : pos + namesize - 1].decode()
        pos += namesize
        pos += -(110 + namesize) % 4
        body = data[pos : pos + filesize]
        pos += filesize + (-filesize % 4)
        if name == TRAILER:
            return entries
        entries.append((name, mode, body))
