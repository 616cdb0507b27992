"""The checks of the official conformance suite, csi-sanity (kubernetes-csi/csi-test,
pkg/sanity), that can run on this host, against the real driver on its unix socket.

csi-sanity cannot be installed here (a Go binary), so its checks are re-expressed from what
they do: the same requests (shapes, generated names, invented ids), the same expectations,
and its bookkeeping around each check (tests/csi/sanity_harness.py). Every check runs against
ONE driver on one VG, as csi-sanity runs against one endpoint, and cleans up after itself the
way csi-sanity does; the check fails if that cleanup fails.

This host has no device-mapper: LVs cannot be activated, so snapshots, content sources that
copy data, and NodePublishVolume of a real volume cannot happen here. Those checks are in
tests/kernel/test_csi_sanity_kernel.py (qemu guest). Checks csi-sanity skips for this driver
(ControllerPublish/Unpublish, NodeStage/Unstage, ModifyVolume, GroupController: capabilities
not advertised) are covered by the capability checks below.

Besides the mirrored checks, a few tests pin down where csi-sanity's generic parameters meet
this driver (test sizes against the VG size, names reused across VGs).
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import pytest

from csi_lvm.config import CsiConfig
from csi_lvm.server import Driver
from edge_common.loopdisk import loop_disks
from edge_common.lvm import Lvm
from edge_common.server import unix_channel
from edge_proto.csi.v1 import csi_pb2, csi_pb2_grpc
from tests.csi.conftest import make_config
from tests.csi.sanity_harness import (
    IDEMPOTENT_COUNT,
    INVALID_VOLUME_ID,
    KNOWN_CONTROLLER_CAPABILITIES,
    KNOWN_EXPANSION_TYPES,
    KNOWN_NODE_CAPABILITIES,
    KNOWN_PLUGIN_SERVICES,
    MAX_NAME_LENGTH,
    TEST_EXPAND_SIZE,
    TEST_VOLUME_SIZE,
    CtlRPC,
    MiB,
    MountDir,
    NodeRPC,
    Resources,
    Service,
    check_snapshot_info,
    code_of,
    create_snapshot_req,
    create_volume_req,
    fixed_size_volume_req,
    unique_string,
    unique_string_with_length,
    valid_looking_volume_id,
    volume_capability,
)
from tests.rigs.lvm import remove_vg_and_pvs, unique_vg_name

Code = grpc.StatusCode
DISK = 128 * MiB


@dataclass
class Endpoint:
    """One csi-lvm process (in-process Driver) and its three services over the socket."""

    config: CsiConfig
    driver: Driver
    channel: grpc.Channel

    @classmethod
    def start(cls, config: CsiConfig) -> Endpoint:
        driver = Driver(config)
        driver.start()
        channel = unix_channel(config.endpoint)
        grpc.channel_ready_future(channel).result(timeout=10)
        return cls(config, driver, channel)

    def stop(self) -> None:
        self.channel.close()
        self.driver.stop(grace=1)

    @property
    def identity(self) -> csi_pb2_grpc.IdentityStub:
        return csi_pb2_grpc.IdentityStub(self.channel)

    @property
    def controller(self) -> csi_pb2_grpc.ControllerStub:
        return csi_pb2_grpc.ControllerStub(self.channel)

    @property
    def node(self) -> csi_pb2_grpc.NodeStub:
        return csi_pb2_grpc.NodeStub(self.channel)


@dataclass
class Suite:
    """The driver csi-sanity would be pointed at, and what it runs on."""

    ep: Endpoint
    lvm: Lvm
    vg: str  # the default VG: 2 PVs of DISK
    other_vg: str  # a second VG the driver may also use (vgName)
    sock_dir: Path
    rpc_timeout: float = 60.0  # per call of csi-sanity's bookkeeping (Resources)

    @property
    def owner(self) -> str:
        return f"csi-lvm.edge.io/owner={self.ep.config.driver_name}"

    def our_lvs(self) -> list[str]:
        return sorted(f"{lv.vg_name}/{lv.name}" for vg in (self.vg, self.other_vg)
                      for lv in self.lvm.lvs(vg) if self.owner in lv.tags)

    def restart(self, **overrides: Any) -> None:
        self.ep.stop()
        self.ep = Endpoint.start(replace(self.ep.config, **overrides))


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory, lvm: Lvm) -> Iterator[Suite]:
    directory = tmp_path_factory.mktemp("sanity")
    sock_dir = Path(f"/tmp/csi-{secrets.token_hex(4)}")  # short: unix socket path limit
    sock_dir.mkdir()
    with loop_disks(3, DISK, directory) as disks:
        vg, other = unique_vg_name("sanity"), unique_vg_name("sanity")
        lvm.vgcreate(vg, [disks[0].device, disks[1].device])
        lvm.vgcreate(other, [disks[2].device])
        # default_volume_size stands in for the 1 GiB default csi-sanity's "no capacity"
        # creates would get (scaled like the test size).
        config = make_config(vg, sock_dir, default_volume_size=TEST_VOLUME_SIZE,
                             allowed_vgs=[other])
        ep = Endpoint.start(config)
        s = Suite(ep, lvm, vg, other, sock_dir)
        try:
            yield s
        finally:
            s.ep.stop()
            for p in sock_dir.iterdir():
                p.unlink()
            sock_dir.rmdir()
            remove_vg_and_pvs(lvm, vg, [d.device for d in disks[:2]])
            remove_vg_and_pvs(lvm, other, [disks[2].device])


@pytest.fixture
def mount_dir(tmp_path: Path) -> Iterator[MountDir]:
    m = MountDir(tmp_path / "csi-mount")
    m.setup()
    yield m
    left = m.teardown()
    assert not left, f"the driver left {left} in csi-sanity's mount directory"


@pytest.fixture
def r(suite: Suite, mount_dir: MountDir) -> Iterator[Resources]:
    """csi-sanity's per-check Resources: whatever the check created is cleaned up after it,
    and a failing cleanup fails the check. The VG must then hold nothing of ours."""
    res = Resources(suite.ep.controller, suite.ep.node, mount_dir.target,
                    timeout=suite.rpc_timeout)
    yield res
    errors = res.cleanup()
    assert not errors, f"resource cleanup failed: {errors}"
    assert suite.our_lvs() == []


# =========================================================================== Identity Service


def test_identity_plugin_capabilities_are_all_kinds_csi_sanity_knows(suite: Suite) -> None:
    caps = suite.ep.identity.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest())
    assert caps.capabilities
    for cap in caps.capabilities:
        kind = cap.WhichOneof("type")
        if kind == "service":
            assert cap.service.type in KNOWN_PLUGIN_SERVICES
        else:
            assert kind == "volume_expansion", cap
            assert cap.volume_expansion.type in KNOWN_EXPANSION_TYPES


def test_identity_probe_answers_without_error_and_reports_ready(suite: Suite) -> None:
    resp = suite.ep.identity.Probe(csi_pb2.ProbeRequest())
    assert resp.HasField("ready") and resp.ready.value is True


# csi-sanity: 1 to 63 characters, a letter first and last, letters, digits, "-", ".", "_"
# in between.
_PLUGIN_NAME = re.compile(r"[A-Za-z](?:[A-Za-z0-9._-]{0,61}[A-Za-z])?")


@pytest.mark.parametrize("name", [None, "local.csi.edge.io"])
def test_identity_plugin_info_name_has_the_form_csi_sanity_requires(
        suite: Suite, name: str | None) -> None:
    ep = suite.ep
    if name is not None:  # the default name, as deployed
        ep = Endpoint.start(replace(suite.ep.config, driver_name=name,
                                    endpoint=f"unix://{suite.sock_dir}/info.sock"))
    try:
        info = ep.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest())
    finally:
        if ep is not suite.ep:
            ep.stop()
    assert 2 <= len(info.name) <= 63 and _PLUGIN_NAME.fullmatch(info.name), info.name
    assert info.vendor_version


# =========================================================================== Controller Service


def controller_caps(ep: Endpoint) -> set[int]:
    resp = ep.controller.ControllerGetCapabilities(csi_pb2.ControllerGetCapabilitiesRequest())
    return {c.rpc.type for c in resp.capabilities}


def test_controller_capabilities_are_all_kinds_released_csi_sanity_knows(suite: Suite) -> None:
    caps = controller_caps(suite.ep)
    assert caps and caps <= KNOWN_CONTROLLER_CAPABILITIES, caps - KNOWN_CONTROLLER_CAPABILITIES
    # What gates csi-sanity's checks: these run ...
    assert {CtlRPC.CREATE_DELETE_VOLUME, CtlRPC.LIST_VOLUMES, CtlRPC.GET_CAPACITY,
            CtlRPC.CREATE_DELETE_SNAPSHOT, CtlRPC.LIST_SNAPSHOTS, CtlRPC.CLONE_VOLUME,
            CtlRPC.EXPAND_VOLUME} <= caps
    # ... and these are skipped (the driver has no attach step and no mutable parameters).
    assert not caps & {CtlRPC.PUBLISH_UNPUBLISH_VOLUME, CtlRPC.PUBLISH_READONLY,
                       CtlRPC.MODIFY_VOLUME, CtlRPC.LIST_VOLUMES_PUBLISHED_NODES}


def test_get_snapshot_capability_is_advertised_only_when_configured(suite: Suite) -> None:
    assert CtlRPC.GET_SNAPSHOT not in controller_caps(suite.ep)
    ep = Endpoint.start(replace(suite.ep.config, advertise_get_snapshot=True,
                                endpoint=f"unix://{suite.sock_dir}/getsnap.sock"))
    try:
        assert CtlRPC.GET_SNAPSHOT in controller_caps(ep)
        # csi-test#573 (GetSnapshot checks): no id is INVALID_ARGUMENT, an unknown one NOT_FOUND.
        get = ep.controller.GetSnapshot
        assert code_of(lambda: get(csi_pb2.GetSnapshotRequest())) == Code.INVALID_ARGUMENT
        assert code_of(lambda: get(csi_pb2.GetSnapshotRequest(
            snapshot_id="reallyfakesnapshotid"))) == Code.NOT_FOUND
    finally:
        ep.stop()


# --------------------------------------------------------------------------- GetCapacity


def test_get_capacity_with_no_optional_values_succeeds(suite: Suite) -> None:
    resp = suite.ep.controller.GetCapacity(csi_pb2.GetCapacityRequest())
    vg = suite.lvm.get_vg(suite.vg)
    assert vg is not None and resp.available_capacity == vg.free


# --------------------------------------------------------------------------- ListVolumes


def list_volumes(r: Resources, **kw: Any) -> Any:
    return r.controller.ListVolumes(csi_pb2.ListVolumesRequest(**kw))


def test_list_volumes_entries_carry_a_volume_id(r: Resources) -> None:
    r.must_create_volume(create_volume_req(unique_string("sanity-list")))
    entries = list_volumes(r).entries
    assert len(entries) == 1
    for entry in entries:
        assert entry.volume.volume_id


def test_list_volumes_refuses_a_starting_token_it_did_not_issue_with_aborted(
        r: Resources) -> None:
    assert code_of(lambda: list_volumes(r, starting_token="invalid-token")) == Code.ABORTED


def test_list_volumes_shows_a_new_volume_and_not_a_deleted_one(r: Resources) -> None:
    before = len(list_volumes(r).entries)
    # csi-sanity's fixed name and no capacity range (the driver's default size).
    req = create_volume_req("sanity", required=None)
    vol = r.must_create_volume(req)
    assert vol.volume.capacity_bytes == TEST_VOLUME_SIZE
    assert len(list_volumes(r).entries) == before + 1
    r.delete_volume(vol.volume.volume_id)
    assert len(list_volumes(r).entries) == before


def test_list_volumes_pagination_survives_deletes_and_additions_between_pages(
        r: Resources) -> None:
    # csi-sanity keeps this check disabled (XIt) but it states the contract: after deleting
    # the whole first page and adding a volume, the next token still works and the next page
    # holds no deleted volume, no duplicate and at most (total - page + 1) entries.
    existing: dict[str, bool] = {e.volume.volume_id: True for e in list_volumes(r).entries}
    for i in range(len(existing), 3):
        vol = r.must_create_volume(create_volume_req(f"sanity{i}", required=None))
        existing[vol.volume.volume_id] = True
    total = len(existing)
    page = list_volumes(r, max_entries=2)
    assert len(page.entries) == 2 and page.next_token
    for entry in page.entries:
        assert existing[entry.volume.volume_id]
        r.delete_volume(entry.volume.volume_id)
        existing[entry.volume.volume_id] = False
    vol = r.must_create_volume(create_volume_req("new-addition", required=None))
    existing[vol.volume.volume_id] = True
    rest = list_volumes(r, starting_token=page.next_token)
    assert len(rest.entries) <= total - 2 + 1
    for entry in rest.entries:
        assert existing[entry.volume.volume_id], entry.volume.volume_id
        existing[entry.volume.volume_id] = False  # a second listing would be a duplicate


# --------------------------------------------------------------------------- CreateVolume


def test_create_volume_without_a_name_is_invalid_argument(r: Resources) -> None:
    req = csi_pb2.CreateVolumeRequest()
    assert code_of(lambda: r.create_volume(req)) == Code.INVALID_ARGUMENT


def test_create_volume_without_capabilities_is_invalid_argument(r: Resources) -> None:
    req = csi_pb2.CreateVolumeRequest(
        name=unique_string("sanity-controller-create-no-volume-capabilities"))
    assert code_of(lambda: r.create_volume(req)) == Code.INVALID_ARGUMENT


@pytest.mark.parametrize("access_type", ["mount", "block"])
def test_create_volume_single_node_writer_with_capacity_is_at_least_that_big(
        r: Resources, access_type: str) -> None:
    # csi-sanity's "NoCapacity" and "WithCapacity 1Gi" checks both send required_bytes only;
    # --csi.testvolumeaccesstype=block turns every capability into raw block.
    vol = r.must_create_volume(create_volume_req(
        unique_string("sanity-controller-create-single-with-capacity"),
        access_type=access_type)).volume
    assert vol.volume_id and vol.capacity_bytes >= TEST_VOLUME_SIZE


def test_create_volume_twice_with_the_same_name_and_capacity_returns_the_same_volume(
        r: Resources) -> None:
    name = unique_string("sanity-controller-create-twice")
    first = r.must_create_volume(create_volume_req(name)).volume
    second = r.must_create_volume(create_volume_req(name)).volume
    assert first.capacity_bytes >= TEST_VOLUME_SIZE and second.capacity_bytes >= TEST_VOLUME_SIZE
    assert first.volume_id == second.volume_id


def test_create_volume_with_an_existing_name_and_another_capacity_is_already_exists(
        r: Resources) -> None:
    name = unique_string("sanity-controller-create-twice-different")
    r.must_create_volume(create_volume_req(name, required=TEST_VOLUME_SIZE,
                                           limit=TEST_VOLUME_SIZE))
    twice = 2 * TEST_VOLUME_SIZE
    req = create_volume_req(name, required=twice, limit=twice)
    assert code_of(lambda: r.create_volume(req)) == Code.ALREADY_EXISTS


def test_an_existing_name_with_a_capacity_the_vg_could_never_hold_is_still_already_exists(
        suite: Suite, r: Resources) -> None:
    # csi-sanity's default test size (10 GiB) on a VG smaller than twice that: the second,
    # doubled request must be recognised as the existing name, not answered OUT_OF_RANGE.
    vg = suite.lvm.get_vg(suite.vg)
    assert vg is not None
    size = (vg.size // 2 + 4 * MiB) // (4 * MiB) * (4 * MiB)
    name = unique_string("sanity-controller-create-twice-different")
    r.must_create_volume(create_volume_req(name, required=size, limit=size))
    req = create_volume_req(name, required=2 * size, limit=2 * size)
    assert 2 * size > vg.size
    assert code_of(lambda: r.create_volume(req)) == Code.ALREADY_EXISTS
    # A new name of that size is RESOURCE_EXHAUSTED: no room on this node, another may have
    # it (csi-sanity needs --csi.testvolumesize below the VG size for its "WithCapacity" check).
    other = create_volume_req(unique_string("sanity-other"), required=2 * size)
    assert code_of(lambda: r.create_volume(other)) == Code.RESOURCE_EXHAUSTED


def test_create_volume_with_a_maximum_length_name_succeeds(r: Resources) -> None:
    name = unique_string_with_length("sanity-controller-create-maxlen", MAX_NAME_LENGTH)
    assert len(name) == MAX_NAME_LENGTH
    vol = r.must_create_volume(create_volume_req(name)).volume
    assert vol.capacity_bytes >= TEST_VOLUME_SIZE
    again = r.must_create_volume(create_volume_req(name)).volume
    assert again.volume_id == vol.volume_id


def test_create_volume_from_a_snapshot_that_does_not_exist_is_not_found(r: Resources) -> None:
    req = fixed_size_volume_req(unique_string("sanity-controller-vol-from-snap"))
    req.volume_content_source.snapshot.snapshot_id = "non-existing-snapshot-id"
    assert code_of(lambda: r.create_volume(req)) == Code.NOT_FOUND


def test_create_volume_from_a_volume_that_does_not_exist_is_not_found(
        suite: Suite, r: Resources) -> None:
    def from_volume(missing: str) -> Any:
        req = fixed_size_volume_req(unique_string("sanity-controller-vol-from-vol"))
        req.volume_content_source.volume.volume_id = missing
        return r.create_volume(req)

    assert code_of(lambda: from_volume(valid_looking_volume_id())) == Code.NOT_FOUND
    assert code_of(lambda: from_volume(f"{suite.vg}/sanity-missing")) == Code.NOT_FOUND


# --------------------------------------------------------------------------- DeleteVolume


def test_delete_volume_without_an_id_is_invalid_argument(r: Resources) -> None:
    assert code_of(lambda: r.delete_volume("")) == Code.INVALID_ARGUMENT


def test_delete_volume_of_an_invalid_id_succeeds(r: Resources) -> None:
    r.delete_volume(INVALID_VOLUME_ID)
    r.delete_volume(valid_looking_volume_id())


def test_delete_volume_of_a_created_volume_succeeds(suite: Suite, r: Resources) -> None:
    vol = r.must_create_volume(create_volume_req(
        unique_string("sanity-controller-create-appropriate"))).volume
    r.delete_volume(vol.volume_id)
    assert suite.our_lvs() == []


# --------------------------------------------------------------------------- Validate


def validate(r: Resources, volume_id: str, caps: list[Any]) -> Any:
    return r.controller.ValidateVolumeCapabilities(csi_pb2.ValidateVolumeCapabilitiesRequest(
        volume_id=volume_id, volume_capabilities=caps))


def test_validate_volume_capabilities_without_an_id_is_invalid_argument(r: Resources) -> None:
    assert code_of(lambda: validate(r, "", [])) == Code.INVALID_ARGUMENT


def test_validate_volume_capabilities_without_capabilities_is_invalid_argument(
        r: Resources) -> None:
    vol = r.must_create_volume(create_volume_req(
        unique_string("sanity-controller-validate-nocaps")))
    assert code_of(lambda: validate(r, vol.volume.volume_id, [])) == Code.INVALID_ARGUMENT


@pytest.mark.parametrize("access_type", ["mount", "block"])
def test_validate_volume_capabilities_confirms_the_capabilities_it_was_asked(
        r: Resources, access_type: str) -> None:
    vol = r.must_create_volume(create_volume_req(unique_string("sanity-controller-validate"),
                                                 access_type=access_type))
    resp = validate(r, vol.volume.volume_id, [volume_capability(access_type)])
    assert resp.HasField("confirmed"), resp.message
    assert list(resp.confirmed.volume_capabilities) == [volume_capability(access_type)]


def test_validate_volume_capabilities_of_a_volume_that_does_not_exist_is_not_found(
        r: Resources) -> None:
    assert code_of(lambda: validate(r, valid_looking_volume_id(), [volume_capability()])) == \
        Code.NOT_FOUND


# --------------------------------------------------------------------------- ListSnapshots


def list_snapshots(r: Resources, **kw: Any) -> Any:
    return r.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest(**kw))


def test_list_snapshots_with_no_optional_values_succeeds(r: Resources) -> None:
    for entry in list_snapshots(r).entries:
        check_snapshot_info(entry.snapshot)


def test_list_snapshots_of_a_snapshot_id_that_does_not_exist_is_empty(r: Resources) -> None:
    for missing in ("none-exist-id", "vg/none-exist-id"):
        resp = list_snapshots(r, snapshot_id=missing)
        assert list(resp.entries) == []


def test_list_snapshots_of_a_source_volume_that_does_not_exist_is_empty(r: Resources) -> None:
    assert list(list_snapshots(r, source_volume_id=valid_looking_volume_id()).entries) == []


# --------------------------------------------------------------------------- DeleteSnapshot


def test_delete_snapshot_without_an_id_is_invalid_argument(r: Resources) -> None:
    assert code_of(lambda: r.delete_snapshot("")) == Code.INVALID_ARGUMENT


def test_delete_snapshot_of_an_invalid_id_succeeds(suite: Suite, r: Resources) -> None:
    r.delete_snapshot("reallyfakesnapshotid")
    r.delete_snapshot(f"{suite.vg}/snap-reallyfake")


# --------------------------------------------------------------------------- CreateSnapshot


def test_create_snapshot_without_a_name_is_invalid_argument(r: Resources) -> None:
    req = csi_pb2.CreateSnapshotRequest(source_volume_id="testId")
    assert code_of(lambda: r.create_snapshot(req)) == Code.INVALID_ARGUMENT


def test_create_snapshot_without_a_source_volume_is_invalid_argument(r: Resources) -> None:
    req = csi_pb2.CreateSnapshotRequest(name="name")
    assert code_of(lambda: r.create_snapshot(req)) == Code.INVALID_ARGUMENT


def test_create_snapshot_of_a_volume_that_does_not_exist_is_not_found(r: Resources) -> None:
    # Not a csi-sanity check (the spec's NOT_FOUND for CreateSnapshot): an invented id, and
    # the id of a volume that existed and was deleted.
    req = create_snapshot_req(unique_string("CreateSnapshot-snapshot"), valid_looking_volume_id())
    assert code_of(lambda: r.create_snapshot(req)) == Code.NOT_FOUND
    vol = r.must_create_volume(create_volume_req(unique_string("CreateSnapshot-volume-gone")))
    r.delete_volume(vol.volume.volume_id)
    req = create_snapshot_req(unique_string("CreateSnapshot-snapshot"), vol.volume.volume_id)
    assert code_of(lambda: r.create_snapshot(req)) == Code.NOT_FOUND


# --------------------------------------------------------------------------- ControllerGetVolume


def test_controller_get_volume_answers_the_volume_and_its_condition(r: Resources) -> None:
    # Not in released csi-sanity (GET_VOLUME only gates nothing there); the spec's errors.
    get = r.controller.ControllerGetVolume
    assert code_of(lambda: get(csi_pb2.ControllerGetVolumeRequest())) == Code.INVALID_ARGUMENT
    assert code_of(lambda: get(csi_pb2.ControllerGetVolumeRequest(
        volume_id=valid_looking_volume_id()))) == Code.NOT_FOUND
    vol = r.must_create_volume(create_volume_req(unique_string("sanity-get-volume"))).volume
    resp = get(csi_pb2.ControllerGetVolumeRequest(volume_id=vol.volume_id))
    assert resp.volume.volume_id == vol.volume_id
    assert resp.volume.capacity_bytes == vol.capacity_bytes
    assert resp.status.HasField("volume_condition") and not resp.status.volume_condition.abnormal
    r.delete_volume(vol.volume_id)
    assert code_of(lambda: get(csi_pb2.ControllerGetVolumeRequest(
        volume_id=vol.volume_id))) == Code.NOT_FOUND


# --------------------------------------------------------------------------- ExpandVolume


def expand(r: Resources, volume_id: str, required: int | None = TEST_EXPAND_SIZE) -> Any:
    req = csi_pb2.ControllerExpandVolumeRequest(volume_id=volume_id,
                                                volume_capability=volume_capability())
    if required is not None:
        req.capacity_range.required_bytes = required
    return r.controller.ControllerExpandVolume(req)


def test_controller_expand_without_a_volume_id_is_invalid_argument(r: Resources) -> None:
    assert code_of(lambda: expand(r, "")) == Code.INVALID_ARGUMENT


def test_controller_expand_without_a_capacity_range_is_invalid_argument(r: Resources) -> None:
    req = csi_pb2.ControllerExpandVolumeRequest(volume_id="")
    assert code_of(lambda: r.controller.ControllerExpandVolume(req)) == Code.INVALID_ARGUMENT
    vol = r.must_create_volume(create_volume_req(unique_string("sanity-expand-volume")))
    req = csi_pb2.ControllerExpandVolumeRequest(volume_id=vol.volume.volume_id)
    assert code_of(lambda: r.controller.ControllerExpandVolume(req)) == Code.INVALID_ARGUMENT


def test_controller_expand_answers_exactly_the_requested_size(suite: Suite, r: Resources) -> None:
    vol = r.must_create_volume(create_volume_req(unique_string("sanity-expand-volume")))
    resp = expand(r, vol.volume.volume_id)
    assert resp.capacity_bytes == TEST_EXPAND_SIZE
    assert resp.node_expansion_required  # a filesystem volume: the node grows the filesystem
    vg, lv = vol.volume.volume_id.split("/")
    found = suite.lvm.get_lv(vg, lv)
    assert found is not None and found.size == TEST_EXPAND_SIZE


# =========================================================================== Node Service


def test_node_capabilities_are_all_kinds_csi_sanity_knows(suite: Suite) -> None:
    resp = suite.ep.node.NodeGetCapabilities(csi_pb2.NodeGetCapabilitiesRequest())
    caps = {c.rpc.type for c in resp.capabilities}
    assert caps <= KNOWN_NODE_CAPABILITIES, caps - KNOWN_NODE_CAPABILITIES
    # Gates: stats and expansion checks run; staging checks are skipped.
    assert {NodeRPC.GET_VOLUME_STATS, NodeRPC.EXPAND_VOLUME} <= caps
    assert NodeRPC.STAGE_UNSTAGE_VOLUME not in caps


def test_node_get_info_has_a_node_id_a_limit_and_the_topology(suite: Suite) -> None:
    info = suite.ep.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest())
    plugin = suite.ep.identity.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest())
    assert any(c.service.type == Service.VOLUME_ACCESSIBILITY_CONSTRAINTS
               for c in plugin.capabilities)
    assert info.node_id and info.max_volumes_per_node >= 0
    assert info.HasField("accessible_topology") and dict(info.accessible_topology.segments)


def publish(r: Resources, volume_id: str = "", target: str | None = None,
            cap: Any = None) -> Any:
    req = csi_pb2.NodePublishVolumeRequest(volume_id=volume_id, target_path=target or "")
    if cap is not None:
        req.volume_capability.CopyFrom(cap)
    return r.node.NodePublishVolume(req)


def test_node_publish_without_a_volume_id_is_invalid_argument(r: Resources) -> None:
    assert code_of(lambda: publish(r)) == Code.INVALID_ARGUMENT


def test_node_publish_without_a_target_path_is_invalid_argument(r: Resources) -> None:
    assert code_of(lambda: publish(r, valid_looking_volume_id())) == Code.INVALID_ARGUMENT


def test_node_publish_without_a_capability_is_invalid_argument(r: Resources) -> None:
    assert code_of(lambda: publish(r, valid_looking_volume_id(), r.target_path)) == \
        Code.INVALID_ARGUMENT
    assert not os.path.exists(r.target_path)


def unpublish(r: Resources, volume_id: str = "", target: str = "") -> Any:
    return r.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
        volume_id=volume_id, target_path=target))


def test_node_unpublish_without_a_volume_id_is_invalid_argument(r: Resources) -> None:
    assert code_of(lambda: unpublish(r)) == Code.INVALID_ARGUMENT


def test_node_unpublish_without_a_target_path_is_invalid_argument(r: Resources) -> None:
    assert code_of(lambda: unpublish(r, valid_looking_volume_id())) == Code.INVALID_ARGUMENT


def test_node_unpublish_of_a_never_published_volume_succeeds_and_leaves_no_target(
        r: Resources) -> None:
    # csi-sanity's cleanup unpublishes every volume it created at <mount dir>/target, published
    # or not; any error but NOT_FOUND fails the check, and the directory must end up empty.
    vol = r.must_create_volume(create_volume_req(unique_string("sanity-node-unpublish")))
    for _ in range(IDEMPOTENT_COUNT):
        unpublish(r, vol.volume.volume_id, r.target_path)
    unpublish(r, valid_looking_volume_id(), r.target_path)
    assert not os.path.exists(r.target_path)


def stats(r: Resources, volume_id: str = "", path: str = "") -> Any:
    return r.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
        volume_id=volume_id, volume_path=path))


def test_node_get_volume_stats_without_a_volume_id_is_invalid_argument(r: Resources) -> None:
    assert code_of(lambda: stats(r, "", "some/path")) == Code.INVALID_ARGUMENT


def test_node_get_volume_stats_without_a_volume_path_is_invalid_argument(r: Resources) -> None:
    assert code_of(lambda: stats(r, valid_looking_volume_id())) == Code.INVALID_ARGUMENT


def test_node_get_volume_stats_of_an_unknown_volume_is_not_found(r: Resources) -> None:
    assert code_of(lambda: stats(r, valid_looking_volume_id(), "some/path")) == Code.NOT_FOUND


def test_node_get_volume_stats_of_a_volume_not_at_that_path_is_not_found(r: Resources) -> None:
    # csi-sanity publishes the volume first (guest test); the answer must not depend on it.
    vol = r.must_create_volume(create_volume_req(unique_string("sanity-node-get-volume-stats")))
    assert code_of(lambda: stats(r, vol.volume.volume_id, "some/path")) == Code.NOT_FOUND


def node_expand(r: Resources, volume_id: str = "", path: str = "", *,
                with_capability: bool = True) -> Any:
    req = csi_pb2.NodeExpandVolumeRequest(volume_id=volume_id, volume_path=path)
    if with_capability:
        req.volume_capability.CopyFrom(volume_capability())
    return r.node.NodeExpandVolume(req)


def test_node_expand_without_a_volume_id_is_invalid_argument(
        r: Resources, mount_dir: MountDir) -> None:
    assert code_of(lambda: node_expand(r, "", str(mount_dir.path))) == Code.INVALID_ARGUMENT


def test_node_expand_without_a_volume_path_is_invalid_argument(r: Resources) -> None:
    vol = r.must_create_volume(create_volume_req(
        unique_string("sanity-node-expand-volume-valid-id")))
    assert code_of(lambda: node_expand(r, vol.volume.volume_id)) == Code.INVALID_ARGUMENT


def test_node_expand_of_an_unknown_volume_is_not_found(r: Resources) -> None:
    # csi-sanity sends neither a capability nor a capacity range here.
    assert code_of(lambda: node_expand(r, valid_looking_volume_id(), "some/path",
                                       with_capability=False)) == Code.NOT_FOUND


# =========================================================================== names across VGs


def test_a_volume_name_is_unique_across_the_drivers_volume_groups(
        suite: Suite, r: Resources) -> None:
    name = unique_string("sanity-global-name")
    first = r.must_create_volume(create_volume_req(name)).volume
    assert first.volume_id.startswith(f"{suite.vg}/")
    elsewhere = create_volume_req(name, parameters={"vgName": suite.other_vg})
    assert code_of(lambda: r.create_volume(elsewhere)) == Code.ALREADY_EXISTS
    # Also when the driver only knows it from LVM (a restart forgets what it created) ...
    suite.restart()
    r.controller, r.node = suite.ep.controller, suite.ep.node
    assert code_of(lambda: r.create_volume(elsewhere)) == Code.ALREADY_EXISTS
    assert [e.volume.volume_id for e in list_volumes(r).entries] == [first.volume_id]
    # ... and once the first is deleted, the name is free for the other VG.
    r.delete_volume(first.volume_id)
    moved = r.must_create_volume(elsewhere).volume
    assert moved.volume_id.startswith(f"{suite.other_vg}/")
    assert r.must_create_volume(elsewhere).volume.volume_id == moved.volume_id
    assert code_of(lambda: r.create_volume(create_volume_req(name))) == Code.ALREADY_EXISTS
