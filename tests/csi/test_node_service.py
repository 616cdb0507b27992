"""csi.v1.Node over a real unix socket, written from the CSI spec (v1.12).

Two kinds of service under test:

- ``node``: NodeService with a volume source of loop devices (``LoopVolumes``): this host has
  no device-mapper, so an LV never gets a device node here; a loop device stands in for the
  LV's /dev/<vg>/<lv>. Everything after the lookup (format, mount, bind, idempotency rules,
  growth, stats) runs for real. The LV path itself is covered in tests/kernel/.
- ``lvm_node``: NodeService on the real LVM layer (LvmVolumes) over a VG on loop disks, for
  what works without activation: lookups, ownership, NOT_FOUND, conditions of inactive LVs.
"""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
import stat
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
import pytest

from csi_lvm import filesystem
from csi_lvm.config import CsiConfig
from csi_lvm.filesystem import make_filesystem, probe
from csi_lvm.finish import make_safe
from csi_lvm.mounter import Mounter
from csi_lvm.node import NODE_CAPABILITIES, LvmVolumes, NodeService, NodeVolume
from csi_lvm.stats import filesystem_usage
from csi_lvm.volume import KIND_VOLUME, build_tags, owner_tag
from edge_common.commands import run
from edge_common.errors import OutOfRange, ResourceExhausted
from edge_common.loopdisk import LoopDisk, device_fingerprint
from edge_common.lvm import Lvm
from edge_common.server import GrpcServer, unix_channel
from edge_proto.csi.v1 import csi_pb2, csi_pb2_grpc
from tests.rigs.loopdisks import LoopDiskFactory
from tests.rigs.lvm import VgFactory

MiB = 1 << 20
Mode = csi_pb2.VolumeCapability.AccessMode
RPC = csi_pb2.NodeServiceCapability.RPC
Usage = csi_pb2.VolumeUsage
SNW = Mode.SINGLE_NODE_WRITER
SNRO = Mode.SINGLE_NODE_READER_ONLY
SNSW = Mode.SINGLE_NODE_SINGLE_WRITER
SNMW = Mode.SINGLE_NODE_MULTI_WRITER
MULTI_NODE = (Mode.MULTI_NODE_READER_ONLY, Mode.MULTI_NODE_SINGLE_WRITER,
              Mode.MULTI_NODE_MULTI_WRITER)


def mount_cap(fs_type: str = "", mode: Any = SNW, flags: tuple[str, ...] = ()) -> Any:
    return csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(fs_type=fs_type, mount_flags=list(flags)),
        access_mode=Mode(mode=mode))


def block_cap(mode: Any = SNW) -> Any:
    return csi_pb2.VolumeCapability(block=csi_pb2.VolumeCapability.BlockVolume(),
                                    access_mode=Mode(mode=mode))


def code_of(call: Callable[[], Any]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()  # type: ignore[no-any-return]


# ---------------------------------------------------------------------------- the loop source


@dataclass
class LoopVolumes:
    """Volumes backed by loop devices: volume id -> LoopDisk (a stand-in for an active LV).

    extend() grows the backing file and runs ``losetup --set-capacity`` (what lvextend does
    to a live LV's device), rounding up to 1 MiB "extents". ``hold`` makes lookups of one id
    wait until released (for the in-flight tests); ``lookups`` records every lookup."""

    disks: dict[str, LoopDisk] = field(default_factory=dict)
    contexts: dict[str, dict[str, str]] = field(default_factory=dict)
    lookups: list[str] = field(default_factory=list)
    held: dict[str, tuple[threading.Event, threading.Event]] = field(default_factory=dict)
    extent: int = MiB
    unfinished: set[str] = field(default_factory=set)  # ids whose first use must finish them
    finished: list[str] = field(default_factory=list)

    def add(self, volume_id: str, disk: LoopDisk, **context: str) -> str:
        self.disks[volume_id] = disk
        self.contexts[volume_id] = dict(context)
        return volume_id

    def hold(self, volume_id: str) -> tuple[threading.Event, threading.Event]:
        entered, release = threading.Event(), threading.Event()
        self.held[volume_id] = (entered, release)
        return entered, release

    def lookup(self, volume_id: str) -> NodeVolume | None:
        self.lookups.append(volume_id)
        if volume_id in self.held:
            entered, release = self.held.pop(volume_id)
            entered.set()
            assert release.wait(30), "the held lookup was never released"
        disk = self.disks.get(volume_id)
        if disk is None:
            return None
        return NodeVolume(volume_id, disk.device, os.path.getsize(disk.path), True,
                          self.contexts[volume_id], unfinished=volume_id in self.unfinished)

    def activate(self, volume: NodeVolume) -> NodeVolume:
        return volume

    def finish(self, volume: NodeVolume) -> NodeVolume:
        make_safe(volume.device_path, volume.size)  # what LvmVolumes.finish does before deltag
        self.unfinished.discard(volume.volume_id)
        self.finished.append(volume.volume_id)
        return replace(volume, unfinished=False)

    def extend(self, volume: NodeVolume, required_bytes: int, limit_bytes: int) -> NodeVolume:
        if not required_bytes or volume.size >= required_bytes:
            return volume
        size = -(-required_bytes // self.extent) * self.extent
        if limit_bytes and size > limit_bytes:
            raise OutOfRange(f"{size} > limit {limit_bytes}")
        disk = self.disks[volume.volume_id]
        os.truncate(disk.path, size)
        run(["losetup", "--set-capacity", disk.device], timeout=30)
        return replace(volume, size=size)


def make_config(**overrides: Any) -> CsiConfig:
    values: dict[str, Any] = {"node_id": "edge-node-7", "driver_name":
                              f"t{secrets.token_hex(4)}.csi.edge.io"}
    values.update(overrides)
    return CsiConfig(**values)


@dataclass
class NodeRig:
    service: NodeService
    stub: csi_pb2_grpc.NodeStub
    volumes: Any
    tmp: Path
    mounter: Mounter

    def target(self, name: str = "target") -> str:
        return str(self.tmp / "pods" / name)

    def publish(self, volume_id: str, target: str, cap: Any, readonly: bool = False,
                **context: str) -> Any:
        return self.stub.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
            volume_id=volume_id, target_path=target, volume_capability=cap,
            readonly=readonly, volume_context=context), timeout=60)

    def unpublish(self, volume_id: str, target: str) -> Any:
        return self.stub.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=volume_id, target_path=target), timeout=60)

    def expand(self, volume_id: str, path: str, required: int = 0, limit: int = 0,
               cap: Any = None) -> Any:
        request = csi_pb2.NodeExpandVolumeRequest(
            volume_id=volume_id, volume_path=path,
            capacity_range=csi_pb2.CapacityRange(required_bytes=required, limit_bytes=limit))
        if cap is not None:
            request.volume_capability.CopyFrom(cap)
        return self.stub.NodeExpandVolume(request, timeout=120)

    def stats(self, volume_id: str, path: str) -> Any:
        return self.stub.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
            volume_id=volume_id, volume_path=path), timeout=60)



