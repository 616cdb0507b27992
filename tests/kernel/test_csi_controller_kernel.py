"""The CSI controller on a kernel with device-mapper (qemu guest): thin volumes and snapshots,
thick copy-on-write snapshots, restores and clones by copy, wiping, and crash recovery in the
middle of a copy. Through the driver's own gRPC socket, on the guest's virtio disks.
"""

from __future__ import annotations

import mmap
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from csi_lvm.server import Driver
from csi_lvm.volume import TAG_OVERPROVISION, parse_id, read_tags
from edge_common.errors import ResourceExhausted
from edge_common.lvm import Lvm
from edge_common.server import unix_channel
from edge_proto.csi.v1 import csi_pb2, csi_pb2_grpc
from tests.csi.conftest import GATE, block_cap, create_request, make_config, mount_cap
from tests.rigs.lvm import unique_vg_name

pytestmark = pytest.mark.kernel

MiB = 1 << 20
POOL = "pool0"


class KernelCsi:
    def __init__(self, vg: str, lvm: Lvm, sock_dir: Path, **overrides: Any) -> None:
        self.vg = vg
        self.lvm = lvm
        self.config = make_config(vg, sock_dir, **overrides)
        self.driver = Driver(self.config)
        self.driver.start()
        self.channel = unix_channel(self.config.endpoint)
        grpc.channel_ready_future(self.channel).result(timeout=60)
        self.ctl = csi_pb2_grpc.ControllerStub(self.channel)

    def close(self) -> None:
        self.channel.close()
        self.driver.stop(grace=1)

    def ours(self) -> dict[str, Any]:
        return {lv.name: read_tags(lv.tags, self.config.driver_name)
                for lv in self.lvm.lvs(self.vg)
                if read_tags(lv.tags, self.config.driver_name).owned}


@pytest.fixture
def plain_vg(kernel_disks: list[str], lvm: Lvm) -> Iterator[str]:
    vg = unique_vg_name("csi")
    lvm.vgcreate(vg, kernel_disks[:2])
    yield vg
    lvm.command("vgremove", "--yes", "--force", "--", vg)
    lvm.command("pvremove", "--yes", "--", *kernel_disks[:2])


@pytest.fixture
def kvg(kernel_disks: list[str], lvm: Lvm) -> Iterator[str]:
    vg = unique_vg_name("csi")
    lvm.vgcreate(vg, kernel_disks[:2])
    lvm.create_thin_pool(vg, POOL, 256 * MiB)
    yield vg
    lvm.command("vgremove", "--yes", "--force", "--", vg)
    lvm.command("pvremove", "--yes", "--", *kernel_disks[:2])


@pytest.fixture
def kcsi(kvg: str, lvm: Lvm) -> Iterator[KernelCsi]:
    sock_dir = Path(f"/tmp/kcsi-{secrets.token_hex(4)}")
    sock_dir.mkdir()
    csi = KernelCsi(kvg, lvm, sock_dir, default_thin_pool=POOL, thin_overprovision_ratio=2.0)
    yield csi
    csi.close()
    for p in sock_dir.iterdir():
        p.unlink()
    sock_dir.rmdir()


def device(volume_id: str) -> str:
    return parse_id(volume_id).device_path


