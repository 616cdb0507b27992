"""CSI driver benchmark: the driver against the floor of bare LVM, in one run.

    python benchmarks/csi_bench.py [--iterations 30] [--batch 50] [--write-docs]

On sparse loop disks in a fresh VG (removed afterwards):
1. floor: bare `lvm lvcreate` / `lvm lvremove` (one process each, the same argument style the
   driver uses), p50 over --iterations;
2. CreateVolume / DeleteVolume through gRPC to a `csi-lvm` process, p50 over --iterations;
3. --batch concurrent CreateVolume then DeleteVolume (wall time, errors counted) against
   --batch serial bare lvcreate / lvremove;
4. GetCapacity p50 over 500 calls;
5. the plugin's resident memory (VmRSS) when idle;
6. changes made outside the driver: how long after a bare `vgcreate` (a new VG) and a bare
   `vgextend` (the default VG grown) GetCapacity shows them, p50 over 5 rounds, against the
   periodic refresh (30 s) that was the only way before;
7. Probe p99 while a --clone-mib thick clone copies (a background job) against Probe p99 with
   nothing running, and the clone's time against a bare `dd` read of its source; needs
   device-mapper, so on a kernel without it this part runs in the real-kernel guest
   (python -m kernel_guest run).
Targets (issue 4): CreateVolume p50 <= 1.25x bare lvcreate; (issue 12) DeleteVolume p50 <=
1.2x bare lvremove; concurrent batch <= 1.2x the
serial floor with zero errors; GetCapacity p50 < 5 ms; idle RSS < 60 MB.
With --write-docs the figures replace the "CSI driver" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import grpc

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.report import rss_kib, write_section  # noqa: E402
from edge_common.devmapper import has_device_mapper  # noqa: E402
from edge_common.loopdisk import loop_disks  # noqa: E402
from edge_common.lvm import Lvm  # noqa: E402
from edge_common.server import unix_channel  # noqa: E402
from edge_proto.csi.v1 import csi_pb2, csi_pb2_grpc  # noqa: E402

MiB = 1 << 20
SIZE = 8 * MiB
SECTION = "## CSI driver"


def p50(samples: list[float]) -> float:
    return statistics.median(samples)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def cap() -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(fs_type="ext4"),
        access_mode=csi_pb2.VolumeCapability.AccessMode(
            mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER))


def create_req(name: str) -> csi_pb2.CreateVolumeRequest:
    return csi_pb2.CreateVolumeRequest(
        name=name, capacity_range=csi_pb2.CapacityRange(required_bytes=SIZE),
        volume_capabilities=[cap()])




def start_driver(sock: str, vg: str, *extra: str) -> subprocess.Popen[bytes]:
    """csi-lvm as its own process on a unix socket, default VG `vg`."""
    return subprocess.Popen(
        [sys.executable, "-m", "csi_lvm", "--endpoint", f"unix://{sock}",
         "--node-id", "bench", "--driver-name", f"bench-{secrets.token_hex(3)}.csi.edge.io",
         "--default-vg", vg, "--log-level", "WARNING", *extra],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run(iterations: int, batch: int) -> dict[str, float]:
    lvm = Lvm(Lvm.settings_for_this_kernel(timeout=120))
    vg = f"bench{secrets.token_hex(3)}"
    results: dict[str, float] = {}
    late = f"bench{secrets.token_hex(3)}"  # the VG "the node agent" builds after start
    with tempfile.TemporaryDirectory(prefix="csi-bench-") as tmp, \
            loop_disks(3, 2048 * MiB, tmp) as disks:
        lvm.vgcreate(vg, [d.device for d in disks[:2]])
        try:
            # 1. + 2. the floor and the driver (its own process), interleaved: on a shared
            # machine the load changes, and each pair of samples sees the same load
            sock = f"{tmp}/csi.sock"
            proc = start_driver(sock, vg, "--allowed-vgs", late)
            try:
                channel = unix_channel(f"unix://{sock}")
                grpc.channel_ready_future(channel).result(timeout=60)
                ctl = csi_pb2_grpc.ControllerStub(channel)
                ctl.GetCapacity(csi_pb2.GetCapacityRequest())  # warm the channel
                time.sleep(2)
                results["idle_rss_mib"] = rss_kib(proc.pid) / 1024
                creates, removes, bare_creates, bare_removes = [], [], [], []
                for i in range(iterations):
                    bare_creates.append(timed(partial(lvm.lvcreate, vg, f"floor{i}", SIZE)))
                    bare_removes.append(timed(partial(lvm.lvremove, vg, f"floor{i}")))
                    delete = csi_pb2.DeleteVolumeRequest(volume_id=f"{vg}/pvc-s{i}")
                    creates.append(timed(partial(ctl.CreateVolume, create_req(f"pvc-s{i}"))))
                    removes.append(timed(partial(ctl.DeleteVolume, delete)))
                results["bare_lvcreate_p50"] = p50(bare_creates)
                results["bare_lvremove_p50"] = p50(bare_removes)
                results["create_volume_p50"] = p50(creates)
                results["delete_volume_p50"] = p50(removes)

                # 3. concurrency
                errors = 0

                def one(fn: Callable[[], object]) -> bool:
                    try:
                        fn()
                        return True
                    except grpc.RpcError:
                        return False

                with ThreadPoolExecutor(batch) as pool:
                    start = time.perf_counter()
                    ok = list(pool.map(lambda i: one(lambda: ctl.CreateVolume(
                        create_req(f"pvc-c{i}"))), range(batch)))
                    results["concurrent_create_s"] = time.perf_counter() - start
                    errors += ok.count(False)
                    start = time.perf_counter()
                    ok = list(pool.map(lambda i: one(lambda: ctl.DeleteVolume(
                        csi_pb2.DeleteVolumeRequest(volume_id=f"{vg}/pvc-c{i}"))), range(batch)))
                    results["concurrent_delete_s"] = time.perf_counter() - start
                    errors += ok.count(False)
                results["concurrent_errors"] = errors
                start = time.perf_counter()
                for i in range(batch):
                    lvm.lvcreate(vg, f"serial{i}", SIZE)
                results["serial_lvcreate_s"] = time.perf_counter() - start
                start = time.perf_counter()
                for i in range(batch):
                    lvm.lvremove(vg, f"serial{i}")
                results["serial_lvremove_s"] = time.perf_counter() - start

                # 4. GetCapacity
                req = csi_pb2.GetCapacityRequest(volume_capabilities=[cap()])
                samples = [timed(lambda: ctl.GetCapacity(req)) for _ in range(500)]
                results["get_capacity_p50"] = p50(samples)

                # 6. changes made by others
                results.update(outside_changes(lvm, ctl, vg, late, disks[2].device))
                channel.close()
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=30)
        finally:
            report = lvm.report()
            for name in (vg, late):
                if report.vg(name) is not None:
                    lvm.command("vgremove", "--yes", "--force", "--", name)
            ours = {d.device for d in disks}
            labelled = [pv.name for pv in report.pvs if pv.name in ours]
            if labelled:
                lvm.command("pvremove", "--yes", "--", *labelled)
    return results


def _visible_after(ctl: csi_pb2_grpc.ControllerStub, vg: str, above: int) -> float:
    """Seconds until GetCapacity of `vg` exceeds `above` (polled every 10 ms; 60 s at most)."""
    req = csi_pb2.GetCapacityRequest(parameters={"vgName": vg}, volume_capabilities=[cap()])
    start = time.perf_counter()
    while ctl.GetCapacity(req).available_capacity <= above:
        if time.perf_counter() - start > 60:
            break
        time.sleep(0.01)
    return time.perf_counter() - start


def outside_changes(lvm: Lvm, ctl: csi_pb2_grpc.ControllerStub, vg: str, late: str,
                    disk: str, rounds: int = 5) -> dict[str, float]:
    """A VG built after start and the default VG grown, both by bare LVM (as the node agent
    does): how long until GetCapacity shows them."""
    built, grown = [], []
    for _ in range(rounds):
        lvm.vgcreate(late, [disk])
        built.append(_visible_after(ctl, late, 0))
        lvm.command("vgremove", "--yes", "--", late)
        time.sleep(1.5)  # let the driver see the VG gone
        before = ctl.GetCapacity(csi_pb2.GetCapacityRequest(
            parameters={"vgName": vg}, volume_capabilities=[cap()])).available_capacity
        lvm.vgextend(vg, [disk])
        grown.append(_visible_after(ctl, vg, before))
        lvm.command("vgreduce", "--", vg, disk)
        lvm.command("pvremove", "--yes", "--", disk)
        time.sleep(1.5)
    return {"new_vg_visible_p50": p50(built), "vg_grown_visible_p50": p50(grown),
            "new_vg_visible_max": max(built), "vg_grown_visible_max": max(grown)}


# ------------------------------------------------------------------ Probe while a clone runs

CLONE_JSON = "CSI_BENCH_CLONE_JSON "


def _block_cap() -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(
        block=csi_pb2.VolumeCapability.BlockVolume(),
        access_mode=csi_pb2.VolumeCapability.AccessMode(
            mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER))


def p99(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def probe_during_clone(devices: list[str], clone_mib: int, probes: int) -> dict[str, float]:
    """On a kernel with device-mapper: Probe p99 idle (the floor) and while a thick clone of
    clone_mib copies in the background; the copy's own throughput beside bare dd."""
    lvm = Lvm(Lvm.settings_for_this_kernel(timeout=300))
    vg = f"benchc{secrets.token_hex(3)}"
    out: dict[str, float] = {}
    lvm.vgcreate(vg, devices)
    try:
        with tempfile.TemporaryDirectory(prefix="csi-bench-") as tmp:
            sock = f"{tmp}/csi.sock"
            proc = start_driver(sock, vg, "--data-job-wait-seconds", "1")
            try:
                channel = unix_channel(f"unix://{sock}")
                grpc.channel_ready_future(channel).result(timeout=120)
                ctl = csi_pb2_grpc.ControllerStub(channel)
                ident = csi_pb2_grpc.IdentityStub(channel)
                size = clone_mib * MiB
                src = ctl.CreateVolume(csi_pb2.CreateVolumeRequest(
                    name="pvc-src", capacity_range=csi_pb2.CapacityRange(required_bytes=size),
                    volume_capabilities=[cap()]), timeout=600).volume
                # the floor: a bare dd copy of the same bytes into a scratch LV, and Probe
                # with nothing running
                lvm.lvcreate(vg, "scratch", size)
                out["dd_copy_s"] = timed(lambda: subprocess.run(
                    ["dd", f"if=/dev/{src.volume_id}", f"of=/dev/{vg}/scratch", "bs=4M",
                     f"count={clone_mib // 4}", "conv=fsync"],
                    check=True, capture_output=True, timeout=1200))
                lvm.lvremove(vg, "scratch")
                idle = [timed(lambda: ident.Probe(csi_pb2.ProbeRequest(), timeout=60))
                        for _ in range(probes)]
                out["probe_idle_p50"], out["probe_idle_p99"] = p50(idle), p99(idle)
                req = csi_pb2.CreateVolumeRequest(
                    name="pvc-clone", capacity_range=csi_pb2.CapacityRange(required_bytes=size),
                    volume_capabilities=[_block_cap()])
                req.volume_content_source.volume.volume_id = src.volume_id
                done = threading.Event()
                started = time.perf_counter()

                def clone() -> None:
                    while True:
                        try:
                            ctl.CreateVolume(req, timeout=600)
                            break
                        except grpc.RpcError as err:
                            if err.code() != grpc.StatusCode.ABORTED:
                                raise
                            time.sleep(0.5)
                    out["clone_s"] = time.perf_counter() - started
                    done.set()

                worker = threading.Thread(target=clone, daemon=True)
                worker.start()
                busy: list[float] = []
                while not done.is_set():
                    busy.append(timed(lambda: ident.Probe(csi_pb2.ProbeRequest(), timeout=60)))
                    time.sleep(0.02)
                worker.join()
                out["probe_busy_p50"], out["probe_busy_p99"] = p50(busy), p99(busy)
                out["probe_busy_n"] = len(busy)
                out["clone_mib"] = clone_mib
                channel.close()
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=60)
    finally:
        lvm.command("vgremove", "--yes", "--force", "--", vg)
        lvm.command("pvremove", "--yes", "--", *devices)
    return out


