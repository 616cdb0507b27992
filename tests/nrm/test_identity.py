"""A disk is identified, not named: the medium is pinned from its first check to the end of the
LVM write, re-verified right before it, and the journal follows the medium, not the number.

Real loop devices and real LVM. The medium is swapped by re-binding a loop device to another
backing file (what a hot-swap or a renumbering does to a name and a device number), at the
moment pvcreate starts (a wrapper around lvm, the LVM command prefix), or between the safety
checks and the write (a wrapper around wipefs, the last probe)."""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_common.commands import run
from edge_common.loopdisk import backing_file_of, write_signature
from edge_common.lvm import Lvm
from node_resource_manager.devices import HostPaths, resolve
from node_resource_manager.events import LogSink
from node_resource_manager.identity import IdentityUnknown, Pins, read_identity
from node_resource_manager.journal import Journal
from node_resource_manager.metrics import Metrics
from node_resource_manager.plan import Planner
from node_resource_manager.reconcile import Outcome, Reconciler
from node_resource_manager.safety import Reason, SafetyChecker
from node_resource_manager.sources import config_from_text
from node_resource_manager.topology import parse_topology
from tests.nrm.conftest import ADMITTED, GATE, NrmRig, entry, topology_text

MiB = 1 << 20
LABEL = b"LABELONE"


def _script(path: Path, body: str) -> str:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def _image(path: Path, size: int = 64 * MiB) -> Path:
    with open(path, "wb") as fh:
        fh.truncate(size)
    return path


def _has_label(path: str | Path) -> bool:
    """LVM's PV label is in one of the first four sectors; read the FILE, not the device."""
    with open(path, "rb") as fh:
        return LABEL in fh.read(4 * 512)


def _attach(image: Path, device: str | None = None) -> str:
    argv = ["losetup", device, str(image)] if device else ["losetup", "--find", "--show",
                                                           str(image)]
    out = run(argv, timeout=30).stdout_text.strip()
    return device or out


def _detach(device: str, image: Path) -> None:
    if backing_file_of(device) == str(image):
        run(["losetup", "--detach", device], timeout=30)


@contextlib.contextmanager
def _attached(image: Path) -> Iterator[str]:
    device = _attach(image)
    try:
        yield device
    finally:
        _detach(device, image)


def _swapping_lvm(tmp: Path, device: str, other: Path) -> tuple[Lvm, Path]:
    """lvm behind a prefix that, when pvcreate starts, re-binds ``device`` to ``other``
    (detach, attach the other file under the same name and number) and logs whether the
    kernel let it."""
    log = tmp / "swap.log"
    script = _script(tmp / "swapping-lvm", f"""
if [ "$1" = pvcreate ]; then
  losetup --detach {device}
  if losetup {device} {other} 2>>"{log}"; then echo swapped >> "{log}"
  else echo refused >> "{log}"; fi
fi
exec lvm "$@"
""")
    return Lvm(Lvm.settings_for_this_kernel(command=(script,))), log


def test_control_without_a_hold_the_swap_at_pvcreate_writes_the_other_medium(
    nrm: NrmRig,
) -> None:
    """The rig really swaps: a bare pvcreate through it labels the OTHER file (the bug the
    hold prevents). Without this, the next test could pass without holding anything."""
    checked = _image(nrm.tmp / "checked.img")
    other = _image(nrm.tmp / "other.img")
    device = _attach(checked)
    try:
        lvm, log = _swapping_lvm(nrm.tmp, device, other)
        lvm.pvcreate([device])
        assert log.read_text().split() == ["swapped"]
        assert _has_label(other) and not _has_label(checked)
        nrm.lvm.command("pvremove", "--yes", "--", device)
    finally:
        _detach(device, other)
        _detach(device, checked)


def test_medium_swapped_at_the_moment_pvcreate_starts_is_never_written(nrm: NrmRig) -> None:
    """The agent holds the device open from its first check to the end of the LVM write:
    the kernel refuses to re-bind it, so pvcreate writes the medium that was checked and the
    other medium gets no LABELONE."""
    checked = _image(nrm.tmp / "checked.img")
    other = _image(nrm.tmp / "other.img")
    device = _attach(checked)
    try:
        vg = nrm.vg_name()
        nrm.lvm, log = _swapping_lvm(nrm.tmp, device, other)
        result = nrm.reconcile(topology_text(entry(vg, [device])))
        assert log.read_text().split()[-1] == "refused"
        assert "busy" in log.read_text()
        assert not _has_label(other)
        assert _has_label(checked)
        assert result.outcome is Outcome.CONVERGED, result.message
        # The requested detach happens once the agent let go: nothing else was touched.
        assert backing_file_of(device) in (None, str(checked))
    finally:
        _detach(device, checked)
        _detach(device, other)