def write(volume_id: str, data: bytes, offset: int = 0) -> None:
    fd = os.open(device(volume_id), os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def read(volume_id: str, length: int, offset: int = 0) -> bytes:
    fd = os.open(device(volume_id), os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, length)  # O_DIRECT wants an aligned buffer
        os.preadv(fd, [buf], offset)
        return bytes(buf)
    finally:
        os.close(fd)


PATTERN_A = (b"tenant-A-data-" * 1000)[:8192]
PATTERN_B = (b"tenant-B-data-" * 1000)[:8192]


def snapshot(csi: KernelCsi, name: str, source: str, **params: str) -> Any:
    return csi.ctl.CreateSnapshot(csi_pb2.CreateSnapshotRequest(
        name=name, source_volume_id=source, parameters=params)).snapshot


def restore(csi: KernelCsi, name: str, *, snapshot_id: str = "", volume_id: str = "",
            required: int = 0, **params: str) -> Any:
    req = create_request(name, required=required, caps=[block_cap()])
    req.parameters.update(params)
    if snapshot_id:
        req.volume_content_source.snapshot.snapshot_id = snapshot_id
    else:
        req.volume_content_source.volume.volume_id = volume_id
    return create_until_done(csi.ctl, req)


def _dm_names(vg: str, lv_part: str) -> list[str]:
    """device-mapper names of vg's LVs whose name contains lv_part ('-' doubled in dm names)."""
    out = subprocess.run(["dmsetup", "ls"], capture_output=True, text=True, timeout=30,
                         check=True).stdout
    prefix = vg.replace("-", "--") + "-"
    want = lv_part.replace("-", "--")
    return [line.split()[0] for line in out.splitlines()
            if line.startswith(prefix) and want in line.split()[0]
            and "tmp" not in line.split()[0]]


def suspend_when_it_appears(vg: str, lv_part: str, done: threading.Event,
                            copying: Any) -> None:
    """Suspend the device of an LV named like lv_part once copying() says its copy runs (its
    lvcreates are over: nothing of LVM's waits on it)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        names = _dm_names(vg, lv_part) if copying() else []
        if names:
            subprocess.run(["dmsetup", "suspend", names[0]], timeout=60, check=True)
            done.set()
            return
        time.sleep(0.05)


def resume_all(vg: str, lv_part: str) -> None:
    for name in _dm_names(vg, lv_part):
        subprocess.run(["dmsetup", "resume", name], timeout=60, check=True)


def create_until_done(ctl: csi_pb2_grpc.ControllerStub, req: Any, timeout: float = 600) -> Any:
    """CreateVolume as csi-provisioner calls it: ABORTED (a copy or wipe still running in the
    background) is retried until the volume is there."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return ctl.CreateVolume(req).volume
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.ABORTED or time.monotonic() > deadline:
                raise
            time.sleep(1)


def delete(csi: KernelCsi, *volume_ids: str, snapshots: tuple[str, ...] = ()) -> None:
    for snapshot_id in snapshots:
        csi.ctl.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snapshot_id))
    for volume_id in volume_ids:
        deadline = time.monotonic() + 600
        while True:  # a zeroing wipe runs in the background: ABORTED until it is done
            try:
                csi.ctl.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume_id))
                break
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.ABORTED or time.monotonic() > deadline:
                    raise
                time.sleep(1)