def probe_during_clone_anywhere(clone_mib: int, probes: int) -> dict[str, float]:
    """Here when this kernel has device-mapper, else in the real-kernel guest."""
    if has_device_mapper():
        with tempfile.TemporaryDirectory(prefix="csi-bench-") as tmp, \
                loop_disks(1, 2 * clone_mib * MiB + 512 * MiB, tmp) as disks:
            return probe_during_clone([d.device for d in disks], clone_mib, probes)
    with tempfile.TemporaryDirectory(prefix="csi-bench-guest-") as results:
        proc = subprocess.run(
            [sys.executable, "-m", "kernel_guest", "--quiet", "--timeout", "1800",
             "--results-dir", results, "run", "--", sys.executable,
             str(REPO / "benchmarks" / "csi_bench.py"), "--clone-only", "--clone-mib",
             str(clone_mib), "--probes", str(probes)],
            cwd=REPO, capture_output=True, text=True, timeout=2400,
            env={**os.environ, "PYTHONPATH": str(REPO)})
        console = Path(results, "console.log")
        text = proc.stdout + proc.stderr + (
            console.read_text(errors="replace") if console.exists() else "")
    for line in text.splitlines():
        if CLONE_JSON in line:
            result: dict[str, float] = json.loads(line.split(CLONE_JSON, 1)[1])
            result["in_guest"] = 1
            return result
    raise RuntimeError(f"the guest run gave no result (exit {proc.returncode}): {text[-2000:]}")