def _unmount_under(mounter: Mounter, root: Path) -> None:
    prefix = os.path.join(str(root), "")
    for entry in reversed(mounter.mounts()):
        if entry.mount_point.startswith(prefix):
            mounter.unmount_all(entry.mount_point)


@contextlib.contextmanager
def serve(service: NodeService) -> Iterator[csi_pb2_grpc.NodeStub]:
    endpoint = f"unix:///@csi-node-test-{secrets.token_hex(6)}"
    server = GrpcServer(endpoint, [service.register], max_workers=4)
    server.start()
    channel = unix_channel(endpoint)
    try:
        yield csi_pb2_grpc.NodeStub(channel)
    finally:
        channel.close()
        server.stop(grace=1)


@pytest.fixture
def node_factory(loop_disks: LoopDiskFactory, tmp_path: Path) -> Iterator[Callable[..., NodeRig]]:
    """NodeRig(s) over loop-device volumes; every mount they made is undone at teardown
    (before the loop disks are detached: this fixture depends on theirs)."""
    mounter = Mounter(timeout=60)
    stack = contextlib.ExitStack()

    def make(**config: Any) -> NodeRig:
        volumes = LoopVolumes()
        service = NodeService(make_config(**config), None, volumes=volumes, mounter=mounter)
        stub = stack.enter_context(serve(service))
        (tmp_path / "pods").mkdir(exist_ok=True)
        return NodeRig(service, stub, volumes, tmp_path, mounter)

    with stack:
        try:
            yield make
        finally:
            _unmount_under(mounter, tmp_path)


@pytest.fixture
def node(node_factory: Callable[..., NodeRig]) -> NodeRig:
    return node_factory()


def new_volume(node: NodeRig, loop_disks: LoopDiskFactory, size: int = 64 * MiB,
               **context: str) -> tuple[str, LoopDisk]:
    (disk,) = loop_disks(1, size)
    volume_id = f"vg-test/pvc-{secrets.token_hex(4)}"
    node.volumes.add(volume_id, disk, **context)
    return volume_id, disk


# ---------------------------------------------------------------------------- info


def test_capabilities_are_expand_stats_condition_and_multi_writer_without_staging(
    node: NodeRig,
) -> None:
    reply = node.stub.NodeGetCapabilities(csi_pb2.NodeGetCapabilitiesRequest(), timeout=10)
    kinds = {cap.rpc.type for cap in reply.capabilities}
    assert kinds == {RPC.EXPAND_VOLUME, RPC.GET_VOLUME_STATS, RPC.VOLUME_CONDITION,
                     RPC.SINGLE_NODE_MULTI_WRITER}
    assert RPC.STAGE_UNSTAGE_VOLUME not in kinds
    assert set(NODE_CAPABILITIES) == kinds


def test_node_info_reports_node_id_topology_and_volume_limit(
    node_factory: Callable[..., NodeRig],
) -> None:
    node = node_factory(node_id="edge-42", driver_name="lvm.example.org",
                        max_volumes_per_node=250)
    info = node.stub.NodeGetInfo(csi_pb2.NodeGetInfoRequest(), timeout=10)
    assert info.node_id == "edge-42"
    assert info.max_volumes_per_node == 250
    assert dict(info.accessible_topology.segments) == {"topology.lvm.example.org/node": "edge-42"}


def test_staging_rpcs_are_unimplemented(node: NodeRig) -> None:
    assert code_of(lambda: node.stub.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
        volume_id="vg/x", staging_target_path="/tmp/s", volume_capability=mount_cap()),
        timeout=10)) == grpc.StatusCode.UNIMPLEMENTED
    assert code_of(lambda: node.stub.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
        volume_id="vg/x", staging_target_path="/tmp/s"), timeout=10)) == \
        grpc.StatusCode.UNIMPLEMENTED


# ---------------------------------------------------------------------------- validation


