"""Loop-disk fixtures: sparse files attached with losetup, detached and deleted at teardown.

    def test_x(loop_disks):
        a, b = loop_disks(2)                  # two 64 MiB loop disks for this test
        big, = loop_disks(1, size=256 * MiB)
        a.device  # "/dev/loopN"

Helpers for adversarial tests: ``device_fingerprint`` (head and tail checksums),
``write_signature`` (ext4, gpt, swap).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edge_common import loopdisk
from edge_common.loopdisk import (
    LoopDisk,
    LoopDiskError,
    MiB,
    device_fingerprint,
    write_gpt,
    write_signature,
)

__all__ = [
    "DEFAULT_DISK_SIZE",
    "LoopDisk",
    "LoopDiskError",
    "LoopDiskFactory",
    "MiB",
    "device_fingerprint",
    "loop_disks",
    "write_gpt",
    "write_signature",
]

DEFAULT_DISK_SIZE = 64 * MiB

LoopDiskFactory = Callable[..., list[LoopDisk]]


@pytest.fixture
def loop_disks(tmp_path: Path) -> Iterator[LoopDiskFactory]:
    """Factory ``loop_disks(count=1, size=64 MiB) -> list[LoopDisk]``; every disk it made is
    detached and deleted at teardown, whatever the test did."""
    directory = tmp_path / "loopdisks"
    directory.mkdir(exist_ok=True)
    with contextlib.ExitStack() as stack:

        def make(count: int = 1, size: int = DEFAULT_DISK_SIZE) -> list[LoopDisk]:
            return stack.enter_context(loopdisk.loop_disks(count, size, directory))

        yield make