def report(r: dict[str, float], iterations: int, batch: int) -> str:
    def ms(key: str) -> str:
        return f"{r[key] * 1000:.1f} ms"

    create_ratio = r["create_volume_p50"] / r["bare_lvcreate_p50"]
    delete_ratio = r["delete_volume_p50"] / r["bare_lvremove_p50"]
    batch_ratio = r["concurrent_create_s"] / r["serial_lvcreate_s"]
    batch_del_ratio = r["concurrent_delete_s"] / r["serial_lvremove_s"]
    ok = {
        "create": create_ratio <= 1.25,
        "delete": delete_ratio <= 1.2,
        "batch": batch_ratio <= 1.2 and r["concurrent_errors"] == 0,
        "capacity": r["get_capacity_p50"] < 0.005,
        "rss": r["idle_rss_mib"] < 60,
        "new_vg": r["new_vg_visible_max"] < 5,
        "vg_grown": r["vg_grown_visible_max"] < 5,
    }

    def verdict(key: str) -> str:
        return "met" if ok[key] else "**missed**"

    lines = [
        SECTION,
        "",
        f"`python benchmarks/csi_bench.py --iterations {iterations} --batch {batch}` on "
        f"{platform.node() or 'this machine'} ({os.cpu_count()} cores, kernel "
        f"{platform.release()}), sparse loop disks, LVM with activation "
        f"{'on' if has_device_mapper() else 'disabled (this kernel has no device-mapper)'}"
        f", {SIZE // MiB} MiB volumes, {time.strftime('%Y-%m-%d')}; load average at the end "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} (a shared machine: other engineers' "
        "real-kernel guests were running).",
        "",
        "| measure | driver | floor (bare lvm) | ratio | target |",
        "|---|---|---|---|---|",
        f"| CreateVolume p50 (gRPC) vs `lvcreate` | {ms('create_volume_p50')} | "
        f"{ms('bare_lvcreate_p50')} | {create_ratio:.2f}x | <= 1.25x: {verdict('create')} |",
        f"| DeleteVolume p50 (gRPC) vs `lvremove` | {ms('delete_volume_p50')} | "
        f"{ms('bare_lvremove_p50')} | {delete_ratio:.2f}x | <= 1.2x: {verdict('delete')} |",
        f"| {batch} concurrent CreateVolume vs {batch} serial `lvcreate` | "
        f"{r['concurrent_create_s']:.2f} s | {r['serial_lvcreate_s']:.2f} s | "
        f"{batch_ratio:.2f}x | <= 1.2x, 0 errors ({int(r['concurrent_errors'])}): "
        f"{verdict('batch')} |",
        f"| {batch} concurrent DeleteVolume vs {batch} serial `lvremove` | "
        f"{r['concurrent_delete_s']:.2f} s | {r['serial_lvremove_s']:.2f} s | "
        f"{batch_del_ratio:.2f}x | - |",
        f"| GetCapacity p50 | {ms('get_capacity_p50')} | - | - | < 5 ms: "
        f"{verdict('capacity')} |",
        f"| idle plugin memory (VmRSS) | {r['idle_rss_mib']:.1f} MiB | - | - | < 60 MB: "
        f"{verdict('rss')} |",
        f"| a VG built after start (bare `vgcreate`) visible in GetCapacity, p50 (max) | "
        f"{ms('new_vg_visible_p50')} ({ms('new_vg_visible_max')}) | 30 s periodic refresh | "
        f"{r['new_vg_visible_p50'] / 30:.3f}x | within seconds: {verdict('new_vg')} |",
        f"| the default VG grown (bare `vgextend`) visible in GetCapacity, p50 (max) | "
        f"{ms('vg_grown_visible_p50')} ({ms('vg_grown_visible_max')}) | 30 s periodic refresh "
        f"| {r['vg_grown_visible_p50'] / 30:.3f}x | within seconds: {verdict('vg_grown')} |",
        *clone_rows(r),
        "",
        "CreateVolume is one `lvcreate` carrying every tag (ownership, name, context): no lookup "
        "before it (the VG's extent size comes from the capacity cache; an existing volume is "
        "recognised by lvcreate's \"already exists\"), so the gRPC path adds only "
        "validation and the call itself. DeleteVolume of a volume with no wipe policy is one "
        "`lvremove --select` whose selection carries the ownership, kind and plain-delete tags "
        "and excludes thick origins (no `lvs` first); others are looked up, wiped, removed. "
        "Concurrent "
        "batches beat the serial floor because the lvm processes start in parallel and "
        "LVM serialises only its short metadata commit; GetCapacity is answered from memory. "
        "A VG built after start is found by the first GetCapacity that misses it (an LVM "
        "read at most every 2 s); a change to a known VG is noticed by a stat() of LVM's "
        "metadata backup directory every second (no LVM process while nothing changes) or a "
        "block device uevent, which mark the cache stale for the next GetCapacity.",
        "",
        *([
            "Probe while a clone copies: the copy runs as a background job outside the gRPC "
            "workers and Probe answers from the capacity cache's recent LVM read (no lvm "
            "process), so its p50 does not move; its p99 follows the emulated CPU's contention "
            "(the guest has 2 vCPUs for the copy, the driver and the probes). The clone's time "
            "includes the temporary snapshot and the copy in 4 MiB chunks with fsync; the "
            "CreateVolume that starts it waits for it within its deadline (no retries).",
            "",
        ] if "probe_busy_p99" in r else []),
    ]
    return "\n".join(lines)