def _publish_requests(target: str) -> dict[str, Any]:
    no_mode = csi_pb2.VolumeCapability(mount=csi_pb2.VolumeCapability.MountVolume())
    no_type = csi_pb2.VolumeCapability(access_mode=Mode(mode=SNW))
    group = mount_cap()
    group.mount.volume_mount_group = "1000"
    R = csi_pb2.NodePublishVolumeRequest
    return {
        "no volume_id": R(target_path=target, volume_capability=mount_cap()),
        "no target_path": R(volume_id="vg/v", volume_capability=mount_cap()),
        "relative target_path": R(volume_id="vg/v", target_path="pods/x",
                                  volume_capability=mount_cap()),
        "no capability": R(volume_id="vg/v", target_path=target),
        "no access mode": R(volume_id="vg/v", target_path=target, volume_capability=no_mode),
        "no access type": R(volume_id="vg/v", target_path=target, volume_capability=no_type),
        "unsupported fs": R(volume_id="vg/v", target_path=target,
                            volume_capability=mount_cap("nilfs2")),
        "mount group": R(volume_id="vg/v", target_path=target, volume_capability=group),
        "bind mount flag": R(volume_id="vg/v", target_path=target,
                             volume_capability=mount_cap(flags=("bind",))),
        "helper mount flag": R(volume_id="vg/v", target_path=target,
                               volume_capability=mount_cap(flags=("noatime,X-mount.mkdir",))),
        **{f"multi-node mode {m}": R(volume_id="vg/v", target_path=target,
                                     volume_capability=mount_cap(mode=m)) for m in MULTI_NODE},
        **{f"multi-node block mode {m}": R(volume_id="vg/v", target_path=target,
                                           volume_capability=block_cap(mode=m))
           for m in MULTI_NODE},
    }


@pytest.mark.parametrize("case", list(_publish_requests("/x")))
def test_publish_with_a_bad_argument_is_invalid_before_any_lookup(
    node: NodeRig, case: str
) -> None:
    request = _publish_requests(node.target())[case]
    assert code_of(lambda: node.stub.NodePublishVolume(request, timeout=10)) == \
        grpc.StatusCode.INVALID_ARGUMENT
    assert node.volumes.lookups == []
    assert not os.path.exists(node.target())


def test_unpublish_stats_and_expand_without_required_fields_are_invalid(node: NodeRig) -> None:
    s = node.stub
    invalid = [
        lambda: s.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
            target_path="/tmp/x"), timeout=10),
        lambda: s.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
            volume_id="vg/v"), timeout=10),
        lambda: s.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
            volume_id="vg/v", target_path="relative"), timeout=10),
        lambda: s.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
            volume_path="/tmp"), timeout=10),
        lambda: s.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
            volume_id="vg/v"), timeout=10),
        lambda: node.expand("", "/tmp", 1),
        lambda: node.expand("vg/v", "", 1),
        lambda: node.expand("vg/v", "/tmp", -1),
        lambda: node.expand("vg/v", "/tmp", 0, -5),
        lambda: node.expand("vg/v", "/tmp", 20 * MiB, 10 * MiB),
        lambda: node.expand("vg/v", "/tmp", MiB, cap=mount_cap(mode=Mode.MULTI_NODE_MULTI_WRITER)),
        lambda: node.expand("vg/v", "/tmp", MiB, cap=csi_pb2.VolumeCapability()),
    ]
    for call in invalid:
        assert code_of(call) == grpc.StatusCode.INVALID_ARGUMENT
    assert node.volumes.lookups == []