def test_thin_volumes_snapshots_restores_and_clones_keep_their_data(kcsi: KernelCsi) -> None:
    vol = kcsi.ctl.CreateVolume(create_request("pvc-thin", required=64 * MiB,
                                               caps=[block_cap()], lvmType="thin")).volume
    assert vol.volume_context["lvmType"] == "thin"
    write(vol.volume_id, PATTERN_A, 4 * MiB)
    snap = snapshot(kcsi, "snapshot-thin", vol.volume_id)
    assert snap.ready_to_use and snap.size_bytes == 64 * MiB
    assert snap.source_volume_id == vol.volume_id
    assert snapshot(kcsi, "snapshot-thin", vol.volume_id).snapshot_id == snap.snapshot_id
    write(vol.volume_id, PATTERN_B, 4 * MiB)  # after the snapshot: must not show in the restore

    restored = restore(kcsi, "pvc-restored", snapshot_id=snap.snapshot_id, required=96 * MiB,
                       lvmType="thin")
    assert restored.capacity_bytes == 96 * MiB
    assert read(restored.volume_id, len(PATTERN_A), 4 * MiB) == PATTERN_A
    clone = restore(kcsi, "pvc-clone", volume_id=vol.volume_id, lvmType="thin")
    assert read(clone.volume_id, len(PATTERN_B), 4 * MiB) == PATTERN_B

    listed = kcsi.ctl.ListSnapshots(csi_pb2.ListSnapshotsRequest(source_volume_id=vol.volume_id))
    assert [e.snapshot.snapshot_id for e in listed.entries] == [snap.snapshot_id]

    pool = kcsi.lvm.get_lv(kcsi.vg, POOL)
    assert pool is not None
    handed_out = sum(lv.size for lv in kcsi.lvm.lvs(kcsi.vg) if lv.pool_lv == POOL)
    cap = kcsi.ctl.GetCapacity(csi_pb2.GetCapacityRequest(
        parameters={"lvmType": "thin"}, volume_capabilities=[block_cap()]))
    # pool size x overprovision ratio - the virtual sizes handed out (snapshots included)
    assert handed_out == (64 + 64 + 96 + 64) * MiB
    assert cap.available_capacity == int(pool.size * 2.0) - handed_out
    assert cap.maximum_volume_size.value == cap.available_capacity

    grown = kcsi.ctl.ControllerExpandVolume(csi_pb2.ControllerExpandVolumeRequest(
        volume_id=vol.volume_id, capacity_range=csi_pb2.CapacityRange(required_bytes=128 * MiB),
        volume_capability=block_cap()))
    assert grown.capacity_bytes == 128 * MiB and not grown.node_expansion_required

    # a thin origin can go before its snapshot: they are independent
    delete(kcsi, vol.volume_id, restored.volume_id, clone.volume_id)
    assert list(kcsi.ours()) == [parse_id(snap.snapshot_id).lv]
    delete(kcsi, snapshots=(snap.snapshot_id,))
    assert kcsi.ours() == {}


def test_thick_snapshots_restore_by_copy_and_clones_are_consistent(kcsi: KernelCsi) -> None:
    vol = kcsi.ctl.CreateVolume(create_request("pvc-thick", required=32 * MiB,
                                               caps=[block_cap()])).volume
    write(vol.volume_id, PATTERN_A, 0)
    write(vol.volume_id, PATTERN_A, 32 * MiB - len(PATTERN_A))
    snap = snapshot(kcsi, "snapshot-thick", vol.volume_id, snapshotSize="50%")
    snap_lv = kcsi.lvm.get_lv(kcsi.vg, parse_id(snap.snapshot_id).lv)
    assert snap_lv is not None and snap_lv.attr.snapshot
    assert snap.size_bytes == 32 * MiB and snap.ready_to_use
    write(vol.volume_id, PATTERN_B, 0)

    restored = restore(kcsi, "pvc-from-snap", snapshot_id=snap.snapshot_id, required=40 * MiB)
    assert restored.capacity_bytes == 40 * MiB
    assert read(restored.volume_id, len(PATTERN_A)) == PATTERN_A
    assert read(restored.volume_id, len(PATTERN_A), 32 * MiB - len(PATTERN_A)) == PATTERN_A
    assert read(restored.volume_id, MiB, 39 * MiB) == bytes(MiB)  # beyond the source: zeros

    clone = restore(kcsi, "pvc-thick-clone", volume_id=vol.volume_id)
    assert read(clone.volume_id, len(PATTERN_B)) == PATTERN_B
    assert not any(name.startswith("snaptmp-") for name in kcsi.ours())

    smaller = create_request("pvc-small", required=16 * MiB, limit=16 * MiB, caps=[block_cap()])
    smaller.volume_content_source.snapshot.snapshot_id = snap.snapshot_id
    with pytest.raises(grpc.RpcError) as err:
        kcsi.ctl.CreateVolume(smaller)
    assert err.value.code() == grpc.StatusCode.OUT_OF_RANGE

    with pytest.raises(grpc.RpcError) as err:
        delete(kcsi, vol.volume_id)  # it has a copy-on-write snapshot
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    delete(kcsi, restored.volume_id, clone.volume_id, vol.volume_id,
           snapshots=(snap.snapshot_id,))
    assert kcsi.ours() == {}


