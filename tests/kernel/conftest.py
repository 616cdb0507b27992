"""Real-kernel tests: live device-mapper, LVs that activate, filesystems that mount.

Every test under tests/kernel/ is a ``kernel`` test (the marker is added here if a module
forgets it), so the host's ``pytest -m "not kernel"`` never runs them.  They run in the qemu
guest (``python -m kernel_guest pytest``, which sets EDGE_GUEST=1) or on a host whose kernel
has device-mapper; anywhere else they are skipped.

Fixtures:

``kernel_disk_paths`` (session)  the block devices the tests may destroy: the guest's virtio
                                 disks (EDGE_GUEST_DISKS, e.g. /dev/vda,/dev/vdb), or, on a
                                 host with device-mapper, sparse loop disks made for the session.
``kernel_disks`` (function)      the same devices, scrubbed before the test (no mount, VG,
                                 other device-mapper mapping, PV label, partition or signature
                                 on them) and checked after it: a test that leaves any of those
                                 behind fails, and the disks are scrubbed for the next test.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from edge_common.commands import run
from edge_common.devmapper import has_device_mapper
from edge_common.loopdisk import loop_disks
from edge_common.lvm import Lvm

KERNEL_DIR = Path(__file__).resolve().parent
IN_GUEST = os.environ.get("EDGE_GUEST") == "1"
HOST_DISK_COUNT = 2
HOST_DISK_SIZE = 2 << 30  # sparse; big enough for xfs (>= 300 MB) and a thin pool


def kernel_tests_can_run() -> bool:
    return IN_GUEST or has_device_mapper()


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # tryfirst: the marker must be there before "-m" deselects. This hook sees every item of
    # the session, so only ours are touched.
    for item in items:
        if KERNEL_DIR in item.path.parents and item.get_closest_marker("kernel") is None:
            item.add_marker(pytest.mark.kernel)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("kernel") and not kernel_tests_can_run():
        pytest.skip(
            "needs a kernel with device-mapper: run `python -m kernel_guest pytest` "
            "(make test-kernel)"
        )


@pytest.fixture(scope="session")
def kernel_disk_paths(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    if not kernel_tests_can_run():
        pytest.skip("needs a kernel with device-mapper")
    if IN_GUEST:
        disks = [d for d in os.environ.get("EDGE_GUEST_DISKS", "").split(",") if d]
        missing = [d for d in disks if not Path(d).is_block_device()]
        if not disks or missing:
            pytest.fail(f"EDGE_GUEST_DISKS={disks} but not block devices: {missing or disks}")
        yield disks
        return
    directory = tmp_path_factory.mktemp("kernel-disks")
    with loop_disks(HOST_DISK_COUNT, HOST_DISK_SIZE, directory) as loops:
        yield [loop.device for loop in loops]


SYS_BLOCK = Path("/sys/class/block")


def _devno(kernel_name: str) -> int:
    major, minor = (SYS_BLOCK / kernel_name / "dev").read_text().strip().split(":")
    return os.makedev(int(major), int(minor))


def _mounts_of(devnos: set[int]) -> list[str]:
    """Mount points of the block devices with these numbers (compared by number: without
    udev, LVM makes /dev/mapper/* device nodes, not links to /dev/dm-N)."""
    found = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        source, target = line.split()[:2]
        try:
            st = os.stat(source)
        except OSError:
            continue
        if stat.S_ISBLK(st.st_mode) and st.st_rdev in devnos:
            found.append(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), target))
    return found


def _partitions(disk: str) -> list[str]:
    """Kernel names of the partitions of ``disk`` (e.g. ["vdb1"])."""
    base = SYS_BLOCK / os.path.basename(os.path.realpath(disk))
    return sorted(p.name for p in base.iterdir() if (p / "partition").exists())


def _holders(names: Sequence[str]) -> list[str]:
    """Devices stacked on ``names`` (dm-N...), holders of holders first."""
    order: list[str] = []

    def visit(name: str) -> None:
        directory = SYS_BLOCK / name / "holders"
        for holder in sorted(directory.iterdir()) if directory.is_dir() else []:
            visit(holder.name)
            if holder.name not in order:
                order.append(holder.name)

    for name in names:
        visit(name)
    return order


def _dm_name(kernel_name: str) -> str:
    return (SYS_BLOCK / kernel_name / "dm" / "name").read_text().strip()


def scrub_disks(lvm: Lvm, disks: Sequence[str]) -> list[str]:
    """Make ``disks`` blank: unmount what lives on them, remove VGs, other device-mapper
    mappings, PV labels, partitions and signatures.  Returns what was found there."""
    found: list[str] = []
    names = [os.path.basename(os.path.realpath(d)) for d in disks]
    partitions = [part for disk in disks for part in _partitions(disk)]
    stacked = _holders([*names, *partitions])
    devnos = {_devno(name) for name in [*names, *partitions, *stacked]}
    for mountpoint in reversed(_mounts_of(devnos)):
        found.append(f"mount {mountpoint}")
        run(["umount", mountpoint], timeout=60)

    # dm-crypt mappings of encrypted volumes sit on the LVs: they go before the VGs can.
    for holder in stacked:
        name = _dm_name(holder)
        if name.startswith("csi-crypt-"):
            found.append(f"dm-crypt {name}")
            run(["dmsetup", "remove", "--retry", name], timeout=60)
    report = lvm.report()
    ours = {*disks, *(f"/dev/{part}" for part in partitions)}
    for vg in sorted({pv.vg_name for pv in report.pvs if pv.name in ours and pv.vg_name}):
        found.append(f"VG {vg}")
        lvm.command("vgremove", "--yes", "--force", "--", vg)
    for holder in _holders([*names, *partitions]):
        name = _dm_name(holder)
        found.append(f"device-mapper {name}")
        run(["dmsetup", "remove", "--retry", name], timeout=60)
    labelled = sorted(pv.name for pv in report.pvs if pv.name in ours)
    if labelled:
        lvm.command("pvremove", "--yes", "--force", "--force", "--", *labelled)
    for part in partitions:
        found.append(f"partition {part}")
        run(["wipefs", "--all", "--quiet", f"/dev/{part}"], timeout=60)
    for disk in disks:
        run(["wipefs", "--all", "--quiet", disk], timeout=60)
        if partitions:
            run(["blockdev", "--rereadpt", disk], timeout=60, check=False)
    return found


@pytest.fixture
def kernel_disks(kernel_disk_paths: list[str], lvm: Lvm) -> Iterator[list[str]]:
    scrub_disks(lvm, kernel_disk_paths)
    yield list(kernel_disk_paths)
    with contextlib.suppress(Exception):
        run(["sync"], timeout=60)
    left = scrub_disks(lvm, kernel_disk_paths)
    if left:
        pytest.fail(f"test left {', '.join(left)} on {kernel_disk_paths}", pytrace=False)
