"""LVM fixtures: real lvm2 through edge_common.lvm, on loop disks.

``lvm``         an Lvm with ``Lvm.settings_for_this_kernel()`` (``--driverloaded n`` here).
``vg_factory``  ``vg_factory(pvs=1, size=64 MiB, tags=(), name=None) -> TestVg``: a VG with a
                unique name (``SESSION_PREFIX``...) on fresh loop disks; at teardown its LVs,
                the VG and its PVs are removed (tolerating a test that already removed them).
``unique_vg_name(hint)`` names anything a test creates itself, so the leak check sees it.
"""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from edge_common.devmapper import has_device_mapper
from edge_common.loopdisk import LoopDisk, attached_under
from edge_common.lvm import Lvm, LvmError
from tests.rigs.loopdisks import DEFAULT_DISK_SIZE, LoopDiskFactory

#: Every VG this test session creates starts with this: t + 8 hex digits, unique per session.
SESSION_PREFIX = "t" + secrets.token_hex(4)
_counter = itertools.count(1)


def unique_vg_name(hint: str = "vg") -> str:
    return f"{SESSION_PREFIX}-{hint}{next(_counter)}"


def unique_name(hint: str = "lv") -> str:
    """A unique LV/tag-safe name (not tied to the session prefix)."""
    return f"{hint}-{secrets.token_hex(4)}"


@dataclass
class TestVg:
    __test__ = False  # not a test class, whatever its name

    name: str
    disks: list[LoopDisk]
    tags: tuple[str, ...] = ()

    @property
    def devices(self) -> list[str]:
        return [d.device for d in self.disks]


VgFactory = Callable[..., TestVg]


def pytest_runtest_setup(item: pytest.Item) -> None:
    """``@pytest.mark.kernel`` tests need device-mapper: skipped (visibly) on a kernel
    without it; they run in the real-kernel suite (``python -m kernel_guest pytest``)."""
    if item.get_closest_marker("kernel") is not None and not has_device_mapper():
        pytest.skip("needs device-mapper: runs in the real-kernel suite")


@pytest.fixture(scope="session")
def lvm() -> Lvm:
    return Lvm(Lvm.settings_for_this_kernel(timeout=60.0))


def remove_vg_and_pvs(lvm: Lvm, name: str, our_devices: Sequence[str]) -> None:
    """Test-rig cleanup (the services never do this): remove the VG with its LVs, then the
    PV labels on ``our_devices`` that belonged to it or to no VG. Tolerates a VG or PVs the
    test already removed; leaves PVs of other VGs alone."""
    ours = set(our_devices)
    report = lvm.report()
    if report.vg(name) is not None:
        lvm.command("vgremove", "--yes", "--", name)
    labelled = sorted(
        pv.name for pv in report.pvs if pv.name in ours and pv.vg_name in (None, name)
    )
    if labelled:
        lvm.command("pvremove", "--yes", "--", *labelled)


@pytest.fixture
def vg_factory(lvm: Lvm, loop_disks: LoopDiskFactory, tmp_path: Path) -> Iterator[VgFactory]:
    created: list[TestVg] = []

    def make(
        pvs: int = 1,
        size: int = DEFAULT_DISK_SIZE,
        tags: Sequence[str] = (),
        name: str | None = None,
    ) -> TestVg:
        disks = loop_disks(pvs, size)
        vg = TestVg(name or unique_vg_name(), disks, tuple(tags))
        created.append(vg)
        lvm.vgcreate(vg.name, vg.devices, tags=tags)
        return vg

    yield make

    errors: list[str] = []
    for vg in reversed(created):
        try:
            # Every loop device of this test is ours: a test may have vgextend-ed the VG.
            ours = [d.device for d in vg.disks] + [x.device for x in attached_under(tmp_path)]
            remove_vg_and_pvs(lvm, vg.name, sorted(set(ours)))
        except LvmError as exc:
            errors.append(f"{vg.name}: {exc}")
    if errors:
        pytest.fail("vg_factory teardown failed: " + "; ".join(errors), pytrace=False)
