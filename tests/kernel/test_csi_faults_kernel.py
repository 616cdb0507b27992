"""Faults INSIDE one LVM command, on live LVs (issue 11): what kubelet and the sidecars see.

Each test drives the driver through its gRPC socket as csi-provisioner, csi-snapshotter and
kubelet would, while tests/kernel/faults.py stops or kills ONE lvm command at a chosen ioctl:

1. lvcreate killed after its metadata commit, before it activated or wiped the LV, on extents
   that hold a previous tenant's data: the retried CreateVolume gives a volume that shows none
   of it, as a filesystem or as a raw block device.
2. a thick lvcreate --snapshot killed between its two commits (a plain LV with snapshot tags):
   the retried CreateSnapshot gives a real snapshot, and a restore shows the origin's data.
3. DeleteVolume of a volume that is open, published (device bind, no opener) or mounted:
   FAILED_PRECONDITION and the data intact; after unpublish it deletes.
4. lvextend stalled between suspend and resume beyond the driver's LVM timeout: the RPC answers
   ABORTED, the command is not killed, the volume stays locked, then resumes and the retry
   converges; lvextend killed there: the LV stays suspended until the next start-up sweep
   repairs it (Event in the log, metric), the data intact and the retry converging.
5. CreateVolume of a plain volume (filesystem / raw block, thick / thin) runs ONE state-changing
   lvm process (its lvcreate; the wipe is the driver's, the tag removal a background batch):
   counted through the lvm prefix. The driver SIGKILLed after the answer, before that batch:
   after a restart the volume is still there, its first publish shows none of the previous
   tenant's data and drops the tag, and nothing is left behind.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from csi_lvm.mounter import Mounter
from csi_lvm.server import Driver
from csi_lvm.volume import TAG_UNFINISHED, parse_id, read_tags
from edge_common.commands import run
from edge_common.devmapper import dm_info, dm_name
from edge_common.log import JsonFormatter
from edge_common.lvm import Lvm
from edge_common.lvm.runner import READ_ONLY_SUBCOMMANDS
from edge_common.server import unix_channel
from edge_proto.csi.v1 import csi_pb2, csi_pb2_grpc
from tests.csi.conftest import block_cap, create_request, make_config, mount_cap
from tests.kernel.faults import KILL, LvmFaults, alive, dm_call, stall, suspends, wait_gone
from tests.kernel.test_csi_lifecycle import device_write, scan_for
from tests.rigs.lvm import unique_vg_name

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(1200)]

MiB = 1 << 20
REPO = Path(__file__).resolve().parents[2]
POOL = "pool0"
LVM_TIMEOUT = 40.0  # the driver's per-command limit; every lvm call here ends well within it
RPC = 600.0


class Rig:
    """One in-process driver (mode all: controller + node) whose lvm goes through the fault
    prefix; restart() is a new process life: a new Driver, its start-up sweep first."""

    def __init__(self, vg: str, lvm: Lvm, faults: LvmFaults, tmp: Path) -> None:
        self.vg = vg
        self.lvm = lvm
        self.faults = faults
        self.pods = tmp / "pods"
        self.pods.mkdir()
        self.sock_dir = Path(f"/tmp/kf-{secrets.token_hex(4)}")
        self.sock_dir.mkdir()
        self.config = make_config(vg, self.sock_dir, lvm_command=faults.command,
                                  lvm_timeout_seconds=LVM_TIMEOUT, default_thin_pool=POOL)
        self.driver: Driver | None = None
        self.channel: grpc.Channel | None = None
        self.mounter = Mounter(timeout=120)
        self.start()

    def start(self) -> None:
        self.driver = Driver(self.config)
        self.driver.start()
        self.channel = unix_channel(self.config.endpoint)
        grpc.channel_ready_future(self.channel).result(timeout=120)
        self.ctl = csi_pb2_grpc.ControllerStub(self.channel)
        self.node = csi_pb2_grpc.NodeStub(self.channel)

    def stop(self) -> None:
        if self.channel is not None:
            self.channel.close()
        if self.driver is not None:
            self.driver.stop(grace=1)
        self.driver = self.channel = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def target(self, name: str) -> str:
        return str(self.pods / name)

    def create(self, name: str, size: int, cap: Any, **params: str) -> Any:
        req = create_request(name, required=size, caps=[cap])
        req.parameters.update(params)
        return self.ctl.CreateVolume(req, timeout=RPC).volume

    def publish(self, vol: Any, target: str, cap: Any) -> None:
        self.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
            volume_id=vol.volume_id, target_path=target, volume_capability=cap,
            volume_context=vol.volume_context), timeout=RPC)

    def unpublish(self, volume_id: str, target: str) -> None:
        self.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=volume_id, target_path=target), timeout=RPC)

    def delete(self, volume_id: str) -> None:
        self.ctl.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume_id), timeout=RPC)

    def expand(self, volume_id: str, size: int) -> int:
        return int(self.ctl.ControllerExpandVolume(csi_pb2.ControllerExpandVolumeRequest(
            volume_id=volume_id, capacity_range=csi_pb2.CapacityRange(required_bytes=size)),
            timeout=RPC).capacity_bytes)

    def ours(self) -> dict[str, Any]:
        found = {}
        for lv in self.lvm.lvs(self.vg):
            own = read_tags(lv.tags, self.config.driver_name)
            if own.owned:
                found[lv.name] = (lv, own)
        return found

    def pe_ranges(self, name: str) -> set[str]:
        out = self.lvm.command("lvs", "--noheadings", "-o", "seg_pe_ranges", "--",
                               f"{self.vg}/{name}")
        return {r for r in out.stdout_text.split() if r}


@pytest.fixture
def rig(kernel_disks: list[str], lvm: Lvm, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> Iterator[Rig]:
    vg = unique_vg_name("kf")
    lvm.vgcreate(vg, kernel_disks[:2])
    lvm.create_thin_pool(vg, POOL, 256 * MiB)
    faults = LvmFaults(tmp_path / "faults")
    for key, value in faults.env.items():
        monkeypatch.setenv(key, value)
    # The driver's log (in-process) goes where the guest's results come back to the host.
    shared = os.environ.get("EDGE_GUEST_RESULTS")
    handler = logging.FileHandler(Path(shared if shared and os.path.isdir(shared) else tmp_path)
                                  / f"faults-{vg}.log")
    handler.setFormatter(JsonFormatter())
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)
    r = Rig(vg, lvm, faults, tmp_path)
    try:
        yield r
    finally:
        for lv in lvm.lvs(vg, timeout=120):  # first: unmounting a suspended LV would hang
            info = dm_info(dm_name(vg, lv.name))
            if info is not None and info.suspended:
                logging.warning("teardown: %s still suspended; resuming it", lv.name)
                run(["dmsetup", "resume", dm_name(vg, lv.name)], timeout=120)
        for entry in reversed(r.mounter.mounts()):
            if entry.mount_point.startswith(str(r.pods) + "/"):
                r.mounter.unmount_all(entry.mount_point)
        r.stop()
        logging.getLogger().removeHandler(handler)
        handler.close()
        for p in r.sock_dir.iterdir():
            p.unlink()
        r.sock_dir.rmdir()
        lvm.command("vgremove", "--yes", "--force", "--", vg)
        lvm.command("pvremove", "--yes", "--", *kernel_disks[:2])


def holds(path: str, marker: bytes) -> bool:
    with open(path, "rb", buffering=0) as f:
        return scan_for(f, marker)


def code_of(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def lvcreate_kill_point(rig: Rig, **kw: Any) -> int:
    """lvm's ioctl count up to the new LV's DM_DEV_CREATE (after the metadata commit)."""
    name = f"calib{secrets.token_hex(2)}"
    when = rig.faults.calibrate(
        rig.lvm, lambda lvm: lvm.lvcreate(rig.vg, name, 8 * MiB, tags=["calibration"], **kw),
        lambda line: dm_call(line, "DM_DEV_CREATE", dm_name(rig.vg, name)))
    rig.lvm.lvremove(rig.vg, name)
    return when


# ---------------------------------------------------------------------------- 1. new volumes


@pytest.mark.parametrize("fs_type", ["", "ext4"])
def test_lvcreate_killed_after_its_metadata_commit_never_hands_out_the_previous_tenants_data(
    rig: Rig, fs_type: str,
) -> None:
    cap = mount_cap(fs_type) if fs_type else block_cap()
    size = 32 * MiB
    marker = b"PREVIOUS-TENANT-" + secrets.token_hex(8).encode()
    # The previous tenant: a volume holding the marker (a filesystem with a file, or raw).
    old = rig.create("pvc-old", size, cap, lvmType="linear")
    old_extents = rig.pe_ranges("pvc-old")
    rig.publish(old, rig.target("old"), cap)
    if fs_type:
        Path(rig.target("old"), "secret.txt").write_bytes(marker)
    else:
        device_write(rig.target("old"), 0, marker * (size // len(marker)))
    rig.unpublish(old.volume_id, rig.target("old"))
    rig.delete(old.volume_id)

    when = lvcreate_kill_point(rig)
    rig.faults.arm("lvcreate", when, KILL)
    code, details = code_of(lambda: rig.create("pvc-new", size, cap, lvmType="linear"))
    assert rig.faults.killed(), "the fault point was never reached:\n" + rig.faults.trace()
    assert code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE), details
    # The fault point: committed with every tag (and `unfinished`), never activated or wiped.
    lv, own = rig.ours()["pvc-new"]
    assert own.unfinished and not lv.is_active
    assert rig.pe_ranges("pvc-new") == old_extents

    new = rig.create("pvc-new", size, cap, lvmType="linear")  # the provisioner's retry
    target = rig.target("new")
    rig.publish(new, target, cap)
    if fs_type:
        assert sorted(os.listdir(target)) == ["lost+found"], "the old filesystem was mounted"
    else:
        assert not holds(target, marker), "the raw volume shows the previous tenant's data"
    assert TAG_UNFINISHED not in rig.ours()["pvc-new"][0].tags
    rig.unpublish(new.volume_id, target)
    rig.delete(new.volume_id)
    assert rig.ours() == {}


# ---------------------------------------------------------------------------- 2. snapshots


def test_thick_snapshot_killed_between_its_two_commits_is_redone_and_restores_the_origin(
    rig: Rig,
) -> None:
    cap = block_cap()
    size = 32 * MiB
    marker = b"FOREIGN-" + secrets.token_hex(8).encode()
    # Foreign data on the extents the snapshot's copy-on-write area will get.
    junk = rig.create("pvc-junk", 16 * MiB, cap, lvmType="linear")
    rig.publish(junk, rig.target("junk"), cap)
    device_write(rig.target("junk"), 0, marker * (16 * MiB // len(marker)))
    rig.unpublish(junk.volume_id, rig.target("junk"))
    origin = rig.create("pvc-origin", size, cap, lvmType="linear")
    rig.delete(junk.volume_id)
    rig.publish(origin, rig.target("origin"), cap)
    payload = os.urandom(MiB)
    device_write(rig.target("origin"), 0, payload)
    rig.unpublish(origin.volume_id, rig.target("origin"))

    name = f"calsnap{secrets.token_hex(2)}"
    origin_lv = parse_id(origin.volume_id).lv
    when = rig.faults.calibrate(
        rig.lvm, lambda lvm: lvm.create_snapshot(rig.vg, origin_lv, name, size_bytes=8 * MiB),
        lambda line: dm_call(line, "DM_DEV_CREATE", dm_name(rig.vg, name)))
    rig.lvm.lvremove(rig.vg, name)
    request = csi_pb2.CreateSnapshotRequest(name="snap-thick", source_volume_id=origin.volume_id,
                                            parameters={"snapshotSize": "8Mi"})
    rig.faults.arm("lvcreate", when, KILL)
    code_of(lambda: rig.ctl.CreateSnapshot(request, timeout=RPC))
    assert rig.faults.killed(), "the fault point was never reached:\n" + rig.faults.trace()
    leftovers = {n: (lv, own) for n, (lv, own) in rig.ours().items() if own.kind == "snapshot"}
    (lv, own), = leftovers.values()
    assert not lv.attr.snapshot, "expected a plain LV carrying snapshot tags at this point"
    # Not served while it is what it is:
    assert rig.ctl.ListSnapshots(csi_pb2.ListSnapshotsRequest(), timeout=RPC).entries == []

    snap = rig.ctl.CreateSnapshot(request, timeout=RPC).snapshot  # the snapshotter's retry
    assert snap.ready_to_use
    real, _ = rig.ours()[parse_id(snap.snapshot_id).lv]
    assert real.attr.snapshot and real.origin == origin_lv
    req = create_request("pvc-restore", required=size, caps=[cap])
    req.parameters["lvmType"] = "linear"
    req.volume_content_source.snapshot.snapshot_id = snap.snapshot_id
    restored = rig.ctl.CreateVolume(req, timeout=RPC).volume
    rig.publish(restored, rig.target("restore"), cap)
    with open(rig.target("restore"), "rb") as f:
        assert f.read(MiB) == payload
    assert not holds(rig.target("restore"), marker)
    rig.unpublish(restored.volume_id, rig.target("restore"))
    rig.delete(restored.volume_id)
    rig.ctl.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id),
                           timeout=RPC)
    rig.delete(origin.volume_id)
    assert rig.ours() == {}


# ---------------------------------------------------------------------------- 3. in use


def test_a_volume_in_use_is_never_deleted_or_wiped(rig: Rig) -> None:
    payload = os.urandom(MiB)
    block = rig.create("pvc-raw", 32 * MiB, block_cap(), lvmType="linear")
    target = rig.target("raw")
    rig.publish(block, target, block_cap())
    device_write(target, 0, payload)
    # A pod holds the raw device open.
    fd = os.open(target, os.O_RDWR)
    try:
        code, details = code_of(lambda: rig.delete(block.volume_id))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "open" in details, details
    finally:
        os.close(fd)
    # Published, no pod running: the device node is still bound onto the target.
    code, details = code_of(lambda: rig.delete(block.volume_id))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and target in details, details
    with open(target, "rb") as f:
        assert f.read(MiB) == payload  # nothing was wiped
    assert "pvc-raw" in rig.ours()

    fs = rig.create("pvc-fs", 32 * MiB, mount_cap("ext4"), lvmType="thin")
    fs_target = rig.target("fs")
    rig.publish(fs, fs_target, mount_cap("ext4"))
    Path(fs_target, "data").write_bytes(payload)
    code, details = code_of(lambda: rig.delete(fs.volume_id))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and fs_target in details, details
    assert Path(fs_target, "data").read_bytes() == payload

    rig.unpublish(block.volume_id, target)
    rig.unpublish(fs.volume_id, fs_target)
    rig.delete(block.volume_id)
    rig.delete(fs.volume_id)
    assert rig.ours() == {}


# ---------------------------------------------------------------------------- 4. lvextend


class Recorder:
    """An Event sink (csi_lvm.poolwatch.make_sink's interface) that keeps what it is told."""

    def __init__(self, events: list[tuple[str, str, bool]]) -> None:
        self.events = events

    def event(self, reason: str, message: str, *, warning: bool) -> None:
        self.events.append((reason, message, warning))


def lvextend_resume_point(rig: Rig) -> int:
    """lvm's ioctl count up to the one right after lvextend's suspend (the resume)."""
    name = f"calib{secrets.token_hex(2)}"
    rig.lvm.lvcreate(rig.vg, name, 8 * MiB)
    when = rig.faults.calibrate(rig.lvm, lambda lvm: lvm.lvextend(rig.vg, name, 16 * MiB),
                                lambda line: suspends(line, dm_name(rig.vg, name)))
    rig.lvm.lvremove(rig.vg, name)
    return when + 1


@pytest.mark.timeout(900)
def test_lvextend_between_suspend_and_resume_is_never_killed_and_a_killed_one_is_repaired(
    rig: Rig, monkeypatch: pytest.MonkeyPatch,
) -> None:
    cap = mount_cap("ext4")
    vol = rig.create("pvc-grow", 32 * MiB, cap, lvmType="linear")
    target = rig.target("grow")
    rig.publish(vol, target, cap)
    payload = os.urandom(MiB)
    Path(target, "data").write_bytes(payload)
    os.sync()
    resume = lvextend_resume_point(rig)
    name = dm_name(rig.vg, "pvc-grow")

    # Slower than the driver's LVM timeout, stalled right before the resume.
    rig.faults.arm("lvextend", resume, stall(LVM_TIMEOUT + 60))
    start = time.monotonic()
    code, details = code_of(lambda: rig.expand(vol.volume_id, 64 * MiB))
    assert code == grpc.StatusCode.ABORTED and "never killed" in details, details
    assert time.monotonic() - start >= LVM_TIMEOUT
    lvm_pid = rig.faults.pid()
    info = dm_info(name)
    assert info is not None and info.suspended and alive(lvm_pid), (info, rig.faults.trace())
    code, details = code_of(lambda: rig.expand(vol.volume_id, 64 * MiB))
    assert code == grpc.StatusCode.ABORTED, details  # the volume stays locked meanwhile
    wait_gone(lvm_pid, 180)
    info = dm_info(name)
    assert info is not None and not info.suspended
    assert rig.expand(vol.volume_id, 64 * MiB) >= 64 * MiB  # converges
    assert Path(target, "data").read_bytes() == payload

    # Killed right there (container kill, power loss): suspended until the next start-up.
    rig.faults.arm("lvextend", resume, KILL)
    code_of(lambda: rig.expand(vol.volume_id, 96 * MiB))
    assert rig.faults.killed(), "the fault point was never reached:\n" + rig.faults.trace()
    info = dm_info(name)
    assert info is not None and info.suspended
    events: list[tuple[str, str, bool]] = []
    monkeypatch.setattr("csi_lvm.server.make_sink", lambda config: Recorder(events))
    rig.restart()
    info = dm_info(name)
    assert info is not None and not info.suspended, f"the sweep did not resume it: {events}"
    repairs = [(reason, message, warning) for reason, message, warning in events
               if reason.startswith("VolumeRepair")]  # (pool warnings go the same way)
    assert [(reason, warning) for reason, _, warning in repairs] == [("VolumeRepaired", True)]
    assert "suspended" in repairs[0][1]
    assert rig.driver is not None and rig.driver.registry.get_sample_value(
        "csi_lvm_startup_repairs_total", {"action": "refreshed"}) == 1
    assert Path(target, "data").read_bytes() == payload  # the pod's I/O flows again
    assert rig.expand(vol.volume_id, 96 * MiB) >= 96 * MiB
    rig.unpublish(vol.volume_id, target)
    rig.delete(vol.volume_id)
    assert rig.ours() == {}


# ---------------------------------------------------------------------------- 5. the finisher
#
# CreateVolume of a plain volume: lvcreate (born `unfinished`), the driver's O_EXCL head/tail
# wipe (none for a thin volume of a zeroing pool), the answer; the tag goes in the background
# finisher's batched lvchange (csi_lvm/finish.py). A thick raw block volume is zeroed whole
# (create_wipe auto: its middle would otherwise show the previous tenant): a `pending` fill
# whose own lvchange closes it before the answer, the zeroing dominating its time.

KINDS = [pytest.param("ext4", "linear", id="fs-thick"),
         pytest.param("ext4", "thin", id="fs-thin"),
         pytest.param("", "linear", id="block-thick"),
         pytest.param("", "thin", id="block-thin")]
FILLED = ("", "linear")  # the pending path


def reconfigure(rig: Rig, **overrides: Any) -> None:
    rig.stop()
    rig.config = dataclasses.replace(rig.config, **overrides)
    rig.start()


def wait_finished(rig: Rig, name: str, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while rig.ours()[name][1].unfinished:
        assert time.monotonic() < deadline, "the background finisher never dropped the tag"
        time.sleep(1)


def previous_tenant(rig: Rig, cap: Any, lvm_type: str, size: int) -> bytes:
    """A deleted volume that held a marker (a file, or the whole raw device): on the extents
    (thick) or in the pool (thin) the next volume gets."""
    marker = b"PREVIOUS-TENANT-" + secrets.token_hex(8).encode()
    old = rig.create("pvc-old", size, cap, lvmType=lvm_type)
    rig.publish(old, rig.target("old"), cap)
    if cap.HasField("mount"):
        Path(rig.target("old"), "secret.txt").write_bytes(marker)
    else:
        device_write(rig.target("old"), 0, marker * (size // len(marker)))
    rig.unpublish(old.volume_id, rig.target("old"))
    rig.delete(old.volume_id)
    return marker


def use_and_check(rig: Rig, vol: Any, cap: Any, marker: bytes) -> None:
    """Publish: the previous tenant's data is nowhere to be seen; the tag is gone; then away."""
    target = rig.target("new")
    rig.publish(vol, target, cap)
    if cap.HasField("mount"):
        assert sorted(os.listdir(target)) == ["lost+found"], "the old filesystem was mounted"
        Path(target, "mine.txt").write_bytes(b"mine")
    else:
        assert not holds(target, marker), "the raw volume shows the previous tenant's data"
    assert not rig.ours()[parse_id(vol.volume_id).lv][1].unfinished
    rig.unpublish(vol.volume_id, target)
    rig.delete(vol.volume_id)
    assert rig.ours() == {}


@pytest.mark.parametrize(("fs_type", "lvm_type"), KINDS)
def test_create_volume_runs_one_lvm_change_and_the_tag_goes_in_the_background(
    rig: Rig, fs_type: str, lvm_type: str,
) -> None:
    # No periodic capacity refresh during the call (it would be a report of another thread);
    # the finisher waits 10 s before its batch, so the call's own processes are counted alone.
    reconfigure(rig, finish_delay_seconds=10.0, capacity_refresh_seconds=3600.0)
    cap = mount_cap(fs_type) if fs_type else block_cap()
    size = 32 * MiB
    marker = previous_tenant(rig, cap, lvm_type, size)
    rig.ctl.GetCapacity(csi_pb2.GetCapacityRequest(), timeout=RPC)  # a warm cache, as in use

    before = len(rig.faults.calls())
    vol = rig.create("pvc-new", size, cap, lvmType=lvm_type)
    during = rig.faults.calls()[before:]
    if (fs_type, lvm_type) == FILLED:
        # A leftover of an earlier attempt is looked for (a pending one is redone), the LV
        # zeroed whole, both tags dropped, then the answer.
        assert during == ["lvs", "lvcreate", "lvchange"], during
        assert not rig.ours()["pvc-new"][1].unfinished
        use_and_check(rig, vol, cap, marker)
        return
    # Exactly one state-changing LVM process: the lvcreate. A thin create also reads the
    # pool (its room is checked against LVM, not a cache); a thick one nothing else.
    assert [c for c in during if c not in READ_ONLY_SUBCOMMANDS] == ["lvcreate"], during
    if lvm_type == "linear":
        assert during == ["lvcreate"], during
    lv, own = rig.ours()["pvc-new"]
    assert own.unfinished, "answered after the tag removal: it is on the critical path"
    assert lv.is_active

    wait_finished(rig, "pvc-new")
    assert rig.faults.calls()[before + len(during):].count("lvchange") == 1
    assert rig.driver is not None
    registry = rig.driver.registry
    deadline = time.monotonic() + 60  # the tag is gone when lvchange ends, the count after
    while not registry.get_sample_value("csi_lvm_finisher_volumes_total"):
        assert time.monotonic() < deadline, "the finisher's batch was not counted"
        time.sleep(0.5)
    use_and_check(rig, vol, cap, marker)


def start_driver_process(rig: Rig, log: Path, *extra: str) -> subprocess.Popen[bytes]:
    """The driver as its own process (SIGKILL-able), with the rig's config and lvm prefix."""
    cfg = rig.config
    argv = [sys.executable, "-m", "csi_lvm", "--endpoint", cfg.endpoint,
            "--node-id", cfg.node_id, "--driver-name", cfg.driver_name,
            "--default-vg", cfg.default_vg, "--default-thin-pool", POOL,
            "--lvm-command", ",".join(cfg.lvm_command),
            "--lvm-timeout-seconds", str(LVM_TIMEOUT), "--create-wipe", cfg.create_wipe.value,
            *extra]
    with log.open("ab") as out:
        proc = subprocess.Popen(argv, cwd=REPO, stdout=out, stderr=out,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
    return proc


@pytest.mark.parametrize(("fs_type", "lvm_type"), [KINDS[0], KINDS[3]])
def test_driver_killed_after_the_answer_before_the_background_tag_removal_loses_nothing(
    rig: Rig, fs_type: str, lvm_type: str, tmp_path: Path,
) -> None:
    cap = mount_cap(fs_type) if fs_type else block_cap()
    size = 32 * MiB
    marker = previous_tenant(rig, cap, lvm_type, size)

    rig.stop()
    shared = os.environ.get("EDGE_GUEST_RESULTS")
    log = Path(shared if shared and os.path.isdir(shared) else tmp_path) / "killed-driver.log"
    # The finisher's batch "never comes" before the kill: its gather delay is an hour.
    proc = start_driver_process(rig, log, "--finish-delay-seconds", "3600")
    try:
        channel = unix_channel(rig.config.endpoint)
        grpc.channel_ready_future(channel).result(timeout=120)
        req = create_request("pvc-new", required=size, caps=[cap])
        req.parameters["lvmType"] = lvm_type
        vol = csi_pb2_grpc.ControllerStub(channel).CreateVolume(req, timeout=RPC).volume
        channel.close()
        assert rig.ours()["pvc-new"][1].unfinished, "the tag was gone before the kill"
    finally:
        proc.kill()  # SIGKILL: no shutdown, no last batch
        proc.wait(timeout=60)
    Path(rig.config.endpoint.removeprefix("unix://")).unlink(missing_ok=True)
    assert rig.ours()["pvc-new"][1].unfinished

    rig.start()  # a new process life (its start-up sweep first); the queue is gone
    assert sorted(rig.ours()) == ["pvc-new"], "an orphan, or the answered volume removed"
    # The first publish finds it unfinished and not queued: wipes it again (never used:
    # nothing lost) and drops the tag.
    use_and_check(rig, vol, cap, marker)