def test_wipe_on_delete_zeroes_the_extents_and_new_volumes_never_show_old_data(
        kcsi: KernelCsi) -> None:
    # wipeOnDelete: zero -- checked on the PV itself, after the LV is gone
    vol = kcsi.ctl.CreateVolume(create_request("pvc-wipe", required=8 * MiB,
                                               caps=[block_cap()], wipeOnDelete="zero")).volume
    write(vol.volume_id, b"\xee" * (8 * MiB))
    ref = parse_id(vol.volume_id)
    out = kcsi.lvm.command("lvs", "--noheadings", "-o", "seg_pe_ranges", f"{ref.vg}/{ref.lv}")
    pv, _, extents = out.stdout_text.strip().partition(":")
    first = int(extents.split("-")[0])
    pe_start = int(kcsi.lvm.command("pvs", "--noheadings", "--units", "b", "--nosuffix", "-o",
                                    "pe_start", pv).stdout_text.strip())
    vg = kcsi.lvm.get_vg(ref.vg)
    assert vg is not None
    offset = pe_start + first * vg.extent_size
    delete(kcsi, vol.volume_id)
    fd = os.open(pv, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, offset, 8 * MiB, os.POSIX_FADV_DONTNEED)
        assert os.pread(fd, 8 * MiB, offset) == bytes(8 * MiB)
    finally:
        os.close(fd)

    # no wipe on delete: the next tenant of the same extents still sees nothing of it
    size = 32 * MiB
    first_vol = kcsi.ctl.CreateVolume(create_request("pvc-old", required=size,
                                                     caps=[block_cap()])).volume
    write(first_vol.volume_id, b"\xab" * size)
    subprocess.run(["mkfs.ext4", "-q", "-F", device(first_vol.volume_id)], check=True,
                   timeout=120)
    delete(kcsi, first_vol.volume_id)
    block = kcsi.ctl.CreateVolume(create_request("pvc-new-block", required=size,
                                                 caps=[block_cap()])).volume
    assert read(block.volume_id, size) == bytes(size)
    write(block.volume_id, b"\xcd" * size)
    subprocess.run(["mkfs.ext4", "-q", "-F", device(block.volume_id)], check=True, timeout=120)
    delete(kcsi, block.volume_id)
    fs = kcsi.ctl.CreateVolume(create_request("pvc-new-fs", required=size,
                                              caps=[mount_cap("ext4")])).volume
    assert read(fs.volume_id, MiB) == bytes(MiB)
    assert read(fs.volume_id, MiB, size - MiB) == bytes(MiB)
    probe = subprocess.run(["blkid", "-p", device(fs.volume_id)], capture_output=True,
                           timeout=60, check=False)
    assert probe.returncode == 2, probe.stdout  # 2: no signature recognised
    delete(kcsi, fs.volume_id)


