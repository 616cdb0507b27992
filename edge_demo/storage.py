"""Part 1: disks and the volume group, built by node-resource-manager in offline mode."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from edge_common.commands import CommandResult, run
from edge_common.loopdisk import LoopDisk, device_fingerprint, write_signature
from edge_common.lvm import LvmError
from edge_demo.cleanup import signals_deferred
from edge_demo.context import NODE_NAME, SELECTOR_KEY, SELECTOR_VALUE, Context
from edge_demo.procs import DemoError, run_logged, tool
from edge_demo.ui import format_bytes

MiB = 1 << 20
DISK_SIZE = 256 * MiB
NRM_TIMEOUT = 180.0
# --once and --dry-run exit codes (node-resource-manager --help): 0 converged, 2 some listed
# device refused. The demo lists a disk that must be refused, so 2 is the expected answer.
NRM_CONVERGED, NRM_REFUSED = 0, 2


def topology_yaml(vg: str, devices: list[str]) -> str:
    """The ``volumegroup`` data of ConfigMap kube-system/node-resource-topo, as operators
    write it (the list under a ``volumegroup:`` key)."""
    doc = {"volumegroup": [{
        "name": vg,
        "key": SELECTOR_KEY,
        "operator": "In",
        "value": SELECTOR_VALUE,
        "topology": {"type": "device", "devices": devices},
    }]}
    return yaml.safe_dump(doc, sort_keys=False)


def configmap_yaml(data: str) -> str:
    return yaml.safe_dump({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "node-resource-topo", "namespace": "kube-system"},
        "data": {"volumegroup": data},
    }, sort_keys=False, default_style=None)


def run_part(ctx: Context) -> None:
    runner, lvm = ctx.runner, ctx.lvm
    disk_dir = ctx.work / "disks"
    disk_dir.mkdir()
    topo_file = ctx.work / "node-resource-topo.yaml"

    with runner.step("Create 3 loop disks and the topology file") as step:
        for name in ("disk-a.img", "disk-b.img", "disk-c.img"):
            disk = LoopDisk(disk_dir, DISK_SIZE, name=name)
            with signals_deferred():  # losetup is quick; never leave it half done
                disk.attach()
                ctx.cleanup.push(f"loop disk {disk.device}", disk.detach)
            ctx.disks.append(disk)
        blank, formatted = ctx.disks[:2], ctx.disks[2]
        write_signature(formatted.device, "ext4")
        devices = [d.device for d in ctx.disks]
        data = topology_yaml(ctx.vg, devices)
        topo_file.write_text(data)
        (ctx.work / "node-resource-topo.configmap.yaml").write_text(configmap_yaml(data))
        step.note = (f"{blank[0].device}, {blank[1].device} blank, {formatted.device} holds "
                     f"an ext4 filesystem ({format_bytes(DISK_SIZE)} each, sparse)")
        step.detail(f"topology ({topo_file.name}, data key 'volumegroup' of ConfigMap "
                    "kube-system/node-resource-topo):")
        for line in data.rstrip().splitlines():
            step.detail("  " + line)
        step.detail(f"node labels: {ctx.node_labels.replace(',', ', ')}")
    fingerprint = device_fingerprint(formatted.device)
    ctx.cleanup.push(f"VG {ctx.vg} and its PVs", lambda: remove_vg(ctx))

    argv = [*tool("node-resource-manager", "node_resource_manager"),
            "--node-name", NODE_NAME, "--topology-file", str(topo_file),
            "--node-labels", ctx.node_labels, "--state-dir", str(ctx.work / "nrm-state"),
            "--status-file", str(ctx.work / "nrm-status.json"), "--no-udev"]
    log = ctx.log("node-resource-manager")

    with runner.step("node-resource-manager --dry-run: the plan") as step:
        step.log(log)
        result = run_logged([*argv, "--dry-run"], log, timeout=NRM_TIMEOUT, check=False)
        _expect_exit(result, "--dry-run", log)
        for line in result.stdout_text.rstrip().splitlines():
            step.detail(line)
        if lvm.get_vg(ctx.vg) is not None:
            raise DemoError(f"VG {ctx.vg} exists after a dry run")
        step.note = "printed what it would do; nothing changed"

    with runner.step("node-resource-manager --once: build the VG") as step:
        step.log(log)
        result = run_logged([*argv, "--once"], log, timeout=NRM_TIMEOUT, check=False)
        _expect_exit(result, "--once", log)
        for line in result.stdout_text.rstrip().splitlines():
            if line.startswith(("Done:", "FAILED:", "result:")):
                step.detail(line)
        vg = lvm.get_vg(ctx.vg)
        if vg is None:
            raise DemoError(f"VG {ctx.vg} does not exist after --once", [log])
        pvs = sorted(pv.name for pv in lvm.pvs() if pv.vg_name == ctx.vg)
        expected = sorted(d.device for d in blank)
        if pvs != expected:
            raise DemoError(f"VG {ctx.vg} has PVs {pvs}, expected {expected}", [log])
        ctx.vg_ready = True
        step.note = f"VG {ctx.vg} created from {', '.join(pvs)}"

    with runner.step("The disk with a filesystem: refused, untouched") as step:
        status = _status(ctx.work / "nrm-status.json")
        refusal = next((d for d in status.get("excludedDevices", [])
                        if d.get("device") == formatted.device), None)
        if refusal is None:
            raise DemoError(f"{formatted.device} is not among the refused devices: "
                            f"{status.get('excludedDevices')}", [log])
        reasons = refusal.get("reasons", [])
        if device_fingerprint(formatted.device) != fingerprint:
            raise DemoError(f"{formatted.device} changed although it was refused")
        fs = run(["blkid", "-p", "-o", "value", "-s", "TYPE", formatted.device],
                 timeout=30, check=False).stdout_text.strip()
        step.note = (f"{formatted.device}: {', '.join(r.get('reason', '?') for r in reasons)}; "
                     f"first and last MiB unchanged, blkid still says {fs or 'nothing'}")
        for reason in reasons:
            step.detail(f"{reason.get('reason')}: {reason.get('message')}")
        step.detail(f"status summary (the Node annotation in a cluster): result "
                    f"{status.get('result')}, {status.get('message')}")

    with runner.step("The volume group, as LVM reports it") as step:
        vg = lvm.get_vg(ctx.vg)
        if vg is None:
            raise DemoError(f"VG {ctx.vg} not found")
        shown = lvm.command("vgs", "-o", "vg_name,pv_count,lv_count,vg_size,vg_free,"
                            "vg_extent_size", "--units", "m", "--", ctx.vg)
        pv_rows = lvm.command("pvs", "-o", "pv_name,vg_name,pv_size,pv_free", "--units", "m",
                              "-S", f"vg_name={ctx.vg}")
        step.note = (f"{vg.name}: {format_bytes(vg.size)}, {format_bytes(vg.free)} free, "
                     f"{vg.pv_count} PVs, extent {format_bytes(vg.extent_size)}")
        step.detail("$ vgs " + ctx.vg)
        step.detail(shown.stdout_text.rstrip())
        step.detail("$ pvs")
        step.detail(pv_rows.stdout_text.rstrip())


def _expect_exit(result: CommandResult, mode: str, log: Path) -> None:
    if result.returncode not in (NRM_CONVERGED, NRM_REFUSED):
        last = (result.stderr_text or result.stdout_text.strip()).splitlines()[-1:]
        why = f": {last[0]}" if last else ""
        raise DemoError(f"node-resource-manager {mode} exited {result.returncode}{why}", [log])


def _status(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DemoError(f"cannot read the status file {path}: {exc}") from None
    if not isinstance(data, dict):
        raise DemoError(f"status file {path} holds no JSON object")
    return data


def remove_vg(ctx: Context) -> None:
    """Undo part 1: the VG (with any LV left in it), then the PV labels on OUR loop disks."""
    lvm = ctx.lvm
    ours = {d.device for d in ctx.disks if d.attached}
    if lvm.get_vg(ctx.vg) is not None:
        lvm.command("vgremove", "--yes", "--force", "--", ctx.vg)
    try:
        labelled = sorted(pv.name for pv in lvm.pvs() if pv.name in ours and not pv.vg_name)
    except LvmError:
        labelled = []
    if labelled:
        lvm.command("pvremove", "--yes", "--", *labelled)


__all__ = ["configmap_yaml", "remove_vg", "run_part", "topology_yaml"]