def test_medium_changed_between_the_checks_and_the_write_is_refused(nrm: NrmRig) -> None:
    """The size of one disk changes right after its last probe: re-verified before pvcreate,
    it is refused this round (status, Event), never written; the other disk is used."""
    changing, steady = nrm.disks(2)
    vg = nrm.vg_name()
    wipefs = _script(nrm.tmp / "wipefs-then-grow", f"""
wipefs "$@"; rc=$?
if [ "$3" = {changing.device} ]; then
  truncate -s +4M {changing.path}; losetup --set-capacity {changing.device}
fi
exit $rc
""")
    sink = LogSink()
    result = nrm.reconcile(topology_text(entry(vg, [changing.device, steady.device])),
                           sink=sink, wipefs=(wipefs,))
    assert result.outcome is Outcome.DEVICES_REFUSED, result.message
    (refused,) = result.status["excludedDevices"]
    assert refused["device"] == changing.device
    assert [r["reason"] for r in refused["reasons"]] == [Reason.IDENTITY_CHANGED]
    assert "size_sectors 131072 -> 139264" in refused["reasons"][0]["message"]
    assert any(e[0] == "DeviceRejected" and "IdentityChanged" in e[1] for e in sink.events)
    assert nrm.pv_vg(changing.device) is None
    with open(changing.path, "rb") as fh:
        assert fh.read(MiB) == bytes(MiB)  # not one byte written
    assert nrm.pv_vg(steady.device) == vg


def test_journal_follows_the_medium_not_the_device_number(nrm: NrmRig) -> None:
    """An interrupted run leaves our orphan PV. A foreign orphan PV that later sits under the
    same name and device number is a stranger; our medium, back under another number, is
    recognised by its PV UUID and backing file and finished."""
    ours = _image(nrm.tmp / "ours.img")
    foreign = _image(nrm.tmp / "foreign.img")
    vg = nrm.vg_name()
    real = nrm.lvm
    failing = _script(nrm.tmp / "no-vgcreate", 'if [ "$1" = vgcreate ]; then exit 5; fi\n'
                                              'exec lvm "$@"\n')
    device = _attach(ours)
    try:
        nrm.lvm = Lvm(Lvm.settings_for_this_kernel(command=(failing,)))
        assert nrm.reconcile(topology_text(entry(vg, [device]))).outcome is Outcome.LVM_ERROR
        nrm.lvm = real
        (pv,) = [p for p in real.pvs() if p.name == device]
        assert Journal(nrm.state_dir).pending().keys() == {pv.uuid}
        _detach(device, ours)

        _attach(foreign, device)  # someone else's orphan PV, same name, same number
        real.pvcreate([device])
        with _attached(ours) as renumbered:
            assert renumbered != device
            result = nrm.reconcile(topology_text(entry(vg, [device, renumbered])))
            (refused,) = result.plan.refusals if result.plan else []
            assert refused.listed == device
            assert refused.reasons == (Reason.UNCLAIMED_PV,)
            assert nrm.pv_vg(device) == "" and nrm.pv_vg(renumbered) == vg
            assert Journal(nrm.state_dir).pending() == {}
            real.command("vgremove", "--yes", "--", vg)
            real.command("pvremove", "--yes", "--", renumbered)
        real.command("pvremove", "--yes", "--", device)
    finally:
        _detach(device, ours)
        _detach(device, foreign)


def test_a_copy_of_our_orphan_pv_on_another_medium_is_a_stranger(nrm: NrmRig) -> None:
    """Same PV UUID (a disk cloned with dd), other medium: the UUID alone proves nothing."""
    ours = _image(nrm.tmp / "ours.img")
    vg = nrm.vg_name()
    real = nrm.lvm
    failing = _script(nrm.tmp / "no-vgcreate", 'if [ "$1" = vgcreate ]; then exit 5; fi\n'
                                              'exec lvm "$@"\n')
    with _attached(ours) as device:
        nrm.lvm = Lvm(Lvm.settings_for_this_kernel(command=(failing,)))
        nrm.reconcile(topology_text(entry(vg, [device])))
        nrm.lvm = real
    clone = nrm.tmp / "clone.img"
    clone.write_bytes(ours.read_bytes())
    with _attached(clone) as copy:
        result = nrm.reconcile(topology_text(entry(vg, [copy])))
        assert result.outcome is Outcome.DEVICES_REFUSED
        assert result.plan is not None
        assert [r.reasons for r in result.plan.refusals] == [(Reason.UNCLAIMED_PV,)]
        assert nrm.pv_vg(copy) == ""
        real.command("pvremove", "--yes", "--", copy)