def test_unknown_volumes_are_not_found(node: NodeRig, tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    assert code_of(lambda: node.publish("vg-test/nope", node.target(), mount_cap())) == \
        grpc.StatusCode.NOT_FOUND
    assert not os.path.exists(node.target())
    assert code_of(lambda: node.expand("vg-test/nope", str(plain), MiB)) == \
        grpc.StatusCode.NOT_FOUND
    for path in (str(plain), str(tmp_path / "missing"), "some/relative/path"):
        with pytest.raises(grpc.RpcError) as info:
            node.stats("vg-test/nope", path)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND, path


def test_unpublish_of_an_unknown_volume_or_absent_target_succeeds_every_time(
    node: NodeRig,
) -> None:
    target = node.target("never-published")
    for _ in range(2):
        node.unpublish("vg-test/unknown", target)
    os.mkdir(target)  # left by someone: removed, as the spec asks
    node.unpublish("vg-test/unknown", target)
    assert not os.path.exists(target)


# ---------------------------------------------------------------------------- mount volumes


def test_publish_formats_a_blank_volume_and_is_idempotent(
    node: NodeRig, loop_disks: LoopDiskFactory
) -> None:
    volume_id, disk = new_volume(node, loop_disks, fsType="ext4")
    target = node.target()
    node.publish(volume_id, target, mount_cap("ext4"))
    entry = node.mounter.find(target)
    assert entry is not None and entry.fs_type == "ext4" and not entry.read_only
    assert entry.devno == os.stat(disk.device).st_rdev
    assert os.path.isdir(os.path.join(target, "lost+found"))
    Path(target, "data.txt").write_text("hello")

    node.publish(volume_id, target, mount_cap("ext4"))  # identical: OK, nothing new
    node.publish(volume_id, target, mount_cap())  # fs_type unset is compatible too
    assert len(node.mounter.mounts_at(target)) == 1
    assert code_of(lambda: node.publish(volume_id, target, mount_cap("ext4"), readonly=True)) \
        == grpc.StatusCode.ALREADY_EXISTS
    assert code_of(lambda: node.publish(volume_id, target, mount_cap("xfs"))) == \
        grpc.StatusCode.ALREADY_EXISTS
    assert code_of(lambda: node.publish(volume_id, target, mount_cap(flags=("nodev",)))) == \
        grpc.StatusCode.ALREADY_EXISTS
    assert code_of(lambda: node.publish(volume_id, target, block_cap())) == \
        grpc.StatusCode.ALREADY_EXISTS

    node.unpublish(volume_id, target)
    assert not os.path.exists(target)
    assert node.mounter.filesystem_mounts(disk.device) == []
    node.unpublish(volume_id, target)  # again: OK

    node.publish(volume_id, target, mount_cap("ext4"))  # not formatted again: data kept
    assert Path(target, "data.txt").read_text() == "hello"
    node.unpublish(volume_id, target)


def test_read_only_publish_refuses_writes(node: NodeRig, loop_disks: LoopDiskFactory) -> None:
    volume_id, _ = new_volume(node, loop_disks)
    target = node.target()
    node.publish(volume_id, target, mount_cap(), readonly=True)
    entry = node.mounter.find(target)
    assert entry is not None and entry.read_only
    with pytest.raises(OSError):
        Path(target, "x").write_text("no")
    node.publish(volume_id, target, mount_cap(), readonly=True)  # idempotent
    node.unpublish(volume_id, target)


def test_reader_only_access_mode_publishes_read_only(
    node: NodeRig, loop_disks: LoopDiskFactory
) -> None:
    volume_id, _ = new_volume(node, loop_disks)
    target = node.target()
    node.publish(volume_id, target, mount_cap(mode=SNRO), readonly=False)
    entry = node.mounter.find(target)
    assert entry is not None and entry.read_only
    node.unpublish(volume_id, target)


def test_capability_mount_flags_and_storage_class_mount_options_are_applied(
    node: NodeRig, loop_disks: LoopDiskFactory
) -> None:
    volume_id, _ = new_volume(node, loop_disks, mountOptions="nodev, noexec")
    target = node.target()
    node.publish(volume_id, target, mount_cap(flags=("noatime",)))
    entry = node.mounter.find(target)
    assert entry is not None
    assert {"noatime", "nodev", "noexec"} <= set(entry.options)
    node.unpublish(volume_id, target)


def test_storage_class_mount_options_that_change_the_operation_are_refused(
    node: NodeRig, loop_disks: LoopDiskFactory
) -> None:
    volume_id, disk = new_volume(node, loop_disks, mountOptions="bind")
    assert code_of(lambda: node.publish(volume_id, node.target(), mount_cap())) == \
        grpc.StatusCode.INVALID_ARGUMENT
    assert not os.path.exists(node.target())
    assert filesystem.blank_problem(disk.device) is None


def test_storage_class_mkfs_options_reach_mkfs(node: NodeRig,
                                               loop_disks: LoopDiskFactory) -> None:
    volume_id, disk = new_volume(node, loop_disks, fsType="ext4",
                                 mkfsOptions="-L tenant-a -m 0")
    node.publish(volume_id, node.target(), mount_cap("ext4"))
    assert probe(disk.device).values["LABEL"] == "tenant-a"
    node.unpublish(volume_id, node.target())


def test_unsafe_mkfs_options_are_refused_and_nothing_is_written(
    node: NodeRig, loop_disks: LoopDiskFactory
) -> None:
    (other,) = loop_disks(1)
    make_filesystem("ext4", other.device)
    other_before = device_fingerprint(other.device)
    volume_id, disk = new_volume(node, loop_disks, fsType="ext4",
                                 mkfsOptions=f"-J device={other.device}")
    assert code_of(lambda: node.publish(volume_id, node.target(), mount_cap("ext4"))) == \
        grpc.StatusCode.INVALID_ARGUMENT
    assert filesystem.blank_problem(disk.device) is None
    assert device_fingerprint(other.device) == other_before
    assert not os.path.exists(node.target())


def test_a_volume_holding_raw_data_is_never_formatted(
    node: NodeRig, loop_disks: LoopDiskFactory
) -> None:
    volume_id, disk = new_volume(node, loop_disks)
    fd = os.open(disk.device, os.O_WRONLY)
    try:
        os.pwrite(fd, b"raw block tenant data" * 100, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    before = device_fingerprint(disk.device)
    assert code_of(lambda: node.publish(volume_id, node.target(), mount_cap("ext4"))) == \
        grpc.StatusCode.FAILED_PRECONDITION
    assert device_fingerprint(disk.device) == before
    assert not os.path.exists(node.target())


def test_an_existing_filesystem_is_mounted_as_found_unless_another_type_is_asked(
    node: NodeRig, loop_disks: LoopDiskFactory
) -> None:
    volume_id, disk = new_volume(node, loop_disks, 320 * MiB, fsType="ext4")
    make_filesystem("xfs", disk.device)
    before = device_fingerprint(disk.device)
    assert code_of(lambda: node.publish(volume_id, node.target(), mount_cap("ext4"))) == \
        grpc.StatusCode.FAILED_PRECONDITION
    assert device_fingerprint(disk.device) == before
    node.publish(volume_id, node.target(), mount_cap())
    entry = node.mounter.find(node.target())
    assert entry is not None and entry.fs_type == "xfs"
    node.unpublish(volume_id, node.target())


def test_xfs_volume_is_formatted_and_mounted(node: NodeRig, loop_disks: LoopDiskFactory) -> None:
    volume_id, disk = new_volume(node, loop_disks, 320 * MiB, fsType="xfs")
    node.publish(volume_id, node.target(), mount_cap("xfs"))
    entry = node.mounter.find(node.target())
    assert entry is not None and entry.fs_type == "xfs"
    assert probe(disk.device).fs_type == "xfs"
    node.unpublish(volume_id, node.target())


# ---------------------------------------------------------------------------- block volumes


def test_block_publish_binds_the_device_onto_a_file_and_is_idempotent(
    node: NodeRig, loop_disks: LoopDiskFactory
) -> None:
    volume_id, disk = new_volume(node, loop_disks)
    payload = os.urandom(8192)
    target = node.target("dev")
    node.publish(volume_id, target, block_cap())
    st = os.stat(target)
    assert stat.S_ISBLK(st.st_mode) and st.st_rdev == os.stat(disk.device).st_rdev
    fd = os.open(target, os.O_RDWR)
    try:
        os.pwrite(fd, payload, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    with open(disk.device, "rb") as f:
        assert f.read(8192) == payload

    node.publish(volume_id, target, block_cap())  # identical: OK
    assert len(node.mounter.mounts_at(target)) == 1
    assert code_of(lambda: node.publish(volume_id, target, block_cap(), readonly=True)) == \
        grpc.StatusCode.ALREADY_EXISTS
    assert code_of(lambda: node.publish(volume_id, target, mount_cap())) == \
        grpc.StatusCode.ALREADY_EXISTS
    assert filesystem.probe(disk.device).empty  # a block publish never formats

    node.unpublish(volume_id, target)
    assert not os.path.exists(target)
    node.unpublish(volume_id, target)


def test_read_only_block_publish_is_a_read_only_bind(
    node: NodeRig, loop_disks: LoopDiskFactory
) -> None:
    volume_id, _ = new_volume(node, loop_disks)
    target = node.target("rodev")
    node.publish(volume_id, target, block_cap(), readonly=True)
    entry = node.mounter.find(target)
    assert entry is not None and entry.read_only
    node.unpublish(volume_id, target)


# ---------------------------------------------------------------------------- several targets


def test_multi_writer_volume_is_published_at_several_targets_sharing_one_filesystem(
    node: NodeRig, loop_disks: LoopDiskFactory
) -> None:
    volume_id, disk = new_volume(node, loop_disks)
    first, second = node.target("pod-1"), node.target("pod-2")
    node.publish(volume_id, first, mount_cap(mode=SNMW))
    node.publish(volume_id, second, mount_cap(mode=SNMW), readonly=True)
    Path(first, "shared").write_text("from pod 1")
    assert Path(second, "shared").read_text() == "from pod 1"
    entry = node.mounter.find(second)
    assert entry is not None and entry.read_only
    assert len(node.mounter.filesystem_mounts(disk.device)) == 2
    node.unpublish(volume_id, first)
    assert Path(second, "shared").read_text() == "from pod 1"
    node.unpublish(volume_id, second)
    assert node.mounter.filesystem_mounts(disk.device) == []


def test_read_write_publish_is_refused_while_the_filesystem_is_mounted_read_only(
    node: NodeRig, loop_disks: LoopDiskFactory
) -> None:
    volume_id, _ = new_volume(node, loop_disks)
    node.publish(volume_id, node.target("ro"), mount_cap(mode=SNMW), readonly=True)
    assert code_of(lambda: node.publish(volume_id, node.target("rw"), mount_cap(mode=SNMW))) \
        == grpc.StatusCode.FAILED_PRECONDITION
    assert not os.path.exists(node.target("rw"))
    node.unpublish(volume_id, node.target("ro"))


@pytest.mark.parametrize("mode", [SNW, SNSW, SNRO])
def test_single_target_modes_refuse_a_second_target(
    node: NodeRig, loop_disks: LoopDiskFactory, mode: int
) -> None:
    volume_id, _ = new_volume(node, loop_disks)
    node.publish(volume_id, node.target("a"), mount_cap(mode=mode))
    assert code_of(lambda: node.publish(volume_id, node.target("b"), mount_cap(mode=mode))) \
        == grpc.StatusCode.FAILED_PRECONDITION
    node.publish(volume_id, node.target("a"), mount_cap(mode=mode))  # the same target: OK
    node.unpublish(volume_id, node.target("a"))
    node.publish(volume_id, node.target("b"), mount_cap(mode=mode))  # after unpublish: OK
    node.unpublish(volume_id, node.target("b"))


def test_block_volume_targets_follow_the_access_mode(
    node: NodeRig, loop_disks: LoopDiskFactory
) -> None:
    volume_id, _ = new_volume(node, loop_disks)
    node.publish(volume_id, node.target("a"), block_cap(SNSW))
    assert code_of(lambda: node.publish(volume_id, node.target("b"), block_cap(SNSW))) == \
        grpc.StatusCode.FAILED_PRECONDITION
    node.publish(volume_id, node.target("c"), block_cap(SNMW))
    assert os.stat(node.target("c")).st_rdev == os.stat(node.target("a")).st_rdev
    for name in ("a", "c"):
        node.unpublish(volume_id, node.target(name))


# ---------------------------------------------------------------------------- expansion


def test_expand_grows_a_mounted_xfs_filesystem_online(
    node: NodeRig, loop_disks: LoopDiskFactory
) -> None:
    volume_id, disk = new_volume(node, loop_disks, 320 * MiB, fsType="xfs")
    target = node.target()
    node.publish(volume_id, target, mount_cap("xfs"))
    Path(target, "kept").write_text("data")
    before = filesystem_usage(target).total_bytes

    reply = node.expand(volume_id, target, 400 * MiB)
    assert reply.capacity_bytes == 400 * MiB
    assert node.mounter.is_mount_point(target)  # never unmounted
    assert filesystem_usage(target).total_bytes - before >= 70 * MiB
    assert Path(target, "kept").read_text() == "data"

    again = node.expand(volume_id, target, 400 * MiB)  # idempotent
    assert again.capacity_bytes == 400 * MiB
    smaller = node.expand(volume_id, target, 350 * MiB)  # already bigger: OK
    assert smaller.capacity_bytes == 400 * MiB
    assert code_of(lambda: node.expand(volume_id, target, 500 * MiB + 1, 500 * MiB + 1)) == \
        grpc.StatusCode.OUT_OF_RANGE
    assert code_of(lambda: node.expand(volume_id, target, 450 * MiB, cap=block_cap())) == \
        grpc.StatusCode.INVALID_ARGUMENT
    assert os.path.getsize(disk.path) == 400 * MiB
    node.unpublish(volume_id, target)


def test_expand_of_a_block_volume_grows_the_device_only(
    node: NodeRig, loop_disks: LoopDiskFactory
) -> None:
    volume_id, disk = new_volume(node, loop_disks)
    target = node.target("dev")
    node.publish(volume_id, target, block_cap())
    reply = node.expand(volume_id, target, 100 * MiB)
    assert reply.capacity_bytes == 100 * MiB
    usage = node.stats(volume_id, target).usage
    assert [(u.unit, u.total) for u in usage] == [(Usage.BYTES, 100 * MiB)]
    assert filesystem.probe(disk.device).empty
    # kubelet may reach the device through a symlink to the published file.
    link = node.target("dev-link")
    os.symlink(target, link)
    assert node.stats(volume_id, link).usage[0].total == 100 * MiB
    assert node.expand(volume_id, link, 120 * MiB).capacity_bytes == 120 * MiB
    os.unlink(link)
    (other,) = loop_disks(1)
    os.symlink(other.device, link)  # another device: not this volume
    assert code_of(lambda: node.stats(volume_id, link)) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: node.expand(volume_id, link, 140 * MiB)) == grpc.StatusCode.NOT_FOUND
    os.unlink(link)
    node.unpublish(volume_id, target)


def test_expand_needs_the_volume_published_at_the_path(
    node: NodeRig, loop_disks: LoopDiskFactory, tmp_path: Path
) -> None:
    volume_id, disk = new_volume(node, loop_disks)
    other_id, _ = new_volume(node, loop_disks)
    plain = tmp_path / "plain"
    plain.mkdir()
    assert code_of(lambda: node.expand(volume_id, str(plain), 100 * MiB)) == \
        grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: node.expand(volume_id, str(tmp_path / "nope"), 100 * MiB)) == \
        grpc.StatusCode.NOT_FOUND
    node.publish(other_id, node.target("other"), mount_cap())
    assert code_of(lambda: node.expand(volume_id, node.target("other"), 100 * MiB)) == \
        grpc.StatusCode.NOT_FOUND
    assert os.path.getsize(disk.path) == 64 * MiB
    node.unpublish(other_id, node.target("other"))


# ---------------------------------------------------------------------------- stats


def test_stats_of_a_mounted_volume_report_bytes_inodes_and_a_healthy_condition(
    node: NodeRig, loop_disks: LoopDiskFactory
) -> None:
    volume_id, _ = new_volume(node, loop_disks)
    target = node.target()
    node.publish(volume_id, target, mount_cap())
    with open(os.path.join(target, "blob"), "wb") as f:
        f.write(os.urandom(4 * MiB))
        os.fsync(f.fileno())
    reply = node.stats(volume_id, target)
    by_unit = {u.unit: u for u in reply.usage}
    assert set(by_unit) == {Usage.BYTES, Usage.INODES}
    fs = filesystem_usage(target)
    assert by_unit[Usage.BYTES].total == fs.total_bytes
    assert by_unit[Usage.BYTES].used >= 4 * MiB
    assert by_unit[Usage.INODES].used == fs.used_inodes
    assert not reply.volume_condition.abnormal
    node.unpublish(volume_id, target)


def test_stats_report_an_abnormal_condition_when_the_mount_is_gone(
    node: NodeRig, loop_disks: LoopDiskFactory
) -> None:
    volume_id, _ = new_volume(node, loop_disks)
    target = node.target()
    node.publish(volume_id, target, mount_cap())
    node.mounter.unmount_all(target)  # behind the driver's back
    reply = node.stats(volume_id, target)
    assert reply.volume_condition.abnormal
    assert "not mounted" in reply.volume_condition.message
    assert list(reply.usage) == []
    node.unpublish(volume_id, target)


def test_stats_report_an_abnormal_condition_when_the_volume_vanished(
    node: NodeRig, loop_disks: LoopDiskFactory
) -> None:
    volume_id, _ = new_volume(node, loop_disks)
    target = node.target()
    node.publish(volume_id, target, mount_cap())
    del node.volumes.disks[volume_id]  # the LV is gone (or lost its ownership tag)
    reply = node.stats(volume_id, target)
    assert reply.volume_condition.abnormal
    assert "no longer exists" in reply.volume_condition.message
    assert {u.unit for u in reply.usage} == {Usage.BYTES, Usage.INODES}
    node.unpublish(volume_id, target)  # unpublish still works for a vanished volume
    assert not os.path.exists(target)


def test_stats_at_a_path_holding_another_volume_are_not_found(
    node: NodeRig, loop_disks: LoopDiskFactory
) -> None:
    volume_id, _ = new_volume(node, loop_disks)
    other_id, _ = new_volume(node, loop_disks)
    node.publish(other_id, node.target("other"), mount_cap())
    assert code_of(lambda: node.stats(volume_id, node.target("other"))) == \
        grpc.StatusCode.NOT_FOUND
    node.unpublish(other_id, node.target("other"))


# ---------------------------------------------------------------------------- concurrency


def test_a_second_call_for_a_volume_in_flight_is_aborted(
    node: NodeRig, loop_disks: LoopDiskFactory
) -> None:
    volume_id, _ = new_volume(node, loop_disks)
    other_id, _ = new_volume(node, loop_disks)
    entered, release = node.volumes.hold(volume_id)
    outcome: dict[str, Any] = {}

    def first() -> None:
        try:
            node.publish(volume_id, node.target("slow"), mount_cap())
            outcome["first"] = "ok"
        except grpc.RpcError as exc:
            outcome["first"] = exc.code()

    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert entered.wait(30)
        for call in (lambda: node.publish(volume_id, node.target("fast"), mount_cap()),
                     lambda: node.unpublish(volume_id, node.target("slow")),
                     lambda: node.expand(volume_id, node.target("slow"), 100 * MiB)):
            assert code_of(call) == grpc.StatusCode.ABORTED
        node.publish(other_id, node.target("other"), mount_cap())  # other volumes go on
    finally:
        release.set()
        thread.join(60)
    assert outcome["first"] == "ok"
    assert node.mounter.is_mount_point(node.target("slow"))
    for vid, name in ((volume_id, "slow"), (other_id, "other")):
        node.unpublish(vid, node.target(name))


# ---------------------------------------------------------------------------- on real LVM


@dataclass
class LvmNode:
    rig: NodeRig
    lvm: Lvm
    vg: str
    driver: str

    def make_lv(self, name: str, size: int = 8 * MiB, *, tags: list[str] | None = None) -> str:
        if tags is None:
            tags = build_tags(self.driver, kind=KIND_VOLUME, csi_name=name, created=1,
                              size=size, context={"fsType": "ext4"})
        self.lvm.lvcreate(self.vg, name, size, tags=tags)
        return f"{self.vg}/{name}"


@pytest.fixture
def lvm_node(vg_factory: VgFactory, lvm: Lvm, tmp_path: Path) -> Iterator[LvmNode]:
    vg = vg_factory(pvs=1, size=64 * MiB)
    config = make_config()
    mounter = Mounter(timeout=60)
    service = NodeService(config, lvm, mounter=mounter)
    assert isinstance(service.volumes, LvmVolumes)
    (tmp_path / "pods").mkdir()
    with serve(service) as stub:
        yield LvmNode(NodeRig(service, stub, service.volumes, tmp_path, mounter), lvm,
                      vg.name, config.driver_name)


@pytest.mark.skipif(not Lvm(Lvm.settings_for_this_kernel()).settings.activation_disabled,
                    reason="this host can activate LVs: see tests/kernel/")
def test_lvm_volumes_are_found_only_with_the_ownership_tag(lvm_node: LvmNode,
                                                           tmp_path: Path) -> None:
    node = lvm_node.rig
    ours = lvm_node.make_lv("pvc-ours")
    foreign = lvm_node.make_lv("pvc-foreign", tags=["somebody-else"])
    other_driver = lvm_node.make_lv("pvc-other", tags=build_tags(
        "other.csi.example.org", kind=KIND_VOLUME, csi_name="pvc-other", created=1))
    pending = lvm_node.make_lv("pvc-pending", tags=build_tags(
        lvm_node.driver, kind=KIND_VOLUME, csi_name="pvc-pending", created=1, pending=True))
    attrs = {lv.name: (str(lv.attr), lv.size, lv.tags) for lv in lvm_node.lvm.lvs(lvm_node.vg)}

    plain = tmp_path / "plain"
    plain.mkdir()
    for volume_id in (foreign, other_driver, pending, f"{lvm_node.vg}/absent",
                      "novg-xyz/pvc-1", "not-an-id", "a/b/c"):
        calls: list[Callable[[], Any]] = [
            functools.partial(node.publish, volume_id, node.target(), mount_cap()),
            functools.partial(node.expand, volume_id, str(plain), 16 * MiB),
            functools.partial(node.stats, volume_id, str(plain)),
        ]
        for call in calls:
            assert code_of(call) == grpc.StatusCode.NOT_FOUND, volume_id
    # Nothing was changed on any LV, ours included.
    assert {lv.name: (str(lv.attr), lv.size, lv.tags)
            for lv in lvm_node.lvm.lvs(lvm_node.vg)} == attrs

    # Ours is found; without device-mapper it is inactive, which stats report as abnormal.
    reply = node.stats(ours, str(plain))
    assert reply.volume_condition.abnormal
    assert "not active" in reply.volume_condition.message
    assert code_of(lambda: node.expand(ours, str(plain), 16 * MiB)) == \
        grpc.StatusCode.FAILED_PRECONDITION
    lv = lvm_node.lvm.get_lv(lvm_node.vg, "pvc-ours")
    assert lv is not None and lv.size == 8 * MiB and owner_tag(lvm_node.driver) in lv.tags


def test_the_driver_serves_the_node_service_on_its_socket(csi: Any) -> None:
    stub = csi_pb2_grpc.NodeStub(csi.channel)
    info = stub.NodeGetInfo(csi_pb2.NodeGetInfoRequest(), timeout=10)
    assert info.node_id == csi.config.node_id
    assert dict(info.accessible_topology.segments) == {
        f"topology.{csi.config.driver_name}/node": csi.config.node_id}
    assert code_of(lambda: stub.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
        volume_id=f"{csi.vg.name}/pvc-missing", target_path="/tmp/csi-node-x",
        volume_capability=mount_cap()), timeout=30)) == grpc.StatusCode.NOT_FOUND