@pytest.mark.timeout(600)  # two driver starts and a copy under an emulated CPU, on a busy host
def test_sigkill_in_the_middle_of_a_clone_leaves_no_orphan_and_the_retry_succeeds(
        plain_vg: str, lvm: Lvm, tmp_path: Path) -> None:
    kvg = plain_vg
    sock_dir = Path(f"/tmp/kcsi-{secrets.token_hex(4)}")
    sock_dir.mkdir()
    gate_dir = tmp_path / "gate"
    gate_dir.mkdir()
    cfg = make_config(kvg, sock_dir)
    env = {**os.environ, "CSI_GATE_DIR": str(gate_dir)}
    argv = [sys.executable, "-m", "csi_lvm", "--endpoint", cfg.endpoint, "--node-id",
            cfg.node_id, "--driver-name", cfg.driver_name, "--default-vg", kvg,
            "--lvm-command", f"{sys.executable},-I,-S,{GATE}"]
    log = open(tmp_path / "driver.log", "ab")  # noqa: SIM115

    def start() -> tuple[subprocess.Popen[bytes], csi_pb2_grpc.ControllerStub, grpc.Channel]:
        proc = subprocess.Popen(argv, stdout=log, stderr=log, env=env)
        channel = unix_channel(cfg.endpoint)
        grpc.channel_ready_future(channel).result(timeout=120)
        return proc, csi_pb2_grpc.ControllerStub(channel), channel

    proc, ctl, channel = start()
    try:
        src = ctl.CreateVolume(create_request("pvc-src", required=16 * MiB,
                                              caps=[block_cap()])).volume
        write(src.volume_id, PATTERN_A)
        # hold the removal of the temporary snapshot: the copy is done, nothing is finished
        (gate_dir / "armed").write_text("lvremove")
        req = create_request("pvc-dst", required=16 * MiB, caps=[block_cap()])
        req.volume_content_source.volume.volume_id = src.volume_id

        failure: list[grpc.RpcError] = []

        def call() -> None:
            try:
                ctl.CreateVolume(req)
            except grpc.RpcError as exc:
                failure.append(exc)

        thread = threading.Thread(target=call, daemon=True)
        thread.start()
        deadline = time.monotonic() + 100
        while not (gate_dir / "reached").exists():
            # The call may answer ABORTED (pending: the copy goes on as a background job).
            ended = not thread.is_alive() and not (
                failure and failure[0].code() == grpc.StatusCode.ABORTED)
            if ended or time.monotonic() > deadline:
                log.flush()
                raise AssertionError(f"the clone never reached the gate ({failure}):\n"
                                     + (tmp_path / "driver.log").read_text()[-5000:])
            time.sleep(0.05)
        held = int((gate_dir / "reached").read_text())
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        channel.close()
        (gate_dir / "drop").write_text("")
        thread.join(timeout=60)
        _wait_gone(held)
        owner = f"csi-lvm.edge.io/owner={cfg.driver_name}"
        before = sorted(lv.name for lv in lvm.lvs(kvg) if owner in lv.tags)
        assert any(n.startswith("snaptmp-") for n in before) and "pvc-dst" in before

    finally:
        channel.close()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        log.close()

    # The restart (in-process here: same code, no second interpreter start under TCG): the
    # start-up sweep removes the leftovers before the socket opens.
    csi = KernelCsi(kvg, lvm, sock_dir, driver_name=cfg.driver_name)
    try:
        after = sorted(lv.name for lv in lvm.lvs(kvg) if owner in lv.tags)
        assert after == ["pvc-src"]
        dst = create_until_done(csi.ctl, req)  # the caller's retries
        assert read(dst.volume_id, len(PATTERN_A)) == PATTERN_A
        assert sorted(csi.ours()) == ["pvc-dst", "pvc-src"]
        assert not any(o.pending for o in csi.ours().values())
    finally:
        csi.close()  # the kvg fixture removes the VG
        for p in sock_dir.iterdir():
            p.unlink()
        sock_dir.rmdir()


def _wait_gone(pid: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists():
        state = Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][:1] \
            if Path(f"/proc/{pid}/stat").exists() else ""
        if state == "Z":
            return
        assert time.monotonic() < deadline, "the held lvm call never finished"
        time.sleep(0.05)



def test_thin_accounting_and_a_pool_filled_past_its_threshold_by_writes(
        plain_vg: str, lvm: Lvm) -> None:
    # A 64 MiB pool that carries overprovision ratio 2 (the driver's default says 1).
    lvm.create_thin_pool(plain_vg, "small", 64 * MiB,
                         tags=[TAG_OVERPROVISION + "2"])
    sock_dir = Path(f"/tmp/kcsi-{secrets.token_hex(4)}")
    sock_dir.mkdir()
    csi = KernelCsi(plain_vg, lvm, sock_dir, default_thin_pool="small",
                    thin_overprovision_ratio=1.0)
    try:
        _thin_accounting(csi, lvm)
    finally:
        csi.close()
        for p in sock_dir.iterdir():
            p.unlink()
        sock_dir.rmdir()