def test_pin_records_diskseq_size_and_backing_file_and_refuses_a_reused_name(
    nrm: NrmRig,
) -> None:
    (disk,) = nrm.disks(1)
    dev = resolve(disk.device, nrm.paths())
    name = disk.device.removeprefix("/dev/")
    with Pins(nrm.paths()) as pins:
        pinned = pins.pin(dev)
        ident = pinned.identity
        assert ident.rdev == disk.devno and ident.kname == name
        assert ident.size_sectors == 64 * MiB // 512
        assert ident.backing_file == str(disk.path)
        seq = Path(f"/sys/class/block/{name}/diskseq")
        if seq.exists():
            assert ident.diskseq == int(seq.read_text())
        assert pinned.verify(nrm.paths()) == []
        # A by-diskseq link that leads to this device is what LVM is given ...
        if ident.diskseq is not None:
            by_seq = nrm.dev_disk / "by-diskseq"
            by_seq.mkdir()
            (by_seq / str(ident.diskseq)).symlink_to(disk.device)
            with Pins(nrm.paths()) as again:
                relinked = again.pin(dev)
                assert relinked.device.lvm_path == f"/dev/disk/by-diskseq/{ident.diskseq}"
                # ... and a link that now leads elsewhere is caught before the write.
                (by_seq / str(ident.diskseq)).unlink()
                (by_seq / str(ident.diskseq)).symlink_to("/dev/null")
                assert any("now leads to" in p for p in relinked.verify(nrm.paths()))
    # The name of the config now leads to another device number: the pin refuses.
    other = nrm.disks(1)[0]
    moved = dev.__class__(listed=dev.listed, rdev=dev.rdev, kname=dev.kname, path=other.device)
    with Pins(nrm.paths()) as pins, pytest.raises(IdentityUnknown, match="changed between"):
        pins.pin(moved)


def test_identity_unknown_without_sysfs_refuses_the_device(nrm: NrmRig) -> None:
    """A sysfs tree that does not know the device's size: no identity, never used."""
    (disk,) = nrm.disks(1)
    mm = f"{os.major(disk.devno)}:{os.minor(disk.devno)}"
    fake = nrm.tmp / "sys"
    node = fake / "devices" / "virtual" / "block" / disk.device.removeprefix("/dev/")
    node.mkdir(parents=True)
    (fake / "dev" / "block").mkdir(parents=True)
    (fake / "dev" / "block" / mm).symlink_to(node)
    with pytest.raises(IdentityUnknown, match="no readable size"):
        read_identity(disk.devno, HostPaths(sys=fake))
    paths = HostPaths(sys=fake, dev_disk=nrm.dev_disk)
    reconciler = Reconciler(
        node_name="node-a", lvm=nrm.lvm, checker=SafetyChecker(nrm.safety_settings(paths=paths)),
        journal=Journal(nrm.state_dir), paths=paths, gate_key=GATE, gate_value="true",
        sink=LogSink(), metrics=Metrics())
    vg = nrm.vg_name()
    result = reconciler.reconcile(config_from_text(topology_text(entry(vg, [disk.device])),
                                                   "test", "1"), ADMITTED)
    assert result.plan is not None
    assert [r.reasons for r in result.plan.refusals] == [(Reason.IDENTITY_UNKNOWN,)]
    assert nrm.pv_vg(disk.device) is None


def test_lvm_is_handed_the_by_diskseq_link_when_the_host_has_it(nrm: NrmRig) -> None:
    """With udev's /dev/disk/by-diskseq/N link (made here by hand in the host's /dev; removed
    afterwards), pvcreate and vgcreate get that name, which can never lead to another
    medium; LVM reports the PV under its kernel name."""
    (disk,) = nrm.disks(1)
    name = disk.device.removeprefix("/dev/")
    seq_file = Path(f"/sys/class/block/{name}/diskseq")
    if not seq_file.exists():
        pytest.skip("kernel without diskseq (< 5.15)")
    seq = int(seq_file.read_text())
    by_seq = Path("/dev/disk/by-diskseq")
    made = [d for d in (by_seq.parent, by_seq) if not d.exists()]
    link = by_seq / str(seq)
    for d in made:
        d.mkdir()
    try:
        link.symlink_to(f"../../{name}")
        log = nrm.tmp / "argv.log"
        wrapper = _script(nrm.tmp / "recording-lvm", f'echo "$@" >> "{log}"\nexec lvm "$@"\n')
        nrm.lvm = Lvm(Lvm.settings_for_this_kernel(command=(wrapper,)))
        vg = nrm.vg_name()
        reconciler = Reconciler(
            node_name="node-a", lvm=nrm.lvm, checker=SafetyChecker(nrm.safety_settings()),
            journal=Journal(nrm.state_dir), paths=HostPaths(), gate_key=GATE,
            gate_value="true", sink=LogSink(), metrics=Metrics())
        result = reconciler.reconcile(config_from_text(
            topology_text(entry(vg, [disk.device])), "test", "1"), ADMITTED)
        assert result.outcome is Outcome.CONVERGED, result.message
        writes = [line.split() for line in log.read_text().splitlines()
                  if line.split()[0] in ("pvcreate", "vgcreate")]
        assert [(w[0], w[-1]) for w in writes] == [("pvcreate", str(link)),
                                                   ("vgcreate", str(link))]
        assert result.status["volumeGroups"][0]["pvs"] == [disk.device]
    finally:
        link.unlink(missing_ok=True)
        for d in reversed(made):
            d.rmdir()