def test_lvm_volumes_extend_rounds_to_extents_and_maps_lvm_refusals(
    vg_factory: VgFactory, lvm: Lvm
) -> None:
    vg = vg_factory(pvs=2, size=64 * MiB)
    driver = f"t{secrets.token_hex(4)}.csi.edge.io"
    changes: list[int] = []
    volumes = LvmVolumes(lvm, driver, on_change=lambda: changes.append(1))
    tags = build_tags(driver, kind=KIND_VOLUME, csi_name="pvc-grow", created=1)
    lvm.lvcreate(vg.name, "pvc-grow", 8 * MiB, tags=tags)
    lvm.lvcreate(vg.name, "pvc-striped", 8 * MiB, stripes=2, tags=build_tags(
        driver, kind=KIND_VOLUME, csi_name="pvc-striped", created=1))
    extent = lvm.get_vg(vg.name).extent_size  # type: ignore[union-attr]

    vol = volumes.lookup(f"{vg.name}/pvc-grow")
    assert vol is not None and vol.size == 8 * MiB and vol.stripes == 1 and not vol.thin
    assert volumes.extend(vol, 8 * MiB, 0) is vol  # already big enough: no lvm call
    assert volumes.extend(vol, 0, 0) is vol
    assert changes == []

    grown = volumes.extend(vol, 8 * MiB + 1, 0)
    assert grown.size == 8 * MiB + extent
    now = lvm.get_lv(vg.name, "pvc-grow")
    assert now is not None and now.size == grown.size and owner_tag(driver) in now.tags
    assert changes == [1]

    with pytest.raises(OutOfRange):  # the rounded size exceeds the limit
        volumes.extend(grown, grown.size + 1, grown.size + 1)
    with pytest.raises(ResourceExhausted):  # more than the whole VG: maybe another node
        volumes.extend(grown, 1 << 30, 0)
    with pytest.raises(ResourceExhausted):  # fits the VG, not its free space
        volumes.extend(grown, grown.size + 120 * MiB - 4 * extent, 0)
    now = lvm.get_lv(vg.name, "pvc-grow")
    assert now is not None and now.size == grown.size

    striped = volumes.lookup(f"{vg.name}/pvc-striped")
    assert striped is not None and striped.stripes == 2
    assert volumes.extend(striped, 8 * MiB + 1, 0).size == 8 * MiB + 2 * extent


