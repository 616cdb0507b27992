"""Reconcile against real LVM on this test's loop disks (offline, in-process)."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from edge_common.loopdisk import LoopDisk, write_gpt, write_signature
from edge_common.lvm import Lvm
from node_resource_manager.devices import host_path
from node_resource_manager.events import LogSink
from node_resource_manager.executor import VG_TAG
from node_resource_manager.plan import CreateThinPool, CreateVolumeGroup
from node_resource_manager.reconcile import Outcome
from node_resource_manager.safety import Reason
from tests.nrm.conftest import ADMITTED, GATE, NrmRig, entry, fingerprints, topology_text
from tests.rigs.lvm import VgFactory


def test_volume_group_is_created_from_the_listed_disks(nrm: NrmRig) -> None:
    disks = nrm.disks(2)
    vg = nrm.vg_name()
    sink = LogSink()
    result = nrm.reconcile(topology_text(entry(vg, [d.device for d in disks])), sink=sink)

    assert result.outcome is Outcome.CONVERGED, result.message
    found = nrm.lvm.get_vg(vg)
    assert found is not None and found.pv_count == 2
    assert VG_TAG in found.tags
    assert all(nrm.pv_vg(d.device) == vg for d in disks)
    assert [e[0] for e in sink.events] == ["VolumeGroupCreated"]
    (status_vg,) = result.status["volumeGroups"]
    assert status_vg["state"] == "Ready" and status_vg["size"] == found.size
    assert sorted(status_vg["pvs"]) == sorted(d.device for d in disks)

    again = nrm.reconcile(topology_text(entry(vg, [d.device for d in disks])))
    assert again.outcome is Outcome.CONVERGED
    assert again.plan is not None and again.plan.actions == []


def test_volume_group_is_extended_when_a_disk_is_added_to_the_config(nrm: NrmRig) -> None:
    a, b = nrm.disks(2)
    vg = nrm.vg_name()
    nrm.reconcile(topology_text(entry(vg, [a.device])))
    before = nrm.lvm.get_vg(vg)
    assert before is not None and before.pv_count == 1

    sink = LogSink()
    result = nrm.reconcile(topology_text(entry(vg, [a.device, b.device])), sink=sink)
    assert result.outcome is Outcome.CONVERGED, result.message
    after = nrm.lvm.get_vg(vg)
    assert after is not None and after.pv_count == 2 and after.size > before.size
    assert [e[0] for e in sink.events] == ["VolumeGroupExtended"]


def test_disk_removed_from_the_config_stays_in_the_vg_and_is_reported(nrm: NrmRig) -> None:
    a, b = nrm.disks(2)
    vg = nrm.vg_name()
    nrm.reconcile(topology_text(entry(vg, [a.device, b.device])))

    result = nrm.reconcile(topology_text(entry(vg, [a.device])))
    assert result.outcome is Outcome.CONVERGED
    assert nrm.pv_vg(b.device) == vg  # never vgreduce'd
    found = nrm.lvm.get_vg(vg)
    assert found is not None and found.pv_count == 2
    assert result.status["removedFromConfig"] == [{
        "volumeGroup": vg, "device": b.device,
        "note": "no longer listed; left in the volume group (never removed)"}]


# ---------------------------------------------------------------------- adversarial disks

Adversary = Callable[[NrmRig, LoopDisk, VgFactory], list[str]]


def _ext4(rig: NrmRig, disk: LoopDisk, _: VgFactory) -> list[str]:
    write_signature(disk.device, "ext4")
    return [disk.device]


def _gpt(rig: NrmRig, disk: LoopDisk, _: VgFactory) -> list[str]:
    write_gpt(disk.device)
    return [disk.device]


def _mounted(rig: NrmRig, disk: LoopDisk, _: VgFactory) -> list[str]:
    write_signature(disk.device, "ext4")
    rig.mount(disk.device)
    return [disk.device]


def _bind_mounted_block_volume(rig: NrmRig, disk: LoopDisk, _: VgFactory) -> list[str]:
    rig.bind_device(disk.device)
    return [disk.device]


def _pv_of_another_vg(rig: NrmRig, disk: LoopDisk, vg_factory: VgFactory) -> list[str]:
    other = vg_factory(pvs=1)
    return [other.devices[0]]


def _listed_twice(rig: NrmRig, disk: LoopDisk, _: VgFactory) -> list[str]:
    return [disk.device, rig.link("ata-twice", disk.device)]


def _link_to_in_use_device(rig: NrmRig, disk: LoopDisk, _: VgFactory) -> list[str]:
    write_signature(disk.device, "ext4")
    rig.mount(disk.device)
    return [rig.link("ata-in-use", disk.device)]


def _missing(rig: NrmRig, disk: LoopDisk, _: VgFactory) -> list[str]:
    return ["/dev/disk/by-id/no-such-disk"]


ADVERSARIES: dict[str, tuple[Adversary, set[Reason]]] = {
    "ext4 filesystem": (_ext4, {Reason.SIGNATURE}),
    "GPT partition table": (_gpt, {Reason.SIGNATURE}),
    "mounted device": (_mounted, {Reason.MOUNTED}),
    "bind-mounted raw block volume": (_bind_mounted_block_volume, {Reason.MOUNTED}),
    "PV of another VG": (_pv_of_another_vg, {Reason.OTHER_VG}),
    "device listed twice": (_listed_twice, {Reason.LISTED_TWICE}),
    "link to an in-use device": (_link_to_in_use_device, {Reason.MOUNTED}),
    "missing path": (_missing, {Reason.MISSING}),
}


@pytest.mark.parametrize("kind", list(ADVERSARIES))
def test_adversarial_disk_is_untouched_and_reported_with_its_reason(
    vg_factory: VgFactory, nrm: NrmRig, kind: str
) -> None:
    # (vg_factory first: its teardown, which removes PVs on all of the test's loop disks,
    # must run after the rig has removed the VG the agent built.)
    make, expected = ADVERSARIES[kind]
    good, bad = nrm.disks(2)
    listed = make(nrm, bad, vg_factory)
    on_host = [host_path(p, nrm.paths()) for p in listed]
    real = sorted({os.path.realpath(p) for p in on_host if os.path.exists(p)})
    before = {d: fingerprints_of(d) for d in real}
    vg = nrm.vg_name()
    sink = LogSink()

    result = nrm.reconcile(topology_text(entry(vg, [good.device, *listed])), sink=sink)

    assert result.outcome is Outcome.DEVICES_REFUSED, result.message
    assert {d: fingerprints_of(d) for d in real} == before, "an adversarial disk was touched"
    assert nrm.pv_vg(good.device) == vg  # the good disk was used all the same
    assert result.plan is not None
    refused = {r.listed: set(r.reasons) for r in result.plan.refusals}
    assert set(refused) == set(listed)
    assert all(reasons == expected for reasons in refused.values()), refused
    excluded = {e["device"] for e in result.status["excludedDevices"]}
    assert excluded == set(listed)
    rejected = [m for reason, m, _ in sink.events if reason == "DeviceRejected"]
    assert len(rejected) == len(listed)
    for device in real:
        if kind != "PV of another VG":
            assert nrm.pv_vg(device) is None


def fingerprints_of(device: str) -> bytes:
    from edge_common.loopdisk import device_fingerprint

    return device_fingerprint(device)


def test_device_listed_under_two_vgs_is_config_invalid_and_no_disk_is_touched(
    nrm: NrmRig,
) -> None:
    a, b = nrm.disks(2)
    link = nrm.link("wwn-0xshared", b.device)  # the same disk by another name
    vg1, vg2 = nrm.vg_name(), nrm.vg_name()
    before = fingerprints([a, b])
    sink = LogSink()

    result = nrm.reconcile(
        topology_text(entry(vg1, [a.device, b.device]), entry(vg2, [link])), sink=sink
    )

    assert result.outcome is Outcome.CONFIG_INVALID
    assert result.problems == [
        f"device {b.device} ({os.major(b.devno)}:{os.minor(b.devno)}) is claimed by volume "
        f"groups {min(vg1, vg2)!r} and {max(vg1, vg2)!r}; a device can belong to one volume "
        "group only"
    ]
    assert fingerprints([a, b]) == before
    assert nrm.lvm.get_vg(vg1) is None and nrm.lvm.get_vg(vg2) is None
    assert [e[0] for e in sink.events] == ["ConfigInvalid"]
    assert result.status["result"] == "ConfigInvalid"
    assert result.status["problems"] == result.problems


@pytest.mark.parametrize(
    ("text", "problem_start"),
    [
        ("volumegroup:\n- name: [unclosed\n", "invalid YAML: "),
        ("- {name: VG, key: t, operator: Equal, value: x, "
         "topology: {type: device, devices: [DEV]}}", "volumegroup[0] (VG): unknown operator"),
        ("- {name: VG, topology: {type: device, devices: [DEV]}}",
         "volumegroup[0] (VG): missing required field 'key'"),
        ("- {name: VG, key: t, operator: Exists, topology: {type: device, devices: [DEV]}}\n"
         "- {name: VG, key: t, operator: Exists, topology: {type: device, devices: [DEV]}}\n",
         "volumegroup[1] (VG): duplicate volume group name"),
    ],
    ids=["invalid YAML", "unknown operator", "missing field", "duplicate VG name"],
)
def test_bad_config_is_reported_as_config_invalid_and_no_disk_is_touched(
    nrm: NrmRig, text: str, problem_start: str
) -> None:
    (disk,) = nrm.disks(1)
    vg = nrm.vg_name()
    text = text.replace("VG", vg).replace("DEV", disk.device)
    problem_start = problem_start.replace("VG", vg)
    before = fingerprints([disk])
    sink = LogSink()

    result = nrm.reconcile(text, {**ADMITTED, "t": "x"}, sink=sink)

    assert result.outcome is Outcome.CONFIG_INVALID
    assert result.problems and result.problems[0].startswith(problem_start), result.problems
    assert fingerprints([disk]) == before
    assert nrm.lvm.get_vg(vg) is None
    (event,) = sink.events
    assert event[0] == "ConfigInvalid" and problem_start in event[1] and event[2]
    assert result.status["problems"][0].startswith(problem_start)


def test_node_without_the_gate_label_is_left_alone(nrm: NrmRig) -> None:
    (disk,) = nrm.disks(1)
    vg = nrm.vg_name()
    result = nrm.reconcile(topology_text(entry(vg, [disk.device])), {"storage": "lvm"})
    assert result.outcome is Outcome.NOT_ADMITTED
    assert nrm.pv_vg(disk.device) is None
    assert result.status["admitted"] is False

    result = nrm.reconcile(topology_text(entry(vg, [disk.device])),
                           {"storage": "lvm", GATE: "false"})
    assert result.outcome is Outcome.NOT_ADMITTED
    assert nrm.lvm.get_vg(vg) is None


def test_pattern_uses_only_disks_that_pass_every_check(nrm: NrmRig) -> None:
    blank, formatted = nrm.disks(2)
    write_signature(formatted.device, "ext4")
    nrm.link("nvme-test-blank", blank.device)
    nrm.link("nvme-test-formatted", formatted.device)
    nrm.link("other-disk", formatted.device)
    before = fingerprints([formatted])
    vg = nrm.vg_name()
    spec = entry(vg, [])
    spec["topology"] = {"type": "pattern", "patterns": ["/dev/disk/by-id/nvme-test-*"]}

    result = nrm.reconcile(topology_text(spec))

    assert result.outcome is Outcome.CONVERGED, result.message  # matches are not "refusals"
    assert nrm.pv_vg(blank.device) == vg
    assert fingerprints([formatted]) == before
    assert result.plan is not None
    assert [(s.listed, s.reasons) for s in result.plan.skipped] == [
        ("/dev/disk/by-id/nvme-test-formatted", (Reason.SIGNATURE,))]


def test_thin_pool_is_planned_with_the_volume_group(nrm: NrmRig) -> None:
    (disk,) = nrm.disks(1)
    vg = nrm.vg_name()
    spec = entry(vg, [disk.device],
                 thinPool={"name": "pool0", "sizePercent": 80, "overprovisionRatio": 3})
    result = nrm.reconcile(topology_text(spec), dry_run=True)
    assert result.plan is not None
    kinds = [type(a) for a in result.plan.actions]
    assert kinds == [CreateVolumeGroup, CreateThinPool]
    assert nrm.lvm.get_vg(vg) is None  # dry run


def test_dry_run_changes_nothing(nrm: NrmRig) -> None:
    disks = nrm.disks(2)
    before = fingerprints(disks)
    vg = nrm.vg_name()
    sink = LogSink()
    result = nrm.reconcile(topology_text(entry(vg, [d.device for d in disks])), dry_run=True,
                           sink=sink)
    assert result.plan is not None and len(result.plan.actions) == 1
    assert fingerprints(disks) == before
    assert nrm.lvm.get_vg(vg) is None
    assert sink.events == [] and sink.last_status is None
    assert not nrm.state_dir.exists()


def _recording_lvm(tmp: Path, fail_on: str, exit_code: int = 5) -> tuple[Lvm, Path]:
    """lvm behind a prefix script that logs each sub-command and fails ``fail_on``."""
    log = tmp / "lvm-calls.log"
    script = tmp / "lvm-wrapper.sh"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> "{log}"\n'
        f'if [ "$1" = "{fail_on}" ]; then echo "  injected failure of $1" >&2; '
        f"exit {exit_code}; fi\n"
        'exec lvm "$@"\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return Lvm(Lvm.settings_for_this_kernel(command=(str(script),))), log


def test_lvm_report_failure_is_unknown_state_and_nothing_is_changed(nrm: NrmRig) -> None:
    (disk,) = nrm.disks(1)
    vg = nrm.vg_name()
    nrm.lvm, log = _recording_lvm(nrm.tmp, "fullreport")
    sink = LogSink()
    result = nrm.reconcile(topology_text(entry(vg, [disk.device])), sink=sink)
    assert result.outcome is Outcome.LVM_ERROR
    assert "state unknown" in result.message
    assert [c.split()[0] for c in log.read_text().splitlines()] == ["fullreport"]
    assert [e[0] for e in sink.events] == ["LvmCommandFailed"]


def test_failed_vgcreate_is_an_lvm_error_and_the_next_run_converges(nrm: NrmRig) -> None:
    (disk,) = nrm.disks(1)
    vg = nrm.vg_name()
    real_lvm = nrm.lvm
    nrm.lvm, log = _recording_lvm(nrm.tmp, "vgcreate")
    result = nrm.reconcile(topology_text(entry(vg, [disk.device])))
    assert result.outcome is Outcome.LVM_ERROR
    assert "injected failure of vgcreate" in result.message
    calls = [c.split()[0] for c in log.read_text().splitlines()]
    assert calls[:3] == ["fullreport", "pvcreate", "vgcreate"]
    assert nrm.pv_vg(disk.device) == ""  # an orphan PV, recorded in the journal

    nrm.lvm = real_lvm
    result = nrm.reconcile(topology_text(entry(vg, [disk.device])))
    assert result.outcome is Outcome.CONVERGED, result.message
    assert nrm.pv_vg(disk.device) == vg
    assert json.loads((nrm.state_dir / "pending-pvs.json").read_text())["pending"] == {}


def test_repeated_refusal_emits_one_event(nrm: NrmRig) -> None:
    good, bad = nrm.disks(2)
    write_signature(bad.device, "ext4")
    vg = nrm.vg_name()
    sink = LogSink()
    for _ in range(3):
        nrm.reconcile(topology_text(entry(vg, [good.device, bad.device])), sink=sink)
    assert sorted(e[0] for e in sink.events) == ["DeviceRejected", "VolumeGroupCreated"]


def test_metrics_show_volume_groups_and_rejections(nrm: NrmRig) -> None:
    good, bad = nrm.disks(2)
    write_signature(bad.device, "ext4")
    vg = nrm.vg_name()
    reconciler = nrm.reconciler()
    from node_resource_manager.sources import config_from_text

    reconciler.reconcile(config_from_text(
        topology_text(entry(vg, [good.device, bad.device])), "test", "1"), ADMITTED)
    registry = reconciler.metrics.registry  # type: ignore[union-attr]
    found = nrm.lvm.get_vg(vg)
    assert found is not None
    assert registry.get_sample_value("nrm_volume_group_size_bytes", {"vg": vg}) == found.size
    assert registry.get_sample_value("nrm_volume_group_free_bytes", {"vg": vg}) == found.free
    assert registry.get_sample_value("nrm_devices_rejected", {"reason": "HasSignature"}) == 1
    assert registry.get_sample_value("nrm_reconciles_total", {"result": "DevicesRefused"}) == 1
    assert registry.get_sample_value("nrm_lvm_actions_total",
                                     {"action": "CreateVolumeGroup", "result": "ok"}) == 1


def test_agent_never_runs_destructive_commands_or_force_flags(nrm: NrmRig) -> None:
    a, b, c = nrm.disks(3)
    write_signature(c.device, "ext4")
    vg = nrm.vg_name()
    nrm.lvm, log = _recording_lvm(nrm.tmp, "none")
    nrm.reconcile(topology_text(entry(vg, [a.device, c.device])))  # create, refuse c
    nrm.reconcile(topology_text(entry(vg, [a.device, b.device])))  # extend
    nrm.reconcile(topology_text(entry(vg, [b.device])))  # a removed from the config
    calls = [line.split() for line in log.read_text().splitlines()]
    subcommands = [call[0] for call in calls]
    assert {"pvcreate", "vgcreate", "vgextend"} <= set(subcommands)
    assert not {"vgremove", "vgreduce", "pvremove", "lvremove"} & set(subcommands)
    flags = {arg for call in calls for arg in call}
    assert not {"-f", "-ff", "--force", "-y", "--yes"} & flags
    assert nrm.pv_vg(a.device) == vg


def test_journal_that_cannot_be_written_stops_before_pvcreate(nrm: NrmRig) -> None:
    (disk,) = nrm.disks(1)
    vg = nrm.vg_name()
    nrm.state_dir = nrm.tmp / "not-a-directory"
    nrm.state_dir.write_text("")
    before = fingerprints([disk])
    result = nrm.reconcile(topology_text(entry(vg, [disk.device])))
    assert result.outcome is Outcome.ERROR and result.outcome.exit_code == 3
    assert "state unknown" in result.message
    assert fingerprints([disk]) == before and nrm.pv_vg(disk.device) is None
