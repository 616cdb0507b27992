"""The initramfs archive format and the vmlinux extraction."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import stat

import pytest

from kernel_guest.cpio import CpioWriter, read_newc
from kernel_guest.vmlinux import ExtractError, extract_vmlinux


def archive(build: object) -> bytes:
    out = io.BytesIO()
    writer = CpioWriter(out)
    build(writer)  # type: ignore[operator]
    writer.close()
    return out.getvalue()


def test_newc_header_matches_the_format_byte_for_byte() -> None:
    data = archive(lambda w: w.add_file("init", b"#!/bin/sh\n", mode=0o755))
    expected_header = (
        b"070701"
        + b"00000001"  # ino
        + b"000081ED"  # mode: regular file 0755
        + b"00000000" * 2  # uid, gid
        + b"00000001"  # nlink
        + b"00000000"  # mtime
        + b"0000000A"  # filesize 10
        + b"00000000" * 4  # dev and rdev major/minor
        + b"00000005"  # namesize: "init\0"
        + b"00000000"  # check
    )
    assert data.startswith(expected_header + b"init\0")
    # 110 + 5 = 115 bytes, padded to 116; then the data, padded to a multiple of 4.
    assert data[116:126] == b"#!/bin/sh\n"
    assert data[126:128] == b"\0\0"
    assert data[128:134] == b"070701"
    assert len(data) % 512 == 0


def test_entries_round_trip_with_parents_created_once() -> None:
    payload = os.urandom(1001)

    def build(w: CpioWriter) -> None:
        w.add_file("modules/dm_mod.ko", payload)
        w.add_file("modules/order", b"dm_mod\n")
        w.add_symlink("bin/sh", "busybox")
        w.add_char_device("dev/console", 5, 1)

    entries = read_newc(archive(build))
    names = [name for name, _, _ in entries]
    assert names == ["modules", "modules/dm_mod.ko", "modules/order", "bin", "bin/sh", "dev",
                     "dev/console"]  # fmt: skip
    by_name = {name: (mode, body) for name, mode, body in entries}
    assert by_name["modules/dm_mod.ko"] == (stat.S_IFREG | 0o644, payload)
    assert stat.S_ISDIR(by_name["modules"][0])
    assert by_name["bin/sh"] == (stat.S_IFLNK | 0o777, b"busybox")
    assert stat.S_ISCHR(by_name["dev/console"][0])


def test_char_device_numbers_are_in_the_rdev_fields() -> None:
    data = archive(lambda w: w.add_char_device("console", 5, 1))
    rdevmajor = int(data[6 + 8 * 9 : 6 + 8 * 10], 16)
    rdevminor = int(data[6 + 8 * 10 : 6 + 8 * 11], 16)
    assert (rdevmajor, rdevminor) == (5, 1)


def test_same_inputs_give_the_same_archive() -> None:
    def build(w: CpioWriter) -> None:
        w.add_file("a/b", b"x")

    assert archive(build) == archive(build)


def test_writing_after_close_is_refused() -> None:
    writer = CpioWriter(io.BytesIO())
    writer.close()
    with pytest.raises(ValueError):
        writer.add_file("late", b"")


FAKE_ELF = b"\x7fELF\x02\x01\x01" + os.urandom(4096)


@pytest.mark.parametrize(
    "compress",
    [
        lambda d: lzma.compress(d, format=lzma.FORMAT_XZ),
        lambda d: gzip.compress(d),
        lambda d: bz2.compress(d),
        # As the kernel's build does it (lzma -9: a 64 MiB dictionary, hence the magic).
        lambda d: lzma.compress(
            d,
            format=lzma.FORMAT_ALONE,
            filters=[{"id": lzma.FILTER_LZMA1, "preset": 9, "dict_size": 1 << 26}],
        ),
    ],
    ids=["xz", "gzip", "bzip2", "lzma"],
)
def test_vmlinux_is_found_inside_a_bzimage_like_blob(compress: object) -> None:
    image = b"MZ" + os.urandom(2000) + compress(FAKE_ELF) + os.urandom(500)  # type: ignore[operator]
    _, elf = extract_vmlinux(image)
    assert elf == FAKE_ELF


def test_a_compressed_payload_that_is_not_elf_is_not_taken_for_the_kernel() -> None:
    image = b"MZ" + lzma.compress(b"not a kernel" * 100, format=lzma.FORMAT_XZ)
    with pytest.raises(ExtractError):
        extract_vmlinux(image)


def test_an_uncompressed_elf_is_returned_as_is() -> None:
    assert extract_vmlinux(FAKE_ELF) == ("none", FAKE_ELF)