def _capacity(csi: KernelCsi) -> Any:
    return csi.ctl.GetCapacity(csi_pb2.GetCapacityRequest(
        parameters={"lvmType": "thin"}, volume_capabilities=[block_cap()]))


def _thin_accounting(csi: KernelCsi, lvm: Lvm) -> None:
    def create(name: str, size: int) -> Any:
        return csi.ctl.CreateVolume(create_request(name, required=size, caps=[block_cap()],
                                                   lvmType="thin")).volume

    def code(call: Any) -> grpc.StatusCode:
        with pytest.raises(grpc.RpcError) as info:
            call()
        return info.value.code()  # type: ignore[no-any-return]

    assert _capacity(csi).available_capacity == 128 * MiB
    a = create("pvc-a", 100 * MiB)
    assert code(lambda: create("pvc-b", 32 * MiB)) == grpc.StatusCode.RESOURCE_EXHAUSTED
    b = create("pvc-b", 28 * MiB)
    cap = _capacity(csi)
    assert (cap.available_capacity, cap.maximum_volume_size.value) == (0, 0)
    # A thin snapshot is promised its origin's size too: no room, no snapshot.
    assert code(lambda: snapshot(csi, "snapshot-a", a.volume_id)) == \
        grpc.StatusCode.RESOURCE_EXHAUSTED
    # Growing past the pool's room: the controller and the node (today's 4 GiB in 64 MiB).
    grow = csi_pb2.ControllerExpandVolumeRequest(
        volume_id=a.volume_id, capacity_range=csi_pb2.CapacityRange(required_bytes=128 * MiB),
        volume_capability=block_cap())
    assert code(lambda: csi.ctl.ControllerExpandVolume(grow)) == \
        grpc.StatusCode.RESOURCE_EXHAUSTED
    node = csi.driver.node
    assert node is not None
    found = node.volumes.lookup(a.volume_id)
    assert found is not None and found.problem is None
    with pytest.raises(ResourceExhausted):
        node.volumes.extend(found, 4 << 30, 0)
    assert lvm.get_lv(csi.vg, "pvc-a").size == 100 * MiB  # type: ignore[union-attr]

    # The operator (or the node agent) raises the pool's ratio: the next create reads it.
    lvm.deltag(csi.vg, "small", [TAG_OVERPROVISION + "2"])
    lvm.addtag(csi.vg, "small", [TAG_OVERPROVISION + "3"])
    c = create("pvc-c", 64 * MiB)
    delete(csi, b.volume_id, c.volume_id)

    # Fill the pool by writes past its 90% data threshold.
    write(a.volume_id, b"\xab" * (60 * MiB))
    # Both services read the pool from LVM now: the capacity cache (refreshed every 30 s)
    # still holds the pool as it was before the writes.
    got = csi.ctl.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(volume_id=a.volume_id))
    condition = got.status.volume_condition
    assert condition.abnormal and f"thin pool {csi.vg}/small" in condition.message
    found = node.volumes.lookup(a.volume_id)
    assert found is not None and found.problem is not None and "small" in found.problem
    # GetCapacity, the gauge and the Event follow the cache's next refresh.
    csi.driver.cache.refresh()  # type: ignore[union-attr]
    assert _capacity(csi).available_capacity == 0
    assert code(lambda: create("pvc-d", 4 * MiB)) == grpc.StatusCode.RESOURCE_EXHAUSTED
    labels = {"vg": csi.vg, "pool": "small"}
    assert csi.driver.registry.get_sample_value("csi_lvm_thin_pool_over_threshold", labels) == 1
    assert (csi.vg, "small") in csi.driver.pool_watch.full
    delete(csi, a.volume_id)
    assert csi.ours() == {}


