"""Every probe the agent cannot complete excludes the new devices it concerns, with a reason;
an unreadable answer never counts as "nothing there". Existing volume groups are still
reported. Real loop devices; the unreadable answers are made by path options (a mount table
or swap list that cannot be read, a probe command that errors, a sysfs tree that lacks a
file) and by the mount namespace check."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from edge_common.loopdisk import device_fingerprint
from node_resource_manager.devices import HostPaths
from node_resource_manager.reconcile import Outcome
from node_resource_manager.safety import Reason, namespace_problems
from node_resource_manager.sources import config_from_text
from tests.nrm.conftest import ADMITTED, NrmRig, entry, topology_text

MiB = 1 << 20


def _script(path: Path, body: str) -> str:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def _reasons(result: object) -> list[tuple[str, list[str]]]:
    status = result.status  # type: ignore[attr-defined]
    return [(d["device"], [r["reason"] for r in d["reasons"]])
            for d in status["excludedDevices"]]


def test_unreadable_mount_table_excludes_a_bind_mounted_raw_block_volume(nrm: NrmRig) -> None:
    """The reported bug: with the mount tables unreadable, a raw block volume in use by a pod
    (no signature, only a bind mount gives it away) was planned for pvcreate."""
    (disk,) = nrm.disks(1)
    nrm.bind_device(disk.device)
    vg = nrm.vg_name()
    before = device_fingerprint(disk.device)
    unreadable = str(nrm.tmp)  # a directory: open() fails
    result = nrm.reconcile(topology_text(entry(vg, [disk.device])), dry_run=True,
                           mount_tables=(unreadable,))
    assert result.outcome is Outcome.DEVICES_REFUSED
    assert result.plan is not None and result.plan.actions == []
    assert _reasons(result) == [(disk.device, [Reason.HOST_STATE_UNKNOWN])]
    message = result.status["excludedDevices"][0]["reasons"][0]["message"]
    assert f"mount table {unreadable} cannot be read" in message
    result = nrm.reconcile(topology_text(entry(vg, [disk.device])), mount_tables=(unreadable,))
    assert device_fingerprint(disk.device) == before and nrm.pv_vg(disk.device) is None


def test_unknown_host_state_refuses_new_devices_and_still_reports_existing_vgs(
    nrm: NrmRig,
) -> None:
    first, second = nrm.disks(2)
    vg = nrm.vg_name()
    assert nrm.reconcile(topology_text(entry(vg, [first.device]))).outcome is Outcome.CONVERGED
    result = nrm.reconcile(topology_text(entry(vg, [first.device, second.device])),
                           swaps_file=str(nrm.tmp / "no-such-swaps"))
    assert result.outcome is Outcome.DEVICES_REFUSED
    assert _reasons(result) == [(second.device, [Reason.HOST_STATE_UNKNOWN])]
    assert "swap list" in result.status["excludedDevices"][0]["reasons"][0]["message"]
    (reported,) = result.status["volumeGroups"]
    assert reported["state"] == "Ready" and reported["pvs"] == [first.device]
    assert nrm.pv_vg(second.device) is None


def test_active_swap_that_cannot_be_found_is_unknown(nrm: NrmRig) -> None:
    (disk,) = nrm.disks(1)
    swaps = nrm.tmp / "swaps"
    swaps.write_text("Filename\tType\tSize\tUsed\tPriority\n"
                     "/dev/not-visible-here\tpartition\t1024\t0\t-2\n")
    result = nrm.reconcile(topology_text(entry(nrm.vg_name(), [disk.device])), dry_run=True,
                           swaps_file=str(swaps))
    assert _reasons(result) == [(disk.device, [Reason.HOST_STATE_UNKNOWN])]


@pytest.mark.parametrize("probe,body,expected", [
    ("blkid", "echo 'blkid: I/O error' >&2; exit 4\n", "blkid -p exited 4"),
    ("wipefs", "echo 'wipefs: cannot open' >&2; exit 1\n", "wipefs -n exited 1"),
    ("wipefs", "echo 'not json'\n", "cannot read wipefs output"),
    ("blkid", "exec sleep 30\n", "blkid -p failed"),
])
def test_a_probe_that_errors_refuses_the_device(nrm: NrmRig, probe: str, body: str,
                                               expected: str) -> None:
    (disk,) = nrm.disks(1)
    script = _script(nrm.tmp / f"broken-{probe}", body)
    result = nrm.reconcile(topology_text(entry(nrm.vg_name(), [disk.device])),
                           probe_timeout=1.0, **{probe: (script,)})
    assert _reasons(result) == [(disk.device, [Reason.PROBE_FAILED])]
    assert expected in result.status["excludedDevices"][0]["reasons"][0]["message"]
    assert nrm.pv_vg(disk.device) is None


def test_sysfs_that_does_not_answer_refuses_the_device(nrm: NrmRig) -> None:
    """The device's sysfs directory exists and gives its size, but not its read-only flag
    nor its holders: unknown, never "writable and unheld"."""
    (disk,) = nrm.disks(1)
    name = disk.device.removeprefix("/dev/")
    fake = nrm.tmp / "sys"
    node = fake / "devices" / "virtual" / "block" / name
    node.mkdir(parents=True)
    (node / "size").write_text(str(64 * MiB // 512))
    (node / "holders").write_text("")  # not a directory: cannot be listed
    (fake / "dev" / "block").mkdir(parents=True)
    (fake / "dev" / "block" / f"{os.major(disk.devno)}:{os.minor(disk.devno)}").symlink_to(node)
    (fake / "class" / "block").mkdir(parents=True)
    paths = HostPaths(sys=fake, dev_disk=nrm.dev_disk)
    result = nrm.reconcile(topology_text(entry(nrm.vg_name(), [disk.device])), paths=paths)
    assert _reasons(result) == [(disk.device, [Reason.PROBE_FAILED])]
    message = result.status["excludedDevices"][0]["reasons"][0]["message"]
    assert "ro, holders unreadable" in message


def test_agent_outside_the_expected_mount_namespace_uses_no_new_device(nrm: NrmRig) -> None:
    """Configured for a hostPID pod but PID 1 shares the agent's mount namespace: /proc/1's
    mount table is not the host's, so nothing new is used."""
    (disk,) = nrm.disks(1)
    assert namespace_problems("host") == []  # the test runs in the host's namespace
    result = nrm.reconcile(topology_text(entry(nrm.vg_name(), [disk.device])), dry_run=True,
                           mount_namespace="hostpid")
    assert _reasons(result) == [(disk.device, [Reason.HOST_STATE_UNKNOWN])]
    assert "does not run with hostPID" in result.status["excludedDevices"][0]["reasons"][0][
        "message"]


