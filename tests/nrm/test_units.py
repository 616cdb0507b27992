"""Small pieces: event dedupe, thin pool sizing, kernel-name patterns, the journal, the
offline daemon's reaction to a topology file change."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge_common.commands import run
from edge_common.lvm import VolumeGroup
from node_resource_manager.devices import HostPaths, expand_pattern
from node_resource_manager.events import Deduper
from node_resource_manager.executor import thin_pool_sizes
from node_resource_manager.identity import MediumIdentity
from node_resource_manager.journal import Journal, new_pv_uuid
from node_resource_manager.topology import ThinPoolSpec
from node_resource_manager.udev import UdevWatcher
from tests.nrm.conftest import ADMITTED, REPO, NrmRig, cli_env, entry, topology_text

MiB = 1 << 20


def test_deduper_admits_a_repeat_only_after_the_window() -> None:
    now = [0.0]
    dedupe = Deduper(repeat_after=60, clock=lambda: now[0])
    assert dedupe.admit("DeviceRejected", "sdb: ext4")
    assert not dedupe.admit("DeviceRejected", "sdb: ext4")
    assert dedupe.admit("DeviceRejected", "sdc: gpt")  # another message is another event
    now[0] = 61
    assert dedupe.admit("DeviceRejected", "sdb: ext4")


def _vg(size: int, free: int, extent: int = 4 * MiB) -> VolumeGroup:
    return VolumeGroup("vg", "u", size, free, extent, size // extent, free // extent, 1, 0)


def test_thin_pool_size_is_the_percentage_in_whole_extents_with_metadata_room() -> None:
    data, meta = thin_pool_sizes(_vg(10_000 * MiB, 10_000 * MiB), ThinPoolSpec("p", 90)) or (0, 0)
    assert data == (9000 * MiB // (4 * MiB)) * 4 * MiB
    assert meta == 12 * MiB  # 9000 MiB / 1000 = 9 MiB, rounded up to whole extents
    # A nearly full VG: the pool shrinks to what is free, keeping metadata and its spare.
    data, meta = thin_pool_sizes(_vg(1000 * MiB, 100 * MiB), ThinPoolSpec("p", 90)) or (0, 0)
    assert data + 2 * meta <= 100 * MiB and data > 0
    assert thin_pool_sizes(_vg(1000 * MiB, 8 * MiB), ThinPoolSpec("p", 90)) is None


def test_kernel_name_pattern_matches_block_devices_by_name(nrm: NrmRig) -> None:
    a, b = nrm.disks(2)
    name_a, name_b = a.device.removeprefix("/dev/"), b.device.removeprefix("/dev/")
    assert expand_pattern(name_a, HostPaths()) == [a.device]
    assert expand_pattern(f"/dev/{name_b}", HostPaths()) == [b.device]
    assert expand_pattern("no-such-disk-*", HostPaths()) == []


def test_journal_survives_a_restart_and_a_damaged_one_claims_nothing(tmp_path: Path) -> None:
    ident = MediumIdentity(rdev=(7 << 8) | 42, kname="x", size_sectors=2048, diskseq=9,
                           wwn=None, serial=None, backing_file="/img", boot_id="b1")
    pv_uuid = new_pv_uuid()
    journal = Journal(tmp_path)
    journal.add("vg1", pv_uuid, ident, "/dev/x")
    assert Journal(tmp_path).claims(pv_uuid, ident, "vg1")
    assert not Journal(tmp_path).claims(pv_uuid, ident, "vg2")
    assert not Journal(tmp_path).claims(new_pv_uuid(), ident, "vg1")
    Journal(tmp_path).done([pv_uuid])
    assert not Journal(tmp_path).claims(pv_uuid, ident, "vg1")
    journal.add("vg1", pv_uuid, ident, "/dev/x")
    (tmp_path / Journal.FILE).write_text("{not json")
    assert not Journal(tmp_path).claims(pv_uuid, ident, "vg1")


def test_journal_of_the_old_major_minor_format_claims_nothing(tmp_path: Path) -> None:
    """Version 1 keyed entries by major:minor, which a renumbered disk inherits."""
    (tmp_path / Journal.FILE).write_text('{"pending": {"7:42": {"vg": "vg1", "path": "/dev/x"}}}')
    assert Journal(tmp_path).pending() == {}


def test_journal_claims_only_the_same_medium() -> None:
    """UUID and medium must both match; the device number and name never count."""
    rec = MediumIdentity(rdev=(7 << 8) | 42, kname="loop5", size_sectors=2048, diskseq=9,
                         wwn=None, serial=None, backing_file="/img-a", boot_id="b1").to_dict()

    def now(**kw: object) -> MediumIdentity:
        base: dict[str, object] = dict(rdev=(7 << 8) | 42, kname="loop5", size_sectors=2048,
                                       diskseq=9, wwn=None, serial=None, backing_file="/img-a",
                                       boot_id="b1")
        base.update(kw)
        return MediumIdentity(**base)  # type: ignore[arg-type]

    assert now().same_medium_as(rec)
    assert now(rdev=(7 << 8) | 1, kname="loop1").same_medium_as(rec)  # renumbered: same medium
    assert now(diskseq=10).same_medium_as(rec)  # the same file attached again
    assert not now(backing_file="/img-b").same_medium_as(rec)  # same number, other medium
    assert not now(size_sectors=4096).same_medium_as(rec)
    # Without a persistent identifier only the diskseq of the same boot identifies.
    bare = dict(rec, backingFile=None)
    assert now(backing_file=None).same_medium_as(bare)
    assert not now(backing_file=None, diskseq=10).same_medium_as(bare)
    assert not now(diskseq=9, boot_id="b2", backing_file=None).same_medium_as(bare)
    disk = dict(bare, wwn="naa.5000c500a1b2c3d4")
    assert now(diskseq=3, boot_id="b2", backing_file=None,
               wwn="naa.5000c500a1b2c3d4").same_medium_as(disk)
    assert not now(backing_file=None, wwn="naa.5000c500ffffffff").same_medium_as(disk)


def test_offline_daemon_applies_a_topology_file_change(nrm: NrmRig) -> None:
    (disk,) = nrm.disks(1)
    vg = nrm.vg_name()
    args = nrm.cli_args(topology_text(), ADMITTED)
    topo = nrm.tmp / "topology.yaml"
    proc = subprocess.Popen(
        [sys.executable, "-m", "node_resource_manager", *args, "--resync-seconds", "3600",
         "--no-udev", "--debounce-seconds", "0.1"],
        cwd=REPO, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        topo.write_text(topology_text(entry(vg, [disk.device])))
        deadline = time.monotonic() + 30
        while nrm.pv_vg(disk.device) != vg:
            assert proc.poll() is None, "the agent exited"
            assert time.monotonic() < deadline, "the file change was not applied"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0


def test_udev_watcher_degrades_to_the_resync_when_netlink_is_unavailable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import pyudev

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError(93, "Protocol not supported")

    monkeypatch.setattr(pyudev.Monitor, "from_netlink", refuse)
    watcher = UdevWatcher(lambda why: None)
    assert watcher.start() is False
    assert watcher.source is None
    watcher.stop()  # harmless when never started


def test_udev_watcher_reports_a_change_of_our_disk(nrm: NrmRig) -> None:
    (disk,) = nrm.disks(1)
    seen: list[str] = []
    watcher = UdevWatcher(seen.append, udev_control=str(nrm.tmp / "no-udevd"))
    assert watcher.start() and watcher.source == "kernel"
    try:
        run(["losetup", "--set-capacity", disk.device], timeout=30)
        wanted = f"udev change {disk.device.removeprefix('/dev/')}"
        deadline = time.monotonic() + 10
        while wanted not in seen:
            assert time.monotonic() < deadline, f"no uevent for {disk.device}: {seen}"
            time.sleep(0.05)
    finally:
        watcher.stop()