def test_a_restore_into_four_times_the_source_has_a_filesystem_as_large_as_its_device(
        kcsi: KernelCsi) -> None:
    from csi_lvm.filesystem import make_filesystem
    from csi_lvm.stats import filesystem_usage

    src = kcsi.ctl.CreateVolume(create_request("pvc-src", required=32 * MiB,
                                               caps=[mount_cap("ext4")],
                                               lvmType="thin")).volume
    make_filesystem("ext4", device(src.volume_id))
    snap = snapshot(kcsi, "snapshot-src", src.volume_id)
    req = create_request("pvc-big", required=128 * MiB, caps=[mount_cap("ext4")],
                         lvmType="thin")
    req.volume_content_source.snapshot.snapshot_id = snap.snapshot_id
    big = kcsi.ctl.CreateVolume(req).volume
    assert big.capacity_bytes == 128 * MiB
    node = csi_pb2_grpc.NodeStub(kcsi.channel)
    target = f"/tmp/kpub-{secrets.token_hex(4)}"
    node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
        volume_id=big.volume_id, target_path=target, volume_capability=mount_cap("ext4"),
        volume_context=big.volume_context))
    try:
        assert filesystem_usage(target).total_bytes > 96 * MiB
    finally:
        node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=big.volume_id, target_path=target))
    delete(kcsi, big.volume_id, src.volume_id, snapshots=(snap.snapshot_id,))
    assert kcsi.ours() == {}


@pytest.mark.timeout(1200)  # 1 GiB through an emulated CPU
def test_a_1gib_clone_copies_in_the_background_while_probe_answers_and_retries_wait(
        plain_vg: str, lvm: Lvm) -> None:
    sock_dir = Path(f"/tmp/kcsi-{secrets.token_hex(4)}")
    sock_dir.mkdir()
    csi = KernelCsi(plain_vg, lvm, sock_dir, data_job_wait_seconds=0.5)
    try:
        identity = csi_pb2_grpc.IdentityStub(csi.channel)
        # A raw block source: zeroed whole at creation (a background job too), so it is
        # finished and what is written to it now is its data.
        src = create_until_done(csi.ctl, create_request("pvc-big-src", required=1024 * MiB,
                                                        caps=[block_cap()]))
        write(src.volume_id, PATTERN_A, 0)
        write(src.volume_id, PATTERN_B, 1024 * MiB - len(PATTERN_B))
        req = create_request("pvc-big-clone", required=1024 * MiB, caps=[block_cap()])
        req.volume_content_source.volume.volume_id = src.volume_id
        # How fast 1 GiB copies under emulation depends on the host's load (from under 30 s to
        # minutes), so the copy is held deterministically: its target device is suspended as
        # soon as it appears (writes queue in device-mapper) and resumed after the first answer.
        stalled = threading.Event()

        def copying() -> bool:
            running = csi.driver.registry.get_sample_value("csi_lvm_data_jobs",
                                                           {"state": "running"})
            return running == 1

        holder = threading.Thread(target=suspend_when_it_appears,
                                  args=(plain_vg, "pvc-big-clone", stalled, copying),
                                  daemon=True)
        holder.start()
        try:
            with pytest.raises(grpc.RpcError) as first:
                # It waits until 2 s before its deadline (the lvcreate before the copy takes
                # seconds under emulation).
                csi.ctl.CreateVolume(req, timeout=30)
        finally:
            holder.join(timeout=60)
            assert stalled.is_set(), "the clone's device never appeared to be held"
            resume_all(plain_vg, "pvc-big-clone")
        # Pending, copying in the background: ABORTED before the deadline, not DEADLINE_EXCEEDED.
        assert first.value.code() == grpc.StatusCode.ABORTED, first.value.details()
        probes: list[float] = []
        retries: list[str] = []
        deadline = time.monotonic() + 600
        clone = None
        while clone is None:
            assert time.monotonic() < deadline, "the background copy never finished"
            for _ in range(10):
                start = time.perf_counter()
                assert identity.Probe(csi_pb2.ProbeRequest(), timeout=30).ready.value
                probes.append(time.perf_counter() - start)
                time.sleep(0.05)
            try:
                clone = csi.ctl.CreateVolume(req).volume
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.ABORTED, err.details()
                retries.append(err.details() or "")
        assert retries and all("in progress" in r or "queued" in r for r in retries)
        # One copy, however many retries: 1 GiB copied once.
        copied = csi.driver.registry.get_sample_value("csi_lvm_data_job_bytes_total",
                                                      {"kind": "copy"})
        assert copied == 1024 * MiB
        assert csi.driver.registry.get_sample_value("csi_lvm_data_jobs",
                                                    {"state": "running"}) == 0
        assert read(clone.volume_id, len(PATTERN_A)) == PATTERN_A
        assert read(clone.volume_id, len(PATTERN_B), 1024 * MiB - len(PATTERN_B)) == PATTERN_B
        probes.sort()
        print(f"Probe during a 1 GiB clone: {len(probes)} calls, p50 "
              f"{probes[len(probes) // 2] * 1000:.1f} ms, max {probes[-1] * 1000:.1f} ms; "
              f"{len(retries)} retries answered ABORTED")
        delete(csi, clone.volume_id, src.volume_id)
        assert csi.ours() == {}
    finally:
        csi.close()
        for p in sock_dir.iterdir():
            p.unlink()
        sock_dir.rmdir()