# ---------------------------------------------------------------------------- sizes, health


def _grow_device(disk: LoopDisk, size: int) -> None:
    """What a restore into a larger claim leaves: the source's filesystem on a bigger LV."""
    os.truncate(disk.path, size)
    run(["losetup", "--set-capacity", disk.device], timeout=30)


@pytest.mark.parametrize("fs_type", ["xfs"])  # ext4 online: tests/kernel (CAP_SYS_RESOURCE)
def test_a_filesystem_smaller_than_its_device_fills_it_at_first_publish(
    node: NodeRig, loop_disks: LoopDiskFactory, fs_type: str
) -> None:
    volume_id, disk = new_volume(node, loop_disks, 320 * MiB, fsType=fs_type)
    make_filesystem(fs_type, disk.device)
    _grow_device(disk, 4 * 320 * MiB)  # restored into 4x the source
    target = node.target()
    node.publish(volume_id, target, mount_cap(fs_type))
    assert filesystem_usage(target).total_bytes > 3 * 320 * MiB
    node.unpublish(volume_id, target)


def test_a_read_only_publish_leaves_the_filesystem_as_found(
    node: NodeRig, loop_disks: LoopDiskFactory
) -> None:
    volume_id, disk = new_volume(node, loop_disks, 64 * MiB, fsType="ext4")
    make_filesystem("ext4", disk.device)
    _grow_device(disk, 256 * MiB)
    target = node.target()
    node.publish(volume_id, target, mount_cap("ext4"), readonly=True)
    assert filesystem_usage(target).total_bytes < 64 * MiB
    node.unpublish(volume_id, target)