def test_mount_namespace_check_compares_pid_1_with_the_agent(tmp_path: Path) -> None:
    for pid, ns in (("1", "mnt:[4026531840]"), ("self", "mnt:[4026532999]")):
        (tmp_path / pid / "ns").mkdir(parents=True)
        (tmp_path / pid / "ns" / "mnt").symlink_to(ns)
    (problem,) = namespace_problems("host", tmp_path)
    assert "not in the host's mount namespace" in problem
    assert namespace_problems("hostpid", tmp_path) == []
    assert namespace_problems("any", tmp_path) == []
    (missing,) = namespace_problems("host", tmp_path / "nothing")
    assert "cannot be compared" in missing


def test_cli_refuses_with_exit_2_when_the_namespace_is_wrong(nrm: NrmRig) -> None:
    (disk,) = nrm.disks(1)
    vg = nrm.vg_name()
    out = nrm.cli(*nrm.cli_args(topology_text(entry(vg, [disk.device]))), "--once",
                  "--mount-namespace", "hostpid")
    assert out.returncode == 2, out.stdout + out.stderr
    assert "HostStateUnknown" in out.stdout and "hostPID" in out.stdout
    assert nrm.pv_vg(disk.device) is None


def test_patterns_that_cannot_be_matched_are_a_problem_not_an_empty_match(nrm: NrmRig) -> None:
    """sysfs cannot list the block devices: the VG's members are not reported as removed and
    the result needs a person (exit 2)."""
    (disk,) = nrm.disks(1)
    vg = nrm.vg_name()
    name = disk.device.removeprefix("/dev/")
    spec = entry(vg, [])
    spec["topology"] = {"type": "pattern", "patterns": [name]}
    assert nrm.reconcile(topology_text(spec)).outcome is Outcome.CONVERGED
    assert nrm.pv_vg(disk.device) == vg
    fake = nrm.tmp / "sys"
    fake.mkdir()  # no class/block in it
    reconciler = nrm.reconciler()
    reconciler.planner.paths = HostPaths(sys=fake, dev_disk=nrm.dev_disk)
    result = reconciler.reconcile(config_from_text(topology_text(spec), "test", "1"), ADMITTED)
    assert result.outcome is Outcome.DEVICES_REFUSED
    assert any("cannot be listed" in p for p in result.problems)
    assert result.status["removedFromConfig"] == []
    assert result.status["volumeGroups"][0]["state"] == "Ready"