@pytest.mark.timeout(1200)
def test_a_clone_whose_busy_source_overflows_its_cow_area_is_retried_larger_or_unavailable(
        plain_vg: str, lvm: Lvm, monkeypatch: pytest.MonkeyPatch) -> None:
    # The VG has room for a COW area of only 24 MiB beside the 64 MiB clone; the source is
    # written 32 MiB while it is copied (by the copy itself, just before it reads: no race).
    from csi_lvm import blockdev

    sock_dir = Path(f"/tmp/kcsi-{secrets.token_hex(4)}")
    sock_dir.mkdir()
    csi = KernelCsi(plain_vg, lvm, sock_dir)
    real_copy = blockdev.copy
    busy: dict[str, Any] = {"calls": 0, "free_room": False}
    try:
        src = csi.ctl.CreateVolume(create_request("pvc-busy-src", required=64 * MiB,
                                                  caps=[block_cap()]), timeout=600).volume
        write(src.volume_id, PATTERN_A, 0)
        vg = lvm.get_vg(plain_vg)
        assert vg is not None
        lvm.lvcreate(plain_vg, "filler", vg.free - 64 * MiB - 24 * MiB, activate=False)

        def copy(*args: Any, **kwargs: Any) -> Any:
            busy["calls"] += 1
            if busy["calls"] == 1:  # the first copy of each CreateVolume
                write(src.volume_id, PATTERN_B * (32 * MiB // len(PATTERN_B)), 0)
                if busy["free_room"]:
                    lvm.lvremove(plain_vg, "filler")
            return real_copy(*args, **kwargs)

        monkeypatch.setattr(blockdev, "copy", copy)
        req = create_request("pvc-busy-clone", required=64 * MiB, caps=[block_cap()])
        req.volume_content_source.volume.volume_id = src.volume_id
        # No room for a larger COW area: UNAVAILABLE (retry later), nothing left behind.
        with pytest.raises(grpc.RpcError) as info:
            csi.ctl.CreateVolume(req, timeout=600)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
        assert "copy-on-write" in (info.value.details() or "")
        assert set(csi.ours()) == {"pvc-busy-src"}
        # Room appears (the filler goes while the first copy runs): the retry of the copy with
        # a larger COW area succeeds, and the clone is the source as it was then.
        busy.update(calls=0, free_room=True)
        clone = csi.ctl.CreateVolume(req, timeout=600).volume
        assert busy["calls"] == 2  # the overflowed copy and the larger retry
        assert read(clone.volume_id, len(PATTERN_B)) == PATTERN_B
        assert set(csi.ours()) == {"pvc-busy-src", "pvc-busy-clone"}
        delete(csi, clone.volume_id, src.volume_id)
    finally:
        csi.close()
        for p in sock_dir.iterdir():
            p.unlink()
        sock_dir.rmdir()