def clone_rows(r: dict[str, float]) -> list[str]:
    if "probe_busy_p99" not in r:
        return []
    where = "in the real-kernel guest (qemu TCG: every figure is slow, the ratio counts)" \
        if r.get("in_guest") else "on this host"
    ratio = r["probe_busy_p99"] / r["probe_idle_p99"]
    return [
        f"| Probe p99 while a {int(r['clone_mib'])} MiB thick clone copies ({where}) vs "
        f"Probe p99 idle | {r['probe_busy_p99'] * 1000:.1f} ms (p50 "
        f"{r['probe_busy_p50'] * 1000:.1f} ms, {int(r['probe_busy_n'])} calls) | "
        f"{r['probe_idle_p99'] * 1000:.1f} ms (p50 {r['probe_idle_p50'] * 1000:.1f} ms) | "
        f"{ratio:.2f}x | answers promptly: the copy is a background job |",
        f"| that clone, first CreateVolume to done (the call waits for the copy within its "
        f"600 s deadline; ABORTED would be retried every 0.5 s) vs a bare `dd` copy "
        f"of the source | {r['clone_s']:.1f} s | {r['dd_copy_s']:.1f} s | "
        f"{r['clone_s'] / r['dd_copy_s']:.2f}x | - |",
    ]


def write_docs(section: str) -> None:
    write_section(SECTION, section)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--write-docs", action="store_true")
    parser.add_argument("--clone-mib", type=int, default=1024,
                        help="size of the clone during which Probe is measured (0: skip)")
    parser.add_argument("--probes", type=int, default=200)
    parser.add_argument("--clone-figures", default="", metavar="JSON",
                        help="reuse the JSON line of an earlier --clone-only run")
    parser.add_argument("--clone-only", action="store_true",
                        help="only the Probe-during-clone part, on this kernel's disks "
                        "(EDGE_GUEST_DISKS in the guest); prints one JSON line")
    args = parser.parse_args()
    if args.clone_only:
        disks = [d for d in os.environ.get("EDGE_GUEST_DISKS", "").split(",") if d]
        figures = probe_during_clone(disks[:1], args.clone_mib, args.probes) if disks else \
            probe_during_clone_anywhere(args.clone_mib, args.probes)
        print(CLONE_JSON + json.dumps(figures), flush=True)
        return 0
    results = run(args.iterations, args.batch)
    if args.clone_figures:
        results.update(json.loads(args.clone_figures))
    elif args.clone_mib:
        results.update(probe_during_clone_anywhere(args.clone_mib, args.probes))
    section = report(results, args.iterations, args.batch)
    print(section)
    if args.write_docs:
        write_docs(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
