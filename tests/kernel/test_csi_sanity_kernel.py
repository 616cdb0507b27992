"""The csi-sanity (kubernetes-csi/csi-test, pkg/sanity) checks that need live LVs, against
the real driver on its unix socket, in the qemu guest (device-mapper).

The host-side mirror (tests/csi/test_sanity_mirror.py) covers every check that needs no
activation; here are the rest: snapshots (CreateSnapshot / ListSnapshots / DeleteSnapshot),
volumes created from a snapshot and from a volume, and the Node service on a real volume
(publish, idempotent re-publish, stats, expansion after publish, unpublish removing the
target). As csi-sanity does, every check runs against one driver on one VG, publishes at
<mount dir>/target (the mount dir exists, the target does not), and cleans up newest first
through NodeUnpublishVolume + DeleteVolume / DeleteSnapshot; a failing cleanup, or anything
left in the mount dir, fails the check (tests/csi/sanity_harness.py).

One driver (in-process) and one VG per disk for the whole module, small volumes: the guest
runs under emulation and every lvm call counts. The module runs twice: with plain volumes and
with `encrypted: "true"` in every CreateVolume's parameters (csi-sanity's
--csi.testvolumeparameters), the key wrapped by a local keyring backend.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from csi_lvm.server import Driver
from edge_common.lvm import Lvm
from edge_common.server import unix_channel
from edge_proto.csi.v1 import csi_pb2, csi_pb2_grpc
from tests.csi import sanity_harness
from tests.csi.sanity_harness import (
    IDEMPOTENT_COUNT,
    MAX_NAME_LENGTH,
    TEST_EXPAND_SIZE,
    TEST_VOLUME_SIZE,
    MountDir,
    Resources,
    check_snapshot_info,
    code_of,
    create_snapshot_req,
    create_volume_req,
    fixed_size_volume_req,
    unique_string,
    unique_string_with_length,
    volume_capability,
)
from tests.kernel.sanity_guest import RPC_TIMEOUT, sanity_config

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(600)]

Code = grpc.StatusCode
Usage = csi_pb2.VolumeUsage


@dataclass
class Guest:
    lvm: Lvm
    vg: str  # the default VG (first disk)
    other_vg: str  # a second VG (second disk)
    driver: Driver
    channel: grpc.Channel
    owner: str

    @property
    def controller(self) -> csi_pb2_grpc.ControllerStub:
        return csi_pb2_grpc.ControllerStub(self.channel)

    @property
    def node(self) -> csi_pb2_grpc.NodeStub:
        return csi_pb2_grpc.NodeStub(self.channel)

    def our_lvs(self) -> list[str]:
        return sorted(f"{lv.vg_name}/{lv.name}" for vg in (self.vg, self.other_vg)
                      for lv in self.lvm.lvs(vg) if self.owner in lv.tags)


@pytest.fixture(scope="module", params=["plain", "encrypted"])
def guest(request: pytest.FixtureRequest, kernel_disk_paths: list[str], lvm: Lvm,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    with sanity_config(lvm, kernel_disk_paths, tmp_path_factory.mktemp("sanity-keys"),
                       encrypted=request.param == "encrypted") as (config, vg, other):
        driver = Driver(config)
        driver.start()
        channel = unix_channel(config.endpoint)
        try:
            grpc.channel_ready_future(channel).result(timeout=60)
            yield Guest(lvm, vg, other, driver, channel,
                        f"csi-lvm.edge.io/owner={config.driver_name}")
        finally:
            channel.close()
            driver.stop(grace=1)


@pytest.fixture
def mount_dir(tmp_path: Path) -> Iterator[MountDir]:
    m = MountDir(tmp_path / "csi-mount")
    m.setup()
    yield m
    left = m.teardown()
    assert not left, f"the driver left {left} in csi-sanity's mount directory"


@pytest.fixture
def r(guest: Guest, mount_dir: MountDir) -> Iterator[Resources]:
    res = Resources(guest.controller, guest.node, mount_dir.target, timeout=RPC_TIMEOUT)
    yield res
    errors = res.cleanup()
    assert not errors, f"resource cleanup failed: {errors}"
    assert guest.our_lvs() == []


def list_snapshots(r: Resources, **kw: Any) -> list[Any]:
    resp = r.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest(**kw), timeout=RPC_TIMEOUT)
    for entry in resp.entries:
        check_snapshot_info(entry.snapshot)
    return list(resp.entries)


# =========================================================================== snapshots


def test_snapshot_checks_names_filters_paging_and_deletion(guest: Guest, r: Resources) -> None:
    """csi-sanity's CreateSnapshot, ListSnapshots and DeleteSnapshot checks, on thick
    (copy-on-write) snapshots of linear volumes, sharing their volumes to save time."""
    v1 = r.must_create_volume(fixed_size_volume_req(unique_string("CreateSnapshot-volume-1")))
    v2 = r.must_create_volume(fixed_size_volume_req(unique_string("CreateSnapshot-volume-2")))
    v3 = r.must_create_volume(fixed_size_volume_req(unique_string("listSnapshots-volume-3")))
    id1, id2, id3 = (v.volume.volume_id for v in (v1, v2, v3))
    assert list_snapshots(r) == []

    # "already existing name and same source volume ID": the same snapshot again.
    name1 = unique_string("CreateSnapshot-snapshot-1")
    s1 = r.must_create_snapshot(create_snapshot_req(name1, id1)).snapshot
    assert s1.ready_to_use and s1.source_volume_id == id1
    assert r.must_create_snapshot(create_snapshot_req(name1, id1)).snapshot.snapshot_id == \
        s1.snapshot_id
    # "already existing name and different source volume ID": ALREADY_EXISTS.
    assert code_of(lambda: r.create_snapshot(create_snapshot_req(name1, id2))) == \
        Code.ALREADY_EXISTS
    # "maximum-length name", created twice.
    long_name = unique_string_with_length("CreateSnapshot-snapshot-maxlen", MAX_NAME_LENGTH)
    s2 = r.must_create_snapshot(create_snapshot_req(long_name, id2)).snapshot
    assert r.must_create_snapshot(create_snapshot_req(long_name, id2)).snapshot.snapshot_id == \
        s2.snapshot_id
    s3 = r.must_create_snapshot(create_snapshot_req(
        unique_string("listSnapshots-snapshot-3"), id3)).snapshot

    # "match the specified snapshot id" / "source volume id": exactly the one asked for.
    assert [e.snapshot.snapshot_id for e in list_snapshots(r, snapshot_id=s2.snapshot_id)] == \
        [s2.snapshot_id]
    by_source = list_snapshots(r, source_volume_id=id3)
    assert [e.snapshot.snapshot_id for e in by_source] == [s3.snapshot_id]
    assert by_source[0].snapshot.source_volume_id == id3
    assert list_snapshots(r, snapshot_id="none-exist-id") == []

    # "next token when a limited number of entries are requested": at least five snapshots,
    # two per page, then the rest at once from the token.
    s4 = r.must_create_snapshot(create_snapshot_req(unique_string("snapshot4"), id1)).snapshot
    s5 = r.must_create_snapshot(create_snapshot_req(unique_string("snapshot5"), id3)).snapshot
    everything = {e.snapshot.snapshot_id for e in list_snapshots(r)}
    assert everything == {s.snapshot_id for s in (s1, s2, s3, s4, s5)}
    page = r.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest(max_entries=2))
    assert len(page.entries) == 2 and page.next_token
    rest = list_snapshots(r, starting_token=page.next_token)
    assert len(rest) == len(everything) - 2
    assert {e.snapshot.snapshot_id for e in [*page.entries, *rest]} == everything

    # "presence of new snapshots": deleted ones are omitted; deleting again is fine.
    r.delete_snapshot(s5.snapshot_id)
    r.delete_snapshot(s5.snapshot_id)
    assert len(list_snapshots(r)) == len(everything) - 1

    # Names are global to the driver: the same snapshot name for a volume in another VG.
    v4 = r.must_create_volume(create_volume_req(unique_string("CreateSnapshot-volume-4"),
                                                parameters={"vgName": guest.other_vg}))
    assert v4.volume.volume_id.startswith(f"{guest.other_vg}/")
    assert code_of(lambda: r.create_snapshot(create_snapshot_req(
        name1, v4.volume.volume_id))) == Code.ALREADY_EXISTS

    # A thick origin with snapshots: LVM will not grow it; the answer says why.
    grow = csi_pb2.ControllerExpandVolumeRequest(
        volume_id=id1, capacity_range=csi_pb2.CapacityRange(required_bytes=TEST_EXPAND_SIZE),
        volume_capability=volume_capability())
    with pytest.raises(grpc.RpcError) as info:
        r.controller.ControllerExpandVolume(grow, timeout=RPC_TIMEOUT)
    assert info.value.code() == Code.FAILED_PRECONDITION, info.value.details()
    assert "snapshot" in (info.value.details() or "")
    # The same on the node, which grows the LV when external-resizer talks to the central
    # (mode controller) instance.
    publish(r, v1.volume, "mount")
    with pytest.raises(grpc.RpcError) as info:
        r.node.NodeExpandVolume(csi_pb2.NodeExpandVolumeRequest(
            volume_id=id1, volume_path=r.target_path,
            capacity_range=csi_pb2.CapacityRange(required_bytes=TEST_EXPAND_SIZE)),
            timeout=RPC_TIMEOUT)
    assert info.value.code() == Code.FAILED_PRECONDITION, info.value.details()
    # csi-sanity cleans up newest first: the snapshots go before their origins (the cleanup
    # in the fixture checks that this order works).


def test_volumes_from_an_existing_snapshot_and_an_existing_volume(r: Resources) -> None:
    """csi-sanity's "should create volume from an existing source snapshot / volume"."""
    vol = r.must_create_volume(fixed_size_volume_req(unique_string("sanity-controller-source-vol")))
    snap = r.must_create_snapshot(create_snapshot_req(
        unique_string("sanity-controller-snap-from-vol"), vol.volume.volume_id)).snapshot
    assert snap.ready_to_use

    from_snap = fixed_size_volume_req(unique_string("sanity-controller-vol-from-snap"))
    from_snap.volume_content_source.snapshot.snapshot_id = snap.snapshot_id
    restored = r.create_volume(from_snap).volume
    assert restored.content_source.snapshot.snapshot_id == snap.snapshot_id

    from_vol = fixed_size_volume_req(unique_string("sanity-controller-vol-from-vol"))
    from_vol.volume_content_source.volume.volume_id = vol.volume.volume_id
    clone = r.create_volume(from_vol).volume
    assert clone.content_source.volume.volume_id == vol.volume.volume_id


