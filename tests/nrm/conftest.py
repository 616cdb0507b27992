"""Rig for the node resource manager tests: real LVM on this test's loop disks, a private
/dev/disk tree for by-id links, a private state directory, and cleanup of every VG and PV the
agent created (only on this test's own loop devices)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from edge_common.commands import run
from edge_common.loopdisk import LoopDisk, attached_under, device_fingerprint
from edge_common.lvm import Lvm, LvmError
from node_resource_manager.devices import HostPaths
from node_resource_manager.events import LogSink
from node_resource_manager.journal import Journal
from node_resource_manager.metrics import Metrics
from node_resource_manager.reconcile import ConfigState, Reconciler, ReconcileResult
from node_resource_manager.safety import SafetyChecker, SafetySettings
from node_resource_manager.sources import config_from_text
from tests.rigs.loopdisks import LoopDiskFactory
from tests.rigs.lvm import unique_vg_name

REPO = Path(__file__).resolve().parents[2]
GATE = "alibabacloud.com/edge-enable-localstorage"
ADMITTED = {GATE: "true", "storage": "lvm"}


def entry(name: str, devices: Sequence[str], *, key: str = "storage", operator: str = "In",
          value: str | None = "lvm", **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name, "key": key, "operator": operator}
    if value is not None:
        out["value"] = value
    out["topology"] = {"type": "device", "devices": list(devices)}
    out.update(extra)
    return out


def topology_text(*entries: Mapping[str, Any], wrapped: bool = True) -> str:
    doc: Any = list(entries)
    if wrapped:
        doc = {"volumegroup": doc}
    return yaml.safe_dump(doc, sort_keys=False)


@dataclass
class NrmRig:
    tmp: Path
    lvm: Lvm
    loop_disks: LoopDiskFactory
    vgs: list[str] = field(default_factory=list)
    mounts: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.state_dir = self.tmp / "state"
        self.dev_disk = self.tmp / "dev-disk"
        (self.dev_disk / "by-id").mkdir(parents=True, exist_ok=True)
        self.extra_mountinfo = self.tmp / "extra-mountinfo"
        self.extra_mountinfo.write_text("")

    # ------------------------------------------------------------------ things to manage

    def vg_name(self, hint: str = "nrm") -> str:
        name = unique_vg_name(hint)
        self.vgs.append(name)
        return name

    def disks(self, count: int = 1, size: int = 64 << 20) -> list[LoopDisk]:
        return self.loop_disks(count, size)

    def link(self, name: str, target: str, kind: str = "by-id") -> str:
        """A stable link in this test's /dev/disk tree; returns the path as the config
        writes it (``/dev/disk/by-id/NAME``), which the agent looks up in that tree."""
        directory = self.dev_disk / kind
        directory.mkdir(parents=True, exist_ok=True)
        (directory / name).symlink_to(target)
        return f"/dev/disk/{kind}/{name}"

    def mount(self, device: str) -> str:
        target = self.tmp / f"mnt-{len(self.mounts)}"
        target.mkdir()
        run(["mount", device, str(target)], timeout=60)
        self.mounts.append(str(target))
        return str(target)

    def bind_device(self, device: str) -> str:
        """Bind-mount a device node onto a file, as kubelet does for a raw block volume."""
        target = self.tmp / f"blockvol-{len(self.mounts)}"
        target.touch()
        run(["mount", "--bind", device, str(target)], timeout=60)
        self.mounts.append(str(target))
        return str(target)

    # ------------------------------------------------------------------ the agent, in-process

    def safety_settings(self, **kw: Any) -> SafetySettings:
        tables = ("/proc/1/mountinfo", "/proc/self/mountinfo", str(self.extra_mountinfo))
        base: dict[str, Any] = {"paths": self.paths(), "mount_tables": tables}
        base.update(kw)
        return SafetySettings(**base)

    def paths(self) -> HostPaths:
        return HostPaths(dev_disk=self.dev_disk)

    def reconciler(self, *, sink: LogSink | None = None, **safety: Any) -> Reconciler:
        return Reconciler(
            node_name="node-a", lvm=self.lvm,
            checker=SafetyChecker(self.safety_settings(**safety)),
            journal=Journal(self.state_dir), paths=self.paths(), gate_key=GATE,
            gate_value="true", sink=sink or LogSink(), metrics=Metrics(),
        )

    def reconcile(self, text: str, labels: Mapping[str, str] = ADMITTED, *,
                  dry_run: bool = False, sink: LogSink | None = None,
                  **safety: Any) -> ReconcileResult:
        config: ConfigState = config_from_text(text, "test", "1")
        return self.reconciler(sink=sink, **safety).reconcile(config, labels, dry_run=dry_run)

    # ------------------------------------------------------------------ the CLI, as a process

    def cli_args(self, topology: str, labels: Mapping[str, str] = ADMITTED) -> list[str]:
        topo = self.tmp / "topology.yaml"
        topo.write_text(topology)
        return [
            "--node-name", "node-a", "--topology-file", str(topo),
            "--node-labels", ",".join(f"{k}={v}" for k, v in labels.items()),
            "--state-dir", str(self.state_dir), "--dev-disk-dir", str(self.dev_disk),
            "--mount-tables", f"/proc/1/mountinfo,/proc/self/mountinfo,{self.extra_mountinfo}",
            "--no-log-json", "--log-level", "WARNING",
        ]

    def cli(self, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "node_resource_manager", *args], cwd=REPO, text=True,
            capture_output=True, timeout=timeout, env=cli_env(),
        )

    # ------------------------------------------------------------------ observations

    def pv_vg(self, device: str) -> str | None:
        """The VG of the PV on ``device`` ('' for an orphan PV), None when no PV."""
        rdev = os.stat(device).st_rdev
        for pv in self.lvm.pvs():
            with contextlib.suppress(OSError):
                if os.stat(pv.name).st_rdev == rdev:
                    return pv.vg_name or ""
        return None

    def cleanup(self) -> list[str]:
        problems = []
        for target in reversed(self.mounts):
            with contextlib.suppress(Exception):
                run(["umount", target], timeout=60)
        ours = {lp.device for lp in attached_under(self.tmp)}
        for name in self.vgs:
            try:
                if self.lvm.get_vg(name) is None:
                    continue
                pvs = sorted(pv.name for pv in self.lvm.pvs() if pv.vg_name == name)
                self.lvm.command("vgremove", "--yes", "--", name)
                mine = [pv for pv in pvs if pv in ours]
                if mine:
                    self.lvm.command("pvremove", "--yes", "--", *mine)
            except LvmError as exc:
                problems.append(f"{name}: {exc}")
        try:  # orphan PVs the agent left on our disks (interrupted runs)
            orphans = [pv.name for pv in self.lvm.pvs() if not pv.vg_name and pv.name in ours]
            if orphans:
                self.lvm.command("pvremove", "--yes", "--", *orphans)
        except LvmError as exc:
            problems.append(str(exc))
        return problems


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    for key in list(env):
        if key.startswith("NRM_"):
            del env[key]
    return env


@pytest.fixture
def nrm(tmp_path: Path, lvm: Lvm, loop_disks: LoopDiskFactory) -> Iterator[NrmRig]:
    rig = NrmRig(tmp_path, lvm, loop_disks)
    try:
        yield rig
    finally:
        problems = rig.cleanup()
        if problems:
            pytest.fail("nrm rig cleanup failed: " + "; ".join(problems), pytrace=False)


def fingerprints(disks: Sequence[LoopDisk]) -> dict[str, bytes]:
    return {d.device: device_fingerprint(d.device) for d in disks}