def test_a_filesystem_the_kernel_turned_read_only_after_an_error_is_abnormal(
    node: NodeRig, loop_disks: LoopDiskFactory
) -> None:
    volume_id, disk = new_volume(node, loop_disks, 64 * MiB, fsType="ext4")
    target = node.target()
    node.publish(volume_id, target, mount_cap("ext4", flags=("errors=remount-ro",)))
    assert not node.stats(volume_id, target).volume_condition.abnormal
    # The kernel's own fault injection: ext4 reports an error as a failed write would.
    name = os.path.basename(os.path.realpath(disk.device))
    Path(f"/sys/fs/ext4/{name}/trigger_fs_error").write_text("test write error\n")
    condition = node.stats(volume_id, target).volume_condition
    assert condition.abnormal and "read-only after a write error" in condition.message


# ---------------------------------------------------------------------------- unfinished volumes


def test_first_publish_of_an_unfinished_volume_never_shows_the_previous_tenant(
    node: NodeRig, loop_disks: LoopDiskFactory
) -> None:
    # A killed lvcreate: the LV exists with every tag but its extents still hold an earlier
    # tenant's filesystem. The first publish wipes it and gives a fresh one.
    volume_id, disk = new_volume(node, loop_disks, fsType="ext4")
    make_filesystem("ext4", disk.device, "")
    previous = node.target("previous")
    os.makedirs(previous)
    node.mounter.mount(disk.device, previous, "ext4", [])
    Path(previous, "secret.txt").write_text("previous tenant")
    node.mounter.unmount_all(previous)
    node.volumes.unfinished.add(volume_id)

    target = node.target()
    node.publish(volume_id, target, mount_cap("ext4"))
    assert sorted(os.listdir(target)) == ["lost+found"]
    assert node.volumes.finished == [volume_id]
    node.unpublish(volume_id, target)
    node.publish(volume_id, target, mount_cap("ext4"))  # finished once, never again
    assert node.volumes.finished == [volume_id]
    node.unpublish(volume_id, target)


def test_first_block_publish_of_an_unfinished_volume_has_no_old_signature(
    node: NodeRig, loop_disks: LoopDiskFactory
) -> None:
    volume_id, disk = new_volume(node, loop_disks)
    make_filesystem("ext4", disk.device, "")
    node.volumes.unfinished.add(volume_id)
    target = node.target("raw")
    node.publish(volume_id, target, block_cap())
    assert probe(target).fs_type is None
    with open(target, "rb") as f:
        assert f.read(MiB) == bytes(MiB)
        f.seek(-MiB, os.SEEK_END)
        assert f.read(MiB) == bytes(MiB)
    node.unpublish(volume_id, target)
