"""``--dev-dir``: the agent reads devices where it sees the host's /dev (/host/dev in the shipped
DaemonSet); LVM, which runs in the host's namespace, is given host paths (/dev/...)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from tests.nrm.conftest import NrmRig, entry, topology_text


def _recording_lvm(tmp: Path) -> tuple[str, Path]:
    log = tmp / "lvm-argv.log"
    script = tmp / "recording-lvm"
    script.write_text(f'#!/bin/sh\necho "$@" >> "{log}"\nexec lvm "$@"\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(script), log


def test_agent_reads_its_dev_dir_and_hands_lvm_host_paths(nrm: NrmRig) -> None:
    visible, hidden = nrm.disks(2)
    view = nrm.tmp / "host-dev"  # the agent's view of the host's /dev: only one disk in it
    view.mkdir()
    name = visible.device.removeprefix("/dev/")
    os.mknod(view / name, 0o600 | stat.S_IFBLK, visible.devno)
    vg = nrm.vg_name()
    lvm, log = _recording_lvm(nrm.tmp)
    args = nrm.cli_args(topology_text(entry(vg, [visible.device, hidden.device])))
    out = nrm.cli(*args, "--once", "--dev-dir", str(view), "--lvm-command", lvm)
    assert out.returncode == 2, out.stdout + out.stderr  # the hidden disk is refused
    assert f"{hidden.device}: Missing: {hidden.device} does not exist" in out.stdout
    writes = [line.split() for line in log.read_text().splitlines()
              if line.split()[0] in ("pvcreate", "vgcreate")]
    assert [w[0] for w in writes] == ["pvcreate", "vgcreate"]
    for argv in writes:
        assert argv[-1] == visible.device  # the host path, never the agent's view
        assert not any(str(view) in a for a in argv)
    assert nrm.pv_vg(visible.device) == vg and nrm.pv_vg(hidden.device) is None
    # The next run finds the PV LVM names /dev/... in the agent's view: nothing to do.
    again = nrm.cli(*nrm.cli_args(topology_text(entry(vg, [visible.device]))), "--once",
                    "--dev-dir", str(view))
    assert again.returncode == 0, again.stdout + again.stderr
    assert "up to date" in again.stdout