def test_wwn_and_serial_from_udevs_database_are_part_of_the_identity(nrm: NrmRig) -> None:
    """Where sysfs has no WWN or serial (loop devices here), udev's recorded ID_WWN and
    ID_SERIAL identify the medium; a different answer at write time is another medium."""
    (disk,) = nrm.disks(1)
    udev = nrm.tmp / "udev-data"
    udev.mkdir()
    entry_file = udev / f"b{os.major(disk.devno)}:{os.minor(disk.devno)}"
    entry_file.write_text("S:disk/by-id/wwn-0x5000c500a1b2c3d4\nE:ID_WWN=0x5000c500a1b2c3d4\n"
                          "E:ID_SERIAL=ST4000NM_Z1Z2Z3\nE:ID_TYPE=disk\n")
    paths = HostPaths(dev_disk=nrm.dev_disk, udev_data=udev)
    with Pins(paths) as pins:
        pinned = pins.pin(resolve(disk.device, paths))
        assert (pinned.identity.wwn, pinned.identity.serial) == ("0x5000c500a1b2c3d4",
                                                                 "ST4000NM_Z1Z2Z3")
        assert pinned.verify(paths) == []
        entry_file.write_text("E:ID_WWN=0x5000c500ffffffff\nE:ID_SERIAL=ST4000NM_OTHER\n")
        assert pinned.verify(paths) == [
            "wwn 0x5000c500a1b2c3d4 -> 0x5000c500ffffffff",
            "serial ST4000NM_Z1Z2Z3 -> ST4000NM_OTHER"]


def test_medium_changed_after_its_pvcreate_stays_out_of_the_vg_and_in_the_journal(
    nrm: NrmRig,
) -> None:
    """Verified again before vgcreate: a disk whose medium changed right after its pvcreate
    is left out of the VG (the others go in); its journal entry stays, so it is reported and
    never silently adopted by a later run on another medium."""
    changing, steady = nrm.disks(2)
    vg = nrm.vg_name()
    wrapper = _script(nrm.tmp / "grow-after-pvcreate", f"""
lvm "$@"; rc=$?
for last; do :; done
if [ "$1" = pvcreate ] && [ "$(readlink -f "$last")" = {changing.device} ]; then
  truncate -s +4M {changing.path}; losetup --set-capacity {changing.device}
fi
exit $rc
""")
    nrm.lvm = Lvm(Lvm.settings_for_this_kernel(command=(wrapper,)))
    result = nrm.reconcile(topology_text(entry(vg, [changing.device, steady.device])))
    assert result.outcome is Outcome.DEVICES_REFUSED, result.message
    assert [(d["device"], [r["reason"] for r in d["reasons"]])
            for d in result.status["excludedDevices"]] == [
        (changing.device, [Reason.IDENTITY_CHANGED])]
    assert nrm.pv_vg(steady.device) == vg and nrm.pv_vg(changing.device) == ""
    (orphan,) = [pv for pv in nrm.lvm.pvs() if pv.name == changing.device]
    pending = Journal(nrm.state_dir).pending()
    assert list(pending) == [orphan.uuid]
    # Its medium is not the one recorded any more: a stranger from now on.
    again = nrm.reconcile(topology_text(entry(vg, [changing.device, steady.device])))
    assert again.plan is not None
    assert [r.reasons for r in again.plan.refusals] == [(Reason.UNCLAIMED_PV,)]


def test_only_the_devices_to_be_written_stay_held_after_planning(nrm: NrmRig) -> None:
    good, bad = nrm.disks(2)
    write_signature(bad.device, "ext4")
    vg = nrm.vg_name()
    paths = nrm.paths()
    checker = SafetyChecker(nrm.safety_settings())
    planner = Planner(checker, Journal(None), paths)
    report = nrm.lvm.report()
    specs = parse_topology(topology_text(entry(vg, [good.device, bad.device]))).for_node(
        ADMITTED)
    with Pins(paths) as pins:
        plan = planner.plan(specs, report, checker.snapshot(report.pvs), pins)
        assert [r.listed for r in plan.refusals] == [bad.device]
        assert [p.device.node for p in pins] == [good.device]
        held = [os.readlink(f"/proc/self/fd/{p.fd}") for p in pins]
        assert held == [good.device]