# =========================================================================== Node Service


def node_info(r: Resources) -> Any:
    return r.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest())


def publish(r: Resources, vol: Any, access_type: str) -> None:
    resp = r.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
        volume_id=vol.volume_id, target_path=r.target_path,
        volume_capability=volume_capability(access_type), volume_context=vol.volume_context),
        timeout=RPC_TIMEOUT)
    assert resp is not None


def stats(r: Resources, volume_id: str, path: str) -> Any:
    return r.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
        volume_id=volume_id, volume_path=path), timeout=RPC_TIMEOUT)


@pytest.mark.parametrize("access_type", ["mount", "block"])
def test_node_full_lifecycle_is_idempotent_and_removes_the_target(
        r: Resources, mount_dir: MountDir, access_type: str) -> None:
    """csi-sanity's Node "should work" and "should be idempotent" (publish IdempotentCount
    times), "should remove target path", and NodeGetVolumeStats on a path where the volume
    is not; with --csi.testvolumeaccesstype mount and block."""
    info = node_info(r)
    req = create_volume_req(unique_string(f"sanity-node-full-{access_type}"),
                            access_type=access_type)
    req.accessibility_requirements.requisite.append(info.accessible_topology)
    vol = r.must_create_volume(req).volume

    for _ in range(IDEMPOTENT_COUNT):
        publish(r, vol, access_type)
    # The target exists: a directory holding the filesystem, or the device node bound there.
    st = os.stat(r.target_path)
    assert stat.S_ISDIR(st.st_mode) if access_type == "mount" else stat.S_ISBLK(st.st_mode)

    usage = stats(r, vol.volume_id, r.target_path)
    assert usage.usage and not usage.volume_condition.abnormal, usage
    units = {u.unit for u in usage.usage}
    assert units == ({Usage.BYTES, Usage.INODES} if access_type == "mount" else {Usage.BYTES})
    assert max(u.total for u in usage.usage if u.unit == Usage.BYTES) > 0
    assert code_of(lambda: stats(r, vol.volume_id, "some/path")) == Code.NOT_FOUND

    r.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
        volume_id=vol.volume_id, target_path=r.target_path), timeout=RPC_TIMEOUT)
    assert not os.path.lexists(r.target_path)
    assert os.listdir(mount_dir.path) == []


