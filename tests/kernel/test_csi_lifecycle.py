"""The whole volume lifecycle on live LVs, through the driver's gRPC socket (issue 6, 2 and 3).

The driver runs as its own process (``python -m csi_lvm``), as in the DaemonSet, and is
called as kubelet and the sidecars would call it: CreateVolume (linear, striped, thin) ->
NodePublishVolume (ext4, xfs, raw block) -> write and read back -> NodeExpandVolume while
mounted (the filesystem grows online) -> NodeGetVolumeStats -> CreateSnapshot (thin, and thick
copy-on-write) -> CreateVolume from the snapshot, data intact -> NodeUnpublishVolume ->
DeleteVolume. A new volume on freed extents shows none of the old data. A SIGKILL of the
driver between steps, then a restart and the caller's retries, leaves nothing orphaned.

Runs in the qemu guest (``python -m kernel_guest pytest``) on its virtual disks, or on a host
whose kernel has device-mapper (on sparse loop disks); skipped elsewhere (tests/kernel/conftest).
The driver's log goes to EDGE_GUEST_RESULTS (brought back to the host) or tmp_path.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import grpc
import pytest

from csi_lvm.mounter import Mounter
from csi_lvm.stats import block_device_size, filesystem_usage
from csi_lvm.volume import owner_tag, read_tags
from edge_common.lvm import Lvm
from edge_common.server import unix_channel
from edge_proto.csi.v1 import csi_pb2, csi_pb2_grpc
from tests.rigs.lvm import unique_vg_name

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(900)]

MiB = 1 << 20
Mode = csi_pb2.VolumeCapability.AccessMode
Usage = csi_pb2.VolumeUsage
REPO = Path(__file__).resolve().parents[2]
POOL = "pool"
READY_TIMEOUT = 180.0  # Python + grpc start-up under TCG emulation takes a while
RPC_TIMEOUT = 300.0


def mount_cap(fs_type: str = "", mode: Any = Mode.SINGLE_NODE_WRITER) -> Any:
    return csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(fs_type=fs_type), access_mode=Mode(mode=mode))


def block_cap(mode: Any = Mode.SINGLE_NODE_WRITER) -> Any:
    return csi_pb2.VolumeCapability(block=csi_pb2.VolumeCapability.BlockVolume(),
                                    access_mode=Mode(mode=mode))


def results_dir(tmp_path: Path) -> Path:
    shared = os.environ.get("EDGE_GUEST_RESULTS")
    return Path(shared) if shared and os.path.isdir(shared) else tmp_path


# ---------------------------------------------------------------------------- the driver process


@dataclass
class DriverProcess:
    """csi-lvm as a separate process on a unix socket; killable with SIGKILL."""

    vg: str
    log_path: Path
    driver_name: str = field(default_factory=lambda: f"k{secrets.token_hex(4)}.csi.edge.io")
    node_id: str = "guest-node"
    endpoint: str = field(default_factory=lambda: f"unix:///tmp/csi-{secrets.token_hex(4)}.sock")
    proc: subprocess.Popen[bytes] | None = None
    channel: grpc.Channel | None = None
    starts: int = 0

    @property
    def argv(self) -> list[str]:
        return [sys.executable, "-m", "csi_lvm", "--endpoint", self.endpoint,
                "--node-id", self.node_id, "--driver-name", self.driver_name,
                "--default-vg", self.vg, "--default-thin-pool", POOL,
                "--lvm-timeout-seconds", "300",
                # copies and full wipes answer within the call (background jobs: elsewhere)
                "--data-job-wait-seconds", "300"]

    def start(self) -> None:
        assert self.proc is None
        self.starts += 1
        with open(self.log_path, "ab") as log:
            log.write(f"\n===== start {self.starts}: {' '.join(self.argv)}\n".encode())
            self.proc = subprocess.Popen(self.argv, cwd=REPO, stdout=log, stderr=log,
                                         stdin=subprocess.DEVNULL)
        self.channel = unix_channel(self.endpoint)
        deadline = time.monotonic() + READY_TIMEOUT
        identity = csi_pb2_grpc.IdentityStub(self.channel)
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"csi-lvm exited {self.proc.returncode} at start-up; "
                                     f"see {self.log_path}:\n{self.log_tail()}")
            try:
                if identity.Probe(csi_pb2.ProbeRequest(), timeout=10).ready.value:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"csi-lvm not ready after {READY_TIMEOUT}s:\n"
                                     f"{self.log_tail()}")
            time.sleep(0.5)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _close(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None

    def kill(self) -> None:
        """SIGKILL: no graceful shutdown, no cleanup."""
        assert self.proc is not None
        self._close()
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(60)
        self.proc = None

    def stop(self) -> None:
        self._close()
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
            self.proc = None

    def restart_after_kill(self) -> None:
        self.kill()
        self.start()

    @property
    def controller(self) -> csi_pb2_grpc.ControllerStub:
        assert self.channel is not None
        return csi_pb2_grpc.ControllerStub(self.channel)

    @property
    def node(self) -> csi_pb2_grpc.NodeStub:
        assert self.channel is not None
        return csi_pb2_grpc.NodeStub(self.channel)

    # -------------------------------------------------------------- calls, as the sidecars make

    def create(self, name: str, size: int, caps: list[Any], source: Any = None,
               **params: str) -> Any:
        request = csi_pb2.CreateVolumeRequest(
            name=name, capacity_range=csi_pb2.CapacityRange(required_bytes=size),
            volume_capabilities=caps, parameters=params)
        if source is not None:
            request.volume_content_source.CopyFrom(source)
        return self.controller.CreateVolume(request, timeout=RPC_TIMEOUT).volume

    def delete(self, volume_id: str) -> None:
        self.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume_id),
                                     timeout=RPC_TIMEOUT)

    def snapshot(self, name: str, volume_id: str, **params: str) -> Any:
        return self.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(
            name=name, source_volume_id=volume_id, parameters=params),
            timeout=RPC_TIMEOUT).snapshot

    def delete_snapshot(self, snapshot_id: str) -> None:
        self.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snapshot_id),
                                       timeout=RPC_TIMEOUT)

    def publish(self, volume: Any, target: str, cap: Any, readonly: bool = False) -> None:
        self.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
            volume_id=volume.volume_id, target_path=target, volume_capability=cap,
            readonly=readonly, volume_context=volume.volume_context), timeout=RPC_TIMEOUT)

    def unpublish(self, volume_id: str, target: str) -> None:
        self.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=volume_id, target_path=target), timeout=RPC_TIMEOUT)

    def expand(self, volume_id: str, path: str, size: int) -> int:
        reply = self.node.NodeExpandVolume(csi_pb2.NodeExpandVolumeRequest(
            volume_id=volume_id, volume_path=path,
            capacity_range=csi_pb2.CapacityRange(required_bytes=size)), timeout=RPC_TIMEOUT)
        return int(reply.capacity_bytes)

    def stats(self, volume_id: str, path: str) -> Any:
        return self.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
            volume_id=volume_id, volume_path=path), timeout=RPC_TIMEOUT)


def snapshot_source(snapshot_id: str) -> Any:
    return csi_pb2.VolumeContentSource(
        snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=snapshot_id))


@dataclass
class Lab:
    lvm: Lvm
    vg: str
    driver: DriverProcess
    pods: Path
    mounter: Mounter

    def target(self, name: str) -> str:
        return str(self.pods / name)

    def lvs_by_id(self) -> dict[str, Any]:
        return {f"{lv.vg_name}/{lv.name}": lv for lv in self.lvm.lvs(self.vg)}

    def owned_lvs(self) -> list[Any]:
        return self.lvm.lvs(self.vg, tag=owner_tag(self.driver.driver_name))

    def pe_ranges(self, volume_id: str) -> set[str]:
        out = self.lvm.command("lvs", "--noheadings", "-o", "seg_pe_ranges", "--", volume_id)
        return {r for r in out.stdout_text.split() if r}


@pytest.fixture
def lab(kernel_disks: list[str], lvm: Lvm, tmp_path: Path) -> Iterator[Lab]:
    """A VG on the guest disks with a thin pool, and the driver process serving it. At the
    end (also after a failure): mounts under the pods directory undone, the driver stopped,
    the VG removed. The tests themselves assert that unpublish/delete left nothing."""
    vg = unique_vg_name("csi")
    lvm.vgcreate(vg, kernel_disks[:2])
    lvm.create_thin_pool(vg, POOL, 1024 * MiB)
    pods = tmp_path / "pods"
    pods.mkdir()
    driver = DriverProcess(vg, results_dir(tmp_path) / f"csi-lvm-{vg}.log")
    mounter = Mounter(timeout=120)
    try:
        driver.start()
        yield Lab(lvm, vg, driver, pods, mounter)
    finally:
        left = [m.mount_point for m in mounter.mounts()
                if m.mount_point.startswith(str(pods) + "/")]
        for mount_point in reversed(left):
            with contextlib.suppress(Exception):
                mounter.unmount_all(mount_point)
        driver.stop()
        lvm.command("vgremove", "--yes", "--force", "--", vg)


# ---------------------------------------------------------------------------- data helpers


def write_file(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def device_write(path: str, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def device_read(path: str, offset: int, length: int) -> bytes:
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        return f.read(length)


def scan_for(f: BinaryIO, marker: bytes, chunk: int = 4 * MiB) -> bool:
    """Does the marker occur anywhere in the stream (also across chunk borders)?"""
    tail = b""
    while block := f.read(chunk):
        if marker in tail + block:
            return True
        tail = block[-(len(marker) - 1):]
    return False


def fs_total(path: str) -> int:
    return filesystem_usage(path).total_bytes


def assert_healthy_stats(lab: Lab, volume_id: str, path: str, *, block: bool) -> None:
    reply = lab.driver.stats(volume_id, path)
    assert not reply.volume_condition.abnormal, reply.volume_condition.message
    units = {u.unit: u for u in reply.usage}
    if block:
        assert set(units) == {Usage.BYTES}
        assert units[Usage.BYTES].total == block_device_size(path)
    else:
        assert set(units) >= {Usage.BYTES}
        fs = filesystem_usage(path)
        assert units[Usage.BYTES].total == fs.total_bytes
        assert 0 < units[Usage.BYTES].used < units[Usage.BYTES].total
        if Usage.INODES in units:
            assert units[Usage.INODES].used == fs.used_inodes


# ---------------------------------------------------------------------------- the lifecycle


@dataclass(frozen=True)
class Kind:
    label: str
    lvm_type: str
    fs_type: str  # "" = raw block
    size: int
    grown: int
    params: tuple[tuple[str, str], ...] = ()

    @property
    def cap(self) -> Any:
        return block_cap() if not self.fs_type else mount_cap(self.fs_type)

    def parameters(self) -> dict[str, str]:
        out = {"lvmType": self.lvm_type, **dict(self.params)}
        if self.fs_type:
            out["csi.storage.k8s.io/fstype"] = self.fs_type
        return out


KINDS = (
    Kind("linear-ext4", "linear", "ext4", 64 * MiB, 128 * MiB),
    Kind("striped-xfs", "striped", "xfs", 320 * MiB, 448 * MiB, (("stripes", "2"),)),
    Kind("thin-ext4", "thin", "ext4", 64 * MiB, 160 * MiB),
    Kind("linear-block", "linear", "", 32 * MiB, 64 * MiB),
)


def test_create_publish_expand_snapshot_restore_and_delete_through_the_driver_socket(
    lab: Lab,
) -> None:
    d = lab.driver
    volumes: dict[str, Any] = {}
    payloads: dict[str, bytes] = {}
    sizes: dict[str, int] = {}

    # CreateVolume -> NodePublishVolume -> write and read back.
    for kind in KINDS:
        vol = d.create(f"pvc-{kind.label}", kind.size, [kind.cap], **kind.parameters())
        assert vol.capacity_bytes >= kind.size
        volumes[kind.label] = vol
        target = lab.target(kind.label)
        d.publish(vol, target, kind.cap)
        payload = os.urandom(MiB)
        payloads[kind.label] = payload
        if kind.fs_type:
            entry = lab.mounter.find(target)
            assert entry is not None and entry.fs_type == kind.fs_type
            if kind.fs_type == "ext4":
                assert sorted(os.listdir(target)) == ["lost+found"]  # a fresh filesystem
            else:
                assert os.listdir(target) == []
            write_file(os.path.join(target, "payload.bin"), payload)
            assert Path(target, "payload.bin").read_bytes() == payload
        else:
            assert Path(target).is_block_device()
            device_write(target, 0, payload)
            device_write(target, kind.size - MiB, payload)
            assert device_read(target, 0, MiB) == payload
            assert device_read(target, kind.size - MiB, MiB) == payload
    lvs = lab.lvs_by_id()
    for kind in KINDS:
        lv = lvs[volumes[kind.label].volume_id]
        assert lv.is_active and owner_tag(d.driver_name) in lv.tags
        assert lv.segtype == kind.lvm_type
        if kind.lvm_type != "thin":  # lvm reports 0 stripes for thin volumes
            assert lv.stripes == (2 if kind.lvm_type == "striped" else 1)

    # NodeExpandVolume while published: the LV grows, the filesystem grows online.
    for kind in KINDS:
        vol, target = volumes[kind.label], lab.target(kind.label)
        before = fs_total(target) if kind.fs_type else block_device_size(target)
        capacity = d.expand(vol.volume_id, target, kind.grown)
        assert capacity >= kind.grown
        if kind.fs_type:
            assert lab.mounter.is_mount_point(target)  # never unmounted
            grown = fs_total(target) - before
            assert grown >= (kind.grown - kind.size) * 8 // 10, (kind.label, before, grown)
            assert Path(target, "payload.bin").read_bytes() == payloads[kind.label]
        else:
            assert block_device_size(target) == capacity
            assert device_read(target, 0, MiB) == payloads[kind.label]
        if kind.lvm_type == "linear":  # a retry finds nothing to do (one fs, one block)
            assert d.expand(vol.volume_id, target, kind.grown) == capacity
        assert_healthy_stats(lab, vol.volume_id, target, block=not kind.fs_type)
        sizes[kind.label] = capacity
    lvs = lab.lvs_by_id()
    assert {k.label: lvs[volumes[k.label].volume_id].size for k in KINDS} == sizes

    # CreateSnapshot: thin (of the thin volume) and thick copy-on-write (of the linear one).
    os.sync()
    thin_snap = d.snapshot("snap-thin", volumes["thin-ext4"].volume_id)
    thick_snap = d.snapshot("snap-thick", volumes["linear-ext4"].volume_id, snapshotSize="50%")
    assert thin_snap.ready_to_use and thick_snap.ready_to_use
    lvs = lab.lvs_by_id()
    assert lvs[thin_snap.snapshot_id].is_thin and lvs[thin_snap.snapshot_id].is_snapshot
    assert lvs[thick_snap.snapshot_id].attr.snapshot  # dm-snapshot: copy-on-write
    # The origins change after the snapshot; restores must show the snapshot's content.
    for label in ("thin-ext4", "linear-ext4"):
        write_file(os.path.join(lab.target(label), "payload.bin"), b"changed after snapshot")

    # CreateVolume from each snapshot -> publish -> the data as it was at snapshot time.
    restores = {}
    for label, snap in (("thin-ext4", thin_snap), ("linear-ext4", thick_snap)):
        kind = next(k for k in KINDS if k.label == label)
        restored = d.create(f"pvc-restore-{label}", kind.grown, [kind.cap],
                            source=snapshot_source(snap.snapshot_id), **kind.parameters())
        assert restored.content_source.snapshot.snapshot_id == snap.snapshot_id
        restores[label] = restored
        target = lab.target(f"restore-{label}")
        d.publish(restored, target, kind.cap)
        assert Path(target, "payload.bin").read_bytes() == payloads[label]
        assert Path(lab.target(label), "payload.bin").read_bytes() == b"changed after snapshot"
        assert_healthy_stats(lab, restored.volume_id, target, block=False)

    # NodeUnpublishVolume -> DeleteVolume / DeleteSnapshot: nothing of ours is left.
    for label, restored in restores.items():
        d.unpublish(restored.volume_id, lab.target(f"restore-{label}"))
        d.delete(restored.volume_id)
    d.delete_snapshot(thin_snap.snapshot_id)
    d.delete_snapshot(thick_snap.snapshot_id)
    for kind in KINDS:
        vol, target = volumes[kind.label], lab.target(kind.label)
        d.unpublish(vol.volume_id, target)
        assert not os.path.exists(target)
        d.unpublish(vol.volume_id, target)  # idempotent
        d.delete(vol.volume_id)
        d.delete(vol.volume_id)  # idempotent
    assert lab.owned_lvs() == []
    assert [lv.name for lv in lab.lvm.lvs(lab.vg)] == [POOL]


def test_a_new_volume_on_freed_extents_shows_none_of_the_old_data(lab: Lab) -> None:
    d = lab.driver
    marker = b"PREVIOUS-TENANT-" + secrets.token_hex(8).encode()
    size = 32 * MiB
    old = d.create("pvc-old-tenant", size, [block_cap()], lvmType="linear")
    old_extents = lab.pe_ranges(old.volume_id)
    d.publish(old, lab.target("old"), block_cap())
    device_write(lab.target("old"), 0, marker * (size // len(marker)))
    d.unpublish(old.volume_id, lab.target("old"))
    d.delete(old.volume_id)

    # The next linear LV gets the freed extents (LVM allocates the lowest free ones).
    raw = d.create("pvc-new-block", size, [block_cap()], lvmType="linear")
    assert lab.pe_ranges(raw.volume_id) == old_extents, "the new LV is not on the old extents"
    d.publish(raw, lab.target("new-block"), block_cap())
    with open(lab.target("new-block"), "rb") as f:
        assert not scan_for(f, marker), "the raw block volume shows the previous tenant's data"
    d.unpublish(raw.volume_id, lab.target("new-block"))
    d.delete(raw.volume_id)

    fs = d.create("pvc-new-fs", size, [mount_cap("ext4")], lvmType="linear")
    assert lab.pe_ranges(fs.volume_id) == old_extents
    d.publish(fs, lab.target("new-fs"), mount_cap("ext4"))
    assert sorted(os.listdir(lab.target("new-fs"))) == ["lost+found"]
    d.unpublish(fs.volume_id, lab.target("new-fs"))
    d.delete(fs.volume_id)
    assert lab.owned_lvs() == []


def test_sigkill_of_the_driver_between_steps_then_restart_leaves_nothing_orphaned(
    lab: Lab,
) -> None:
    d = lab.driver
    cap = mount_cap("ext4")
    params = {"lvmType": "thin"}

    # Killed after CreateVolume: the provisioner's retry gets the same volume.
    vol = d.create("pvc-crash", 64 * MiB, [cap], **params)
    d.restart_after_kill()
    assert d.create("pvc-crash", 64 * MiB, [cap], **params).volume_id == vol.volume_id

    # Killed while the volume is published: the mount outlives the driver; kubelet's retry
    # is idempotent and the volume keeps working (stats, online expansion).
    target = lab.target("crash")
    d.publish(vol, target, cap)
    write_file(os.path.join(target, "data"), b"survives a driver crash")
    d.restart_after_kill()
    assert Path(target, "data").read_bytes() == b"survives a driver crash"
    d.publish(vol, target, cap)
    assert len(lab.mounter.mounts_at(target)) == 1
    assert d.expand(vol.volume_id, target, 128 * MiB) >= 128 * MiB
    assert_healthy_stats(lab, vol.volume_id, target, block=False)

    # Killed after CreateSnapshot: the snapshotter's retry gets the same snapshot, and a
    # restore from it has the data.
    os.sync()
    snap = d.snapshot("snap-crash", vol.volume_id)
    d.restart_after_kill()
    assert d.snapshot("snap-crash", vol.volume_id).snapshot_id == snap.snapshot_id
    restored = d.create("pvc-crash-restore", 128 * MiB, [cap],
                        source=snapshot_source(snap.snapshot_id), **params)
    d.publish(restored, lab.target("crash-restore"), cap)
    assert Path(lab.target("crash-restore"), "data").read_bytes() == b"survives a driver crash"

    # Killed after the teardown calls: every retry still succeeds.
    d.unpublish(restored.volume_id, lab.target("crash-restore"))
    d.delete(restored.volume_id)
    d.delete_snapshot(snap.snapshot_id)
    d.unpublish(vol.volume_id, target)
    d.delete(vol.volume_id)
    d.restart_after_kill()
    d.unpublish(restored.volume_id, lab.target("crash-restore"))
    d.delete(restored.volume_id)
    d.delete_snapshot(snap.snapshot_id)
    d.delete(vol.volume_id)

    # Nothing orphaned: no LV of ours (pending, temporary or otherwise), no mount, no target,
    # and the VG holds only the pool.
    leftovers = [(lv.name, read_tags(lv.tags, d.driver_name)) for lv in lab.owned_lvs()]
    assert leftovers == []
    assert [lv.name for lv in lab.lvm.lvs(lab.vg)] == [POOL]
    assert [m.mount_point for m in lab.mounter.mounts()
            if m.mount_point.startswith(str(lab.pods))] == []
    assert os.listdir(lab.pods) == []
    assert d.starts == 5  # the first start and four restarts after SIGKILL
