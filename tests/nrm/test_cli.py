"""The command: --help/--version, --once exit codes, --dry-run, restart mid-reconcile."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

from edge_common.loopdisk import write_signature
from tests.nrm.conftest import REPO, NrmRig, cli_env, entry, fingerprints, topology_text


def test_help_lists_the_modes_and_version_prints_one(nrm: NrmRig) -> None:
    out = nrm.cli("--help")
    assert out.returncode == 0
    for flag in ("--node-name", "--kubeconfig", "--once", "--dry-run", "--topology-file",
                 "--node-labels"):
        assert flag in out.stdout
    version = nrm.cli("--version")
    assert version.returncode == 0
    assert version.stdout.startswith("node-resource-manager ")


def test_bad_command_line_exits_64(nrm: NrmRig) -> None:
    assert nrm.cli("--once").returncode == 64  # no --node-name
    assert nrm.cli("--node-name", "n", "--resync-seconds", "soon").returncode == 64


def test_once_exit_0_when_converged(nrm: NrmRig) -> None:
    disks = nrm.disks(2)
    vg = nrm.vg_name()
    status_file = nrm.tmp / "status.json"
    out = nrm.cli(*nrm.cli_args(topology_text(entry(vg, [d.device for d in disks]))),
                  "--once", "--status-file", str(status_file))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"Done: created volume group {vg}" in out.stdout
    assert nrm.pv_vg(disks[0].device) == vg and nrm.pv_vg(disks[1].device) == vg
    status = json.loads(status_file.read_text())
    assert status["result"] == "Converged" and status["volumeGroups"][0]["name"] == vg
    # Nothing left to do: still 0.
    again = nrm.cli(*nrm.cli_args(topology_text(entry(vg, [d.device for d in disks]))),
                    "--once")
    assert again.returncode == 0 and "Nothing to change." in again.stdout


def test_once_exit_1_on_invalid_config(nrm: NrmRig) -> None:
    out = nrm.cli(*nrm.cli_args("volumegroup: [unclosed\n"), "--once")
    assert out.returncode == 1
    assert "invalid YAML" in out.stdout


def test_once_exit_2_when_a_device_is_refused(nrm: NrmRig) -> None:
    good, bad = nrm.disks(2)
    write_signature(bad.device, "ext4")
    vg = nrm.vg_name()
    out = nrm.cli(*nrm.cli_args(topology_text(entry(vg, [good.device, bad.device]))), "--once")
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"{bad.device}: HasSignature" in out.stdout
    assert nrm.pv_vg(good.device) == vg


def _script(path: Path, body: str) -> str:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_once_exit_3_on_lvm_error(nrm: NrmRig) -> None:
    (disk,) = nrm.disks(1)
    vg = nrm.vg_name()
    broken = _script(nrm.tmp / "broken-lvm", 'echo "  lvm is broken" >&2\nexit 5\n')
    out = nrm.cli(*nrm.cli_args(topology_text(entry(vg, [disk.device]))), "--once",
                  "--lvm-command", broken)
    assert out.returncode == 3, out.stdout + out.stderr
    assert "state unknown" in out.stdout
    assert nrm.pv_vg(disk.device) is None


def test_once_exit_4_when_the_api_server_is_unreachable(nrm: NrmRig) -> None:
    kubeconfig = nrm.tmp / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "x",
        "clusters": [{"name": "x", "cluster": {"server": "http://127.0.0.1:9"}}],
        "users": [{"name": "x", "user": {"token": "t"}}],
        "contexts": [{"name": "x", "context": {"cluster": "x", "user": "x"}}],
    }))
    out = nrm.cli("--node-name", "n", "--kubeconfig", str(kubeconfig), "--once",
                  "--state-dir", str(nrm.state_dir))
    assert out.returncode == 4, out.stdout + out.stderr
    assert "Kubernetes API" in out.stderr


def test_dry_run_prints_the_plan_and_changes_nothing(nrm: NrmRig) -> None:
    good, formatted = nrm.disks(2)
    write_signature(formatted.device, "ext4")
    before = fingerprints([good, formatted])
    vg = nrm.vg_name()
    out = nrm.cli(*nrm.cli_args(topology_text(entry(vg, [good.device, formatted.device]))),
                  "--dry-run")
    assert out.returncode == 2
    assert "DRY RUN: nothing is changed." in out.stdout
    assert f"volume group {vg}: CREATE from {good.device}" in out.stdout
    assert f"pvcreate {good.device}" in out.stdout
    assert f"{formatted.device}: HasSignature" in out.stdout
    assert fingerprints([good, formatted]) == before
    assert nrm.lvm.get_vg(vg) is None and nrm.pv_vg(good.device) is None
    assert not nrm.state_dir.exists()


def test_restart_between_pvcreate_and_vgcreate_converges(nrm: NrmRig) -> None:
    """Kill the agent while vgcreate has not run yet (pvcreate done); the next run
    finishes the job with the orphan PVs its journal claims, and loses nothing."""
    disks = nrm.disks(2)
    vg = nrm.vg_name()
    marker = nrm.tmp / "vgcreate-reached"
    stall = _script(nrm.tmp / "stalling-lvm",
                    f'if [ "$1" = vgcreate ]; then echo $$ > "{marker}"; exec sleep 300; fi\n'
                    'exec lvm "$@"\n')
    args = nrm.cli_args(topology_text(entry(vg, [d.device for d in disks])))
    proc = subprocess.Popen(
        [sys.executable, "-m", "node_resource_manager", *args, "--once", "--lvm-command", stall],
        cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not marker.exists() or not marker.read_text().strip():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the agent never reached vgcreate"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the agent ...
        proc.communicate()
        if marker.exists() and marker.read_text().strip():
            os.kill(int(marker.read_text()), signal.SIGKILL)  # ... and the stalled "vgcreate"
    assert [nrm.pv_vg(d.device) for d in disks] == ["", ""]  # orphan PVs, no VG
    assert nrm.lvm.get_vg(vg) is None
    journal = json.loads((nrm.state_dir / "pending-pvs.json").read_text())
    assert {e["vg"] for e in journal["pending"].values()} == {vg}

    out = nrm.cli(*args, "--once")
    assert out.returncode == 0, out.stdout + out.stderr
    assert [nrm.pv_vg(d.device) for d in disks] == [vg, vg]
    assert json.loads((nrm.state_dir / "pending-pvs.json").read_text())["pending"] == {}


def test_orphan_pv_not_claimed_by_the_journal_is_refused(nrm: NrmRig) -> None:
    """The journal is what makes an orphan PV ours: without it, the PV is someone else's."""
    (disk,) = nrm.disks(1)
    nrm.lvm.pvcreate([disk.device])
    vg = nrm.vg_name()
    out = nrm.cli(*nrm.cli_args(topology_text(entry(vg, [disk.device]))), "--once")
    assert out.returncode == 2
    assert "UnclaimedPhysicalVolume" in out.stdout
    assert nrm.pv_vg(disk.device) == ""
