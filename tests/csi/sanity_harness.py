"""What csi-sanity (kubernetes-csi/csi-test, pkg/sanity) does around each of its checks,
re-expressed for our tests: request shapes, generated names and ids, the capability lists it
accepts, and its resource bookkeeping (everything a check creates is unpublished and deleted
afterwards, newest first, and the check fails when that cleanup fails).

Used by tests/csi/test_sanity_mirror.py (host: no device-mapper) and
tests/kernel/test_csi_sanity_kernel.py (qemu guest: live LVs). Written from the behaviour of
the suite, not from its code.

Sizes: csi-sanity's defaults (--csi.testvolumesize 10 GiB, expansion +1 GiB) are scaled down
to loop-disk size here; the driver treats every size the same way (extent rounding), and
tests that depend on the relation between the test size and the VG size say so.
"""

from __future__ import annotations

import os
import secrets
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from edge_proto.csi.v1 import csi_pb2, csi_pb2_grpc

MiB = 1 << 20
Mode = csi_pb2.VolumeCapability.AccessMode
CtlRPC = csi_pb2.ControllerServiceCapability.RPC
NodeRPC = csi_pb2.NodeServiceCapability.RPC
Service = csi_pb2.PluginCapability.Service
Expansion = csi_pb2.PluginCapability.VolumeExpansion

#: The stand-ins for --csi.testvolumesize and --csi.testvolumeexpandsize.
TEST_VOLUME_SIZE = 16 * MiB
TEST_EXPAND_SIZE = TEST_VOLUME_SIZE + 16 * MiB
#: csi-sanity's default idempotency repeat count (IdempotentCount).
IDEMPOTENT_COUNT = 10
#: The longest CSI name (csi-sanity's MaxNameLength).
MAX_NAME_LENGTH = 128

#: Capabilities released csi-sanity versions accept; anything else fails their
#: "should return appropriate capabilities" checks.
KNOWN_CONTROLLER_CAPABILITIES = frozenset({
    CtlRPC.CREATE_DELETE_VOLUME, CtlRPC.PUBLISH_UNPUBLISH_VOLUME, CtlRPC.LIST_VOLUMES,
    CtlRPC.GET_CAPACITY, CtlRPC.CREATE_DELETE_SNAPSHOT, CtlRPC.LIST_SNAPSHOTS,
    CtlRPC.PUBLISH_READONLY, CtlRPC.CLONE_VOLUME, CtlRPC.EXPAND_VOLUME, CtlRPC.MODIFY_VOLUME,
    CtlRPC.LIST_VOLUMES_PUBLISHED_NODES, CtlRPC.GET_VOLUME, CtlRPC.VOLUME_CONDITION,
    CtlRPC.SINGLE_NODE_MULTI_WRITER,
})
KNOWN_NODE_CAPABILITIES = frozenset({
    NodeRPC.UNKNOWN, NodeRPC.STAGE_UNSTAGE_VOLUME, NodeRPC.GET_VOLUME_STATS,
    NodeRPC.EXPAND_VOLUME, NodeRPC.VOLUME_CONDITION, NodeRPC.SINGLE_NODE_MULTI_WRITER,
    NodeRPC.VOLUME_MOUNT_GROUP,
})
KNOWN_PLUGIN_SERVICES = frozenset({Service.CONTROLLER_SERVICE,
                                   Service.VOLUME_ACCESSIBILITY_CONSTRAINTS,
                                   Service.GROUP_CONTROLLER_SERVICE})
KNOWN_EXPANSION_TYPES = frozenset({Expansion.ONLINE, Expansion.OFFLINE})

_RUN_SUFFIX = "-" + secrets.token_hex(4).upper() + "-" + secrets.token_hex(4).upper()


def unique_string(prefix: str) -> str:
    """A name unique to this run: the prefix and a random upper-case hex suffix."""
    return prefix + _RUN_SUFFIX


def unique_string_with_length(prefix: str, length: int) -> str:
    """unique_string(prefix) padded with "a" to exactly `length` characters."""
    text = unique_string(prefix)
    assert len(text) <= length
    return text + "a" * (length - len(text))


def valid_looking_volume_id() -> str:
    """An id of the shape csi-sanity invents for volumes that do not exist."""
    return "fake-vol-id-" + str(uuid.uuid4())[:10]


def fake_node_id() -> str:
    return "fake-node-id-" + str(uuid.uuid4())[:10]


INVALID_VOLUME_ID = "fake-vol-id"


def volume_capability(access_type: str = "mount", mode: Any = Mode.SINGLE_NODE_WRITER) -> Any:
    """csi-sanity's capability: SINGLE_NODE_WRITER, mount with no fs type (or raw block)."""
    if access_type == "block":
        return csi_pb2.VolumeCapability(block=csi_pb2.VolumeCapability.BlockVolume(),
                                        access_mode=Mode(mode=mode))
    return csi_pb2.VolumeCapability(mount=csi_pb2.VolumeCapability.MountVolume(),
                                    access_mode=Mode(mode=mode))


#: csi-sanity's --csi.testvolumeparameters: StorageClass parameters it adds to every
#: CreateVolume request (a module sets them, e.g. {"encrypted": "true"}, and clears them).
TEST_VOLUME_PARAMETERS: dict[str, str] = {}


