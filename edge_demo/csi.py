"""Part 2: one PVC's life through the CSI driver, called as external-provisioner and kubelet
would call it.

Controller steps run here on the VG of part 1 (LVM metadata works without device-mapper).
Steps that need a live LV run here too when the kernel has device-mapper; otherwise the demo
says so and runs them in the real-kernel guest (``edge_demo.csi_live`` under kernel_guest).
"""

from __future__ import annotations

import json
import re
import signal
import sys
import time
from pathlib import Path

from edge_common.devmapper import has_device_mapper
from edge_demo import csi_live
from edge_demo import guest as guest_entry
from edge_demo.context import NODE_NAME, Context
from edge_demo.csi_client import STORAGE_CLASS, STORAGE_CLASS_PARAMETERS, CsiClient, Pvc
from edge_demo.procs import DemoError, ServiceProcess, tool
from edge_demo.results import FAILED, OK, StepResult
from edge_demo.steps import StepFailed
from edge_demo.ui import format_bytes, format_seconds
from kernel_guest import protocol as kernel_protocol

MiB = 1 << 20
DRIVER_READY_TIMEOUT = 60.0
GUEST_DISK_SIZE = "1G"
LIVE_TITLE = "Live LV: publish, write, expand, stats, snapshot, delete"
NO_DM_NOTE = ("This kernel has no device-mapper, so no LV can be activated here: the live-LV "
              "steps run in a qemu guest with a stock Debian kernel instead.")


def run_part(ctx: Context) -> None:
    runner = ctx.runner
    client: CsiClient | None = None
    if ctx.vg_ready:
        try:
            client = controller_steps(ctx)
        except StepFailed:  # the live-LV steps do not depend on these: go on with them
            ctx.console.note("skipping the rest of the steps on this host after the failure")
    else:
        runner.skip("CSI driver on this host", "no volume group (part 1 failed)")
    if has_device_mapper():
        if client is None:
            runner.skip(LIVE_TITLE, "no driver running")
            return
        ctx.console.note("This kernel has device-mapper: the live-LV steps run here.")
        csi_live.walk(runner, client, ctx.vg, ctx.work / "kubelet", ctx.cleanup)
        return
    ctx.console.note(NO_DM_NOTE)
    if ctx.options.skip_kernel:
        runner.skip(LIVE_TITLE + " (qemu guest)", "--skip-kernel")
        return
    run_in_guest(ctx)


def controller_steps(ctx: Context) -> CsiClient:
    """The driver on this host, and what needs no live LV; the client for what follows."""
    runner, lvm = ctx.runner, ctx.lvm
    socket = ctx.work / "csi.sock"
    endpoint = f"unix://{socket}"
    log = ctx.log("csi-lvm")
    driver = ServiceProcess(
        "csi-lvm",
        [*tool("csi-lvm", "csi_lvm"), "--endpoint", endpoint, "--node-id", NODE_NAME,
         "--default-vg", ctx.vg],
        log,
    )
    params = dict(STORAGE_CLASS_PARAMETERS, vgName=ctx.vg)
    with runner.step("Start csi-lvm on a unix socket") as step:
        step.log(log)
        ctx.cleanup.push("csi-lvm", driver.stop)  # before start: an interrupt may come
        driver.start()
        client = CsiClient(endpoint)
        ctx.cleanup.push("CSI gRPC channel", client.close)
        driver.wait_for(client.probe_ready, timeout=DRIVER_READY_TIMEOUT, what="Probe ready")
        info = client.plugin_info()
        topology = client.topology()
        step.note = (f"{info.name} {info.vendor_version} on {endpoint}; Probe ready; "
                     f"topology {', '.join(f'{k}={v}' for k, v in topology.items())}")

    with runner.step("GetCapacity (capacity tracking)") as step:
        step.log(log)
        before = client.get_capacity(params, topology)
        step.note = f"{format_bytes(before)} available in VG {ctx.vg} on {NODE_NAME}"

    pvc = Pvc.new()
    with runner.step(f"CreateVolume: PVC {pvc.name}, 64 MiB, StorageClass "
                     f"{STORAGE_CLASS}") as step:
        step.log(log)
        volume = client.create_volume(pvc, 64 * MiB, params, topology)
        volume_id = volume.volume_id
        ctx.cleanup.push(f"volume {volume_id}", lambda: client.retry_aborted(
            lambda: client.delete_volume(volume_id)))
        vg_name, _, lv_name = volume_id.partition("/")
        lv = lvm.get_lv(vg_name, lv_name)
        if lv is None:
            raise DemoError(f"CreateVolume returned {volume_id} but LVM has no such LV")
        owner = next((t for t in lv.tags if "/owner=" in t), "no owner tag!")
        step.note = f"LV {volume_id}, {format_bytes(lv.size)}, tag {owner}"
        step.detail("parameters: " + ", ".join(f"{k}={v}" for k, v in params.items()))
        step.detail("volume_context: " + ", ".join(
            f"{k}={v}" for k, v in sorted(volume.volume_context.items())))
        topo = volume.accessible_topology[0].segments if volume.accessible_topology else {}
        step.detail("accessible_topology: " + ", ".join(f"{k}={v}" for k, v in topo.items()))

    with runner.step("ControllerExpandVolume to 128 MiB (external-resizer)") as step:
        step.log(log)
        resp = client.controller_expand(volume_id, 128 * MiB)
        lv = lvm.get_lv(vg_name, lv_name)
        size = format_bytes(lv.size) if lv is not None else "?"
        step.note = (f"LV now {size}; node_expansion_required="
                     f"{resp.node_expansion_required} (kubelet grows the filesystem)")

    with runner.step("DeleteVolume") as step:
        step.log(log)
        client.delete_volume(volume_id)
        if lvm.get_lv(vg_name, lv_name) is not None:
            raise DemoError(f"LV {volume_id} still exists after DeleteVolume")
        after = client.get_capacity(params, topology)
        step.note = f"LV removed; GetCapacity back to {format_bytes(after)}"
    return client


