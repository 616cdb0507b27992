"""The steps of a PVC's life that need a live LV (device-mapper): publish, write, expand, stats,
snapshot, delete.

``walk()`` runs them against a running driver; the demo calls it directly on a host whose kernel
has device-mapper. Elsewhere the demo boots the real-kernel guest and runs
``python -m edge_demo.guest`` there, which starts ``csi-lvm`` and calls ``run_guest()``: a VG
on the guest's virtual disks, the walk, clean-up, and the results as JSON for the host.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from edge_common.commands import run
from edge_common.lvm import Lvm
from edge_demo.cleanup import Cleanup
from edge_demo.csi_client import STORAGE_CLASS_PARAMETERS, CsiClient, Pvc
from edge_demo.procs import DemoError, ServiceProcess
from edge_demo.results import FAILED, StepResult
from edge_demo.steps import Runner, StepFailed
from edge_demo.ui import Console, format_bytes

MiB = 1 << 20
VOLUME_SIZE = 64 * MiB
EXPANDED_SIZE = 128 * MiB
SNAPSHOT_CLASS_PARAMETERS = {"snapshotSize": "50%"}  # VolumeSnapshotClass: thick COW space
FILE_NAME = "hello.txt"
FILE_TEXT = "written by the demo pod through a csi-local-lvm volume\n"
REPORT_NAME = "csi-live.json"
DRIVER_READY_TIMEOUT = 180.0  # Python start-up under the guest's CPU emulation is slow


def is_mounted(path: Path) -> bool:
    target = str(path)
    with open("/proc/self/mountinfo") as handle:
        return any(line.split()[4] == target for line in handle)


def walk(runner: Runner, client: CsiClient, vg: str, kubelet_dir: Path,
         cleanup: Cleanup) -> None:
    """One PVC's life on a live LV; every step is recorded in ``runner``."""
    lvm = Lvm(Lvm.settings_for_this_kernel(timeout=120.0))
    pvc = Pvc.new()
    target = pvc.target_path(kubelet_dir)
    params = dict(STORAGE_CLASS_PARAMETERS, vgName=vg)
    topology = client.topology()

    with runner.step("CreateVolume (64 MiB, linear, ext4)") as step:
        volume = client.create_volume(pvc, VOLUME_SIZE, params, topology)
        volume_id = volume.volume_id
        cleanup.push(f"volume {volume_id}", lambda: client.retry_aborted(
            lambda: client.delete_volume(volume_id)))
        lv_vg, _, lv_name = volume_id.partition("/")
        lv = lvm.get_lv(lv_vg, lv_name)
        state = "active" if lv is not None and lv.attr.active else "inactive"
        step.note = f"LV {volume_id}, {format_bytes(volume.capacity_bytes)}, {state}"

    with runner.step("NodePublishVolume (mkfs.ext4, mount)") as step:
        cleanup.push(f"mount {target}", lambda: _unpublish_quietly(client, volume_id, target))
        client.publish(volume, pvc, target)
        if not is_mounted(target):
            raise DemoError(f"{target} is not a mount point after NodePublishVolume")
        listing = sorted(os.listdir(target))
        step.note = f"mounted at .../{pvc.pv_name}/mount, contains {listing}"

    with runner.step("The pod writes a file") as step:
        path = target / FILE_NAME
        path.write_text(FILE_TEXT)
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
        back = path.read_text()
        if back != FILE_TEXT:
            raise DemoError(f"read back {back!r}, wrote {FILE_TEXT!r}")
        step.note = f"{FILE_NAME} ({len(FILE_TEXT)} bytes) written and read back"

    with runner.step("Expand to 128 MiB (ControllerExpand + NodeExpand, online)") as step:
        before = os.statvfs(target)
        ctrl = client.controller_expand(volume_id, EXPANDED_SIZE)
        capacity = client.node_expand(volume_id, target, EXPANDED_SIZE)
        after = os.statvfs(target)
        grown_from = before.f_blocks * before.f_frsize
        grown_to = after.f_blocks * after.f_frsize
        if grown_to <= grown_from:
            raise DemoError(f"the filesystem did not grow ({grown_from} -> {grown_to} bytes)")
        step.note = (f"LV {format_bytes(ctrl.capacity_bytes)} "
                     f"(node_expansion_required={ctrl.node_expansion_required}), "
                     f"filesystem {format_bytes(grown_from)} -> {format_bytes(grown_to)} "
                     "while mounted")
        step.detail(f"NodeExpandVolume capacity_bytes={capacity}")
        if (target / FILE_NAME).read_text() != FILE_TEXT:
            raise DemoError("the file changed during the expansion")

    with runner.step("NodeGetVolumeStats") as step:
        stats = client.stats(volume_id, target)
        parts = []
        for usage in stats.usage:
            unit = "bytes" if usage.unit == 1 else "inodes"
            if unit == "bytes":
                parts.append(f"{format_bytes(usage.used)} used of {format_bytes(usage.total)}")
            else:
                parts.append(f"{usage.used} of {usage.total} inodes")
        condition = stats.volume_condition
        if condition.abnormal:
            raise DemoError(f"volume condition abnormal: {condition.message}")
        step.note = ", ".join(parts) + f"; condition: {condition.message}"

    with runner.step("CreateSnapshot (thick copy-on-write, snapshotSize 50%)") as step:
        snapshot = client.create_snapshot(volume_id, f"snapshot-{pvc.uid}",
                                          SNAPSHOT_CLASS_PARAMETERS)
        snapshot_id = snapshot.snapshot_id
        cleanup.push(f"snapshot {snapshot_id}", lambda: client.retry_aborted(
            lambda: client.delete_snapshot(snapshot_id)))
        s_vg, _, s_lv = snapshot_id.partition("/")
        snap_lv = lvm.get_lv(s_vg, s_lv)
        cow = f", COW space {format_bytes(snap_lv.size)}" if snap_lv is not None else ""
        step.note = (f"{snapshot_id}, ready_to_use={snapshot.ready_to_use}, "
                     f"size {format_bytes(snapshot.size_bytes)}{cow}")

    with runner.step("Delete: snapshot, NodeUnpublish, DeleteVolume") as step:
        client.delete_snapshot(snapshot_id)
        client.unpublish(volume_id, target)
        if target.exists() and is_mounted(target):
            raise DemoError(f"{target} is still mounted after NodeUnpublishVolume")
        client.delete_volume(volume_id)
        left = [lv.full_name for lv in lvm.lvs(vg)] if lvm.get_vg(vg) else []
        if left:
            raise DemoError(f"LVs left in {vg}: {left}")
        step.note = f"no LV left in {vg}, target removed: {not target.exists()}"
    # Nothing of the walk is left to undo; cleanup runs the no-op deletes harmlessly.


