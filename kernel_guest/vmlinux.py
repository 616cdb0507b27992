"""Extract the uncompressed ELF ``vmlinux`` from a compressed kernel image (bzImage).

Same idea as the kernel's scripts/extract-vmlinux: look for the magic bytes of each known
compression format, try to decompress from there, keep the first result that is an ELF file.
Booting the ELF directly (qemu's PVH entry) skips the in-guest decompression, which costs
seconds under software emulation.
"""

from __future__ import annotations

import bz2
import lzma
import zlib
from collections.abc import Callable, Iterator

ELF_MAGIC = b"\x7fELF"


class ExtractError(Exception):
    """No compressed ELF kernel was found in the image."""


def _xz(data: bytes) -> bytes:
    return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data)


def _lzma(data: bytes) -> bytes:
    return lzma.LZMADecompressor(format=lzma.FORMAT_ALONE).decompress(data)


def _gzip(data: bytes) -> bytes:
    return zlib.decompressobj(wbits=16 + zlib.MAX_WBITS).decompress(data)


def _bzip2(data: bytes) -> bytes:
    return bz2.BZ2Decompressor().decompress(data)


# Trailing data after the compressed stream (the rest of the bzImage) is ignored by
# the decompressor objects above, which is what we want.
DECOMPRESSORS: tuple[tuple[str, bytes, Callable[[bytes], bytes]], ...] = (
    ("xz", b"\xfd7zXZ\x00", _xz),
    ("gzip", b"\x1f\x8b\x08", _gzip),
    ("bzip2", b"BZh", _bzip2),
    ("lzma", b"\x5d\x00\x00\x00", _lzma),
)


def _offsets(data: bytes, magic: bytes) -> Iterator[int]:
    start = data.find(magic)
    while start != -1:
        yield start
        start = data.find(magic, start + 1)


def extract_vmlinux(image: bytes) -> tuple[str, bytes]:
    """(format name, ELF bytes) of the kernel inside a compressed image."""
    if image.startswith(ELF_MAGIC):
        return "none", image
    for name, magic, decompress in DECOMPRESSORS:
        for offset in _offsets(image, magic):
            try:
                out = decompress(image[offset:])
            except (lzma.LZMAError, zlib.error, OSError, EOFError, ValueError):
                continue
            if out.startswith(ELF_MAGIC):
                return name, out
    raise ExtractError("no compressed ELF kernel found (tried xz, gzip, bzip2, lzma)")