# ----------------------------------------------------------------------- the guest


#: What the guest's console says (kernel_guest's /init, then the job) -> what the demo shows.
PHASES = (
    ("init started", "kernel booted, loading modules"),
    ("modules loaded", "device-mapper and virtio modules loaded"),
    ("host root mounted", "host filesystem mounted"),
    (kernel_protocol.START_MARKER, "starting Python in the guest"),
)


def guest_phase(console_log: Path) -> str:
    """A short description of where the guest is, from its console log."""
    try:
        text = console_log.read_text(errors="replace")
    except FileNotFoundError:
        return "preparing the kernel and initramfs (downloaded on first use)"
    phase = "booting the guest kernel" if text else "starting qemu"
    for line in text.splitlines():
        line = line.strip()
        for marker, description in PHASES:
            if marker in line:
                phase = description
        if line.startswith("> "):
            phase = "guest: " + line[2:].removesuffix(" ...")
    return phase


def run_in_guest(ctx: Context) -> None:
    guest_dir = ctx.logs / "guest"  # console log and reports: kept with the logs on failure
    log = ctx.log("kernel-guest")
    console_log = guest_dir / "console.log"
    report = guest_dir / "artifacts" / guest_entry.REPORT_NAME
    python = sys.executable
    argv = [python, "-m", "kernel_guest", "--quiet", "--results-dir", str(guest_dir),
            "--disks", "2", "--disk-size", GUEST_DISK_SIZE,
            "--timeout", f"{ctx.options.guest_timeout:.0f}",
            "run", "--", python, "-m", "edge_demo.guest"]
    with ctx.runner.step(LIVE_TITLE + " (qemu guest)") as step:
        for path in (log, console_log, guest_dir / "artifacts" / guest_entry.DRIVER_LOG):
            step.log(path)
        guest = ServiceProcess("kernel-guest", argv, log)
        # SIGINT makes the runner kill qemu and remove its scratch disks.
        handle = ctx.cleanup.push("qemu guest",
                                  lambda: guest.stop(grace=20, signum=signal.SIGINT))
        guest.start()
        started = time.monotonic()
        deadline = started + ctx.options.guest_timeout + 120
        while guest.running:
            step.progress(guest_phase(console_log))
            if time.monotonic() > deadline:
                raise DemoError("the guest run did not end in time")
            time.sleep(0.25)
        ctx.cleanup.discard(handle)
        code = guest.stop()
        results = _read_report(report)
        boot = _boot_seconds(guest_dir / "timings.json")
        for result in results:
            mark = "ok" if result.status == OK else result.status.upper()
            line = f"[guest] {mark} {result.title}"
            if result.note:
                line += f" - {result.note}"
            step.detail(f"{line} ({format_seconds(result.seconds)})")
            if result.error:
                step.detail(f"        {result.error}")
        failed = [r for r in results if r.status != OK]
        if code != 0 or failed or not results:
            why = (f"{failed[0].title}: {failed[0].error}" if failed else
                   f"the guest run ended with status {code}" +
                   ("" if results else " and no step results"))
            tail = guest.log_tail(8)
            raise DemoError(f"{why}\n{tail}" if not results else why)
        kernel = _kernel_release(guest.log_text())
        step.note = (f"{len(results)} steps passed in a guest with Debian kernel {kernel}"
                     + (f" (boot {boot})" if boot else ""))


def _read_report(path: Path) -> list[StepResult]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    steps = data.get("steps", []) if isinstance(data, dict) else []
    out = [StepResult.from_dict(s) for s in steps if isinstance(s, dict)]
    for problem in data.get("cleanup_failed", []) if isinstance(data, dict) else []:
        out.append(StepResult("guest cleanup", FAILED, error=str(problem)))
    return out


def _kernel_release(text: str) -> str:
    match = re.search(r"\(([0-9][^)]*-amd64)\)", text)
    return match.group(1) if match else "?"


def _boot_seconds(timings: Path) -> str:
    """How long the guest took to boot, from the runner's timings.json."""
    try:
        data = json.loads(timings.read_text())
        return format_seconds(float(data["boot_to_job_s"]))
    except (OSError, ValueError, KeyError, TypeError):
        return ""


__all__ = ["PHASES", "guest_phase", "run_in_guest", "run_part"]