def _unpublish_quietly(client: CsiClient, volume_id: str, target: Path) -> None:
    if target.exists() and is_mounted(target):
        try:
            client.retry_aborted(lambda: client.unpublish(volume_id, target))
        except Exception:
            run(["umount", str(target)], timeout=60, check=False)


# ----------------------------------------------------------------------- the guest side


def run_guest(driver: ServiceProcess, endpoint: str, disks: list[str], vg: str, work: Path,
              report_path: Path) -> int:
    """The guest's job (see edge_demo.guest, which started ``driver`` already): VG, driver
    ready, the walk, clean-up; the results as JSON in ``report_path``."""
    console = Console(sys.stdout, color=False, tty=False)  # the serial console
    runner = Runner(console, announce=True)
    cleanup = Cleanup()
    cleanup.push("csi-lvm", driver.stop)
    started = time.monotonic()
    try:
        _guest_steps(runner, cleanup, driver, endpoint, disks, vg, work)
    except StepFailed:
        pass
    except Exception as exc:  # outside any step: still report it
        runner.record(StepResult("csi_live", FAILED, error=repr(exc)))
    finally:
        report = cleanup.run()
        for what, why in report.failed:
            console.line(f"  cleanup: could not undo {what}: {why}")
        data = {
            "steps": [r.to_dict() for r in runner.results],
            "seconds": round(time.monotonic() - started, 2),
            "cleanup_failed": [f"{w}: {y}" for w, y in report.failed],
        }
        report_path.parent.mkdir(parents=True, exist_ok=True)
        report_path.write_text(json.dumps(data, indent=2) + "\n")
    return 1 if runner.failed or report.failed else 0


def _guest_steps(runner: Runner, cleanup: Cleanup, driver: ServiceProcess, endpoint: str,
                 disks: list[str], vg: str, work: Path) -> None:
    lvm = Lvm(Lvm.settings_for_this_kernel(timeout=120.0))
    with runner.step(f"VG {vg} on {', '.join(disks) or '(no disks)'}") as step:
        if not disks:
            raise DemoError("no disks given (--disks or EDGE_GUEST_DISKS)")
        lvm.pvcreate(disks)
        cleanup.push(f"PVs {disks}", lambda: lvm.command("pvremove", "--yes", "--", *disks))
        lvm.vgcreate(vg, disks)
        cleanup.push(f"VG {vg}", lambda: lvm.command("vgremove", "--yes", "--force", "--", vg))
        found = lvm.get_vg(vg)
        step.note = f"{format_bytes(found.size) if found else '?'} (device-mapper present)"

    with runner.step("csi-lvm serving on a unix socket") as step:
        step.log(driver.log_path)
        client = CsiClient(endpoint)
        cleanup.push("gRPC channel", client.close)
        driver.wait_for(client.probe_ready, timeout=DRIVER_READY_TIMEOUT, what="Probe ready",
                        interval=0.5)
        info = client.plugin_info()
        step.note = f"{info.name} {info.vendor_version}, Probe ready"
    walk(runner, client, vg, work / "kubelet", cleanup)