def create_volume_req(name: str, *, required: int | None = TEST_VOLUME_SIZE,
                      limit: int | None = None, access_type: str = "mount",
                      parameters: dict[str, str] | None = None) -> Any:
    req = csi_pb2.CreateVolumeRequest(name=name, volume_capabilities=[
        volume_capability(access_type)], parameters={**TEST_VOLUME_PARAMETERS,
                                                     **(parameters or {})})
    if required is not None or limit is not None:
        req.capacity_range.CopyFrom(csi_pb2.CapacityRange(required_bytes=required or 0,
                                                          limit_bytes=limit or 0))
    return req


def fixed_size_volume_req(name: str, access_type: str = "mount") -> Any:
    """Like csi-sanity's helper for volumes it snapshots: required = limit = test size."""
    return create_volume_req(name, required=TEST_VOLUME_SIZE, limit=TEST_VOLUME_SIZE,
                             access_type=access_type)


def create_snapshot_req(name: str, source_volume_id: str) -> Any:
    return csi_pb2.CreateSnapshotRequest(name=name, source_volume_id=source_volume_id)


def code_of(call: Callable[[], Any]) -> grpc.StatusCode:
    """The status code of a call that must fail."""
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return]
    raise AssertionError("the call succeeded; an error was expected")


def check_snapshot_info(snapshot: Any) -> None:
    """The fields csi-sanity requires on every snapshot it sees."""
    assert snapshot.snapshot_id
    assert snapshot.source_volume_id
    assert snapshot.creation_time.seconds > 0 or snapshot.creation_time.nanos > 0


@dataclass
class Resources:
    """csi-sanity's bookkeeping: tracks volumes and snapshots created through it and removes
    them, newest first (NodeUnpublishVolume at the shared target for every volume, NOT_FOUND
    tolerated, then DeleteVolume; DeleteSnapshot for snapshots)."""

    controller: csi_pb2_grpc.ControllerStub
    node: csi_pb2_grpc.NodeStub
    target_path: str  # <mount dir>/target: where csi-sanity publishes
    timeout: float = 60.0
    _managed: list[tuple[str, str]] = field(default_factory=list)  # (kind, id)

    def create_volume(self, req: Any) -> Any:
        resp = self.controller.CreateVolume(req, timeout=self.timeout)
        if resp.volume.volume_id:
            self._managed.append(("volume", resp.volume.volume_id))
        return resp

    def must_create_volume(self, req: Any) -> Any:
        resp = self.create_volume(req)
        assert resp.volume.volume_id, "volume ID in response is missing"
        return resp

    def delete_volume(self, volume_id: str) -> Any:
        resp = self.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume_id),
                                            timeout=self.timeout)
        self._forget(volume_id)
        return resp

    def create_snapshot(self, req: Any) -> Any:
        resp = self.controller.CreateSnapshot(req, timeout=self.timeout)
        if resp.snapshot.snapshot_id:
            self._managed.append(("snapshot", resp.snapshot.snapshot_id))
        return resp

    def must_create_snapshot(self, req: Any) -> Any:
        resp = self.create_snapshot(req)
        check_snapshot_info(resp.snapshot)
        return resp

    def must_create_snapshot_from_volume_req(self, volume_req: Any, snapshot_name: str,
                                             ) -> tuple[Any, Any]:
        vol = self.must_create_volume(volume_req)
        snap = self.must_create_snapshot(create_snapshot_req(snapshot_name,
                                                             vol.volume.volume_id))
        return snap, vol

    def delete_snapshot(self, snapshot_id: str) -> Any:
        resp = self.controller.DeleteSnapshot(
            csi_pb2.DeleteSnapshotRequest(snapshot_id=snapshot_id), timeout=self.timeout)
        self._forget(snapshot_id)
        return resp

    def _forget(self, object_id: str) -> None:
        for i, (_kind, known) in enumerate(self._managed):
            if known == object_id:
                del self._managed[i]
                return

    def cleanup(self) -> list[str]:
        """Remove everything still managed, newest first; the errors csi-sanity would fail on."""
        errors: list[str] = []
        for kind, object_id in reversed(self._managed):
            if kind == "snapshot":
                try:
                    self.controller.DeleteSnapshot(
                        csi_pb2.DeleteSnapshotRequest(snapshot_id=object_id),
                        timeout=self.timeout)
                except grpc.RpcError as exc:
                    errors.append(f"DeleteSnapshot {object_id}: {exc.code()} {exc.details()}")
                continue
            try:
                self.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
                    volume_id=object_id, target_path=self.target_path), timeout=self.timeout)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    errors.append(f"NodeUnpublishVolume {object_id}: {exc.code()} "
                                  f"{exc.details()}")
            try:
                self.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=object_id),
                                             timeout=self.timeout)
            except grpc.RpcError as exc:
                errors.append(f"DeleteVolume {object_id}: {exc.code()} {exc.details()}")
        self._managed.clear()
        return errors


class MountDir:
    """csi-sanity's per-check mount directory: created (it must not exist yet) before each
    check, removed after it; a driver that leaves its target behind breaks the next check."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def target(self) -> str:
        return str(self.path / "target")

    def setup(self) -> None:
        os.mkdir(self.path, 0o755)  # FileExistsError: the previous check left it behind

    def teardown(self) -> list[str]:
        """What the driver left in the directory (it is removed only when empty)."""
        left = sorted(os.listdir(self.path))
        if not left:
            os.rmdir(self.path)
        return left