@pytest.mark.parametrize("access_type", ["mount", "block"])
def test_node_expand_after_node_publish(r: Resources, access_type: str) -> None:
    """csi-sanity's "should work if node-expand is called after node-publish": controller
    expansion first (answering exactly the size asked; csi-sanity sends no capability), then
    publish, then node expansion (no capability either)."""
    vol = r.must_create_volume(create_volume_req(unique_string("sanity-node-expand-volume"),
                                                 access_type=access_type))
    grown = r.controller.ControllerExpandVolume(csi_pb2.ControllerExpandVolumeRequest(
        volume_id=vol.volume.volume_id,
        capacity_range=csi_pb2.CapacityRange(required_bytes=TEST_EXPAND_SIZE)),
        timeout=RPC_TIMEOUT)
    assert grown.capacity_bytes == TEST_EXPAND_SIZE
    # An encrypted block volume needs the node too: its dm-crypt mapping grows there.
    encrypted = sanity_harness.TEST_VOLUME_PARAMETERS.get("encrypted") == "true"
    assert grown.node_expansion_required == (access_type == "mount" or encrypted)
    publish(r, vol.volume, access_type)
    resp = r.node.NodeExpandVolume(csi_pb2.NodeExpandVolumeRequest(
        volume_id=vol.volume.volume_id, volume_path=r.target_path,
        capacity_range=csi_pb2.CapacityRange(required_bytes=TEST_EXPAND_SIZE)),
        timeout=RPC_TIMEOUT)
    assert resp.capacity_bytes == TEST_EXPAND_SIZE
    total = max(u.total for u in stats(r, vol.volume.volume_id, r.target_path).usage
                if u.unit == Usage.BYTES)
    assert total > TEST_VOLUME_SIZE  # the filesystem (or the device) spans the grown LV
