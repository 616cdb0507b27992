"""ListVolumes, ControllerGetVolume, ValidateVolumeCapabilities, ControllerGetCapabilities and
the RPCs this driver does not offer."""

from __future__ import annotations

from functools import partial

import grpc
import pytest

from edge_proto.csi.v1 import csi_pb2
from tests.csi.conftest import CsiRig, MiB, block_cap, code_of, create_request, mount_cap

RPC = csi_pb2.ControllerServiceCapability.RPC
Mode = csi_pb2.VolumeCapability.AccessMode


def list_all(csi: CsiRig, page: int) -> list[str]:
    ids: list[str] = []
    token = ""
    for _ in range(50):
        resp = csi.controller.ListVolumes(csi_pb2.ListVolumesRequest(max_entries=page,
                                                                     starting_token=token))
        assert not page or len(resp.entries) <= page
        ids += [e.volume.volume_id for e in resp.entries]
        token = resp.next_token
        if not token:
            return ids
    raise AssertionError("paging never ended")


def test_list_volumes_pages_through_every_volume_exactly_once(csi: CsiRig) -> None:
    made = sorted(csi.controller.CreateVolume(create_request(f"pvc-{i}", required=4 * MiB))
                  .volume.volume_id for i in range(5))
    assert sorted(list_all(csi, 2)) == made
    assert sorted(list_all(csi, 0)) == made
    entry = csi.controller.ListVolumes(csi_pb2.ListVolumesRequest()).entries[0]
    assert entry.volume.capacity_bytes == 4 * MiB
    assert entry.volume.volume_context["lvmType"] == "linear"
    assert not entry.status.volume_condition.abnormal


def test_list_volumes_shows_only_this_drivers_volumes(csi: CsiRig) -> None:
    csi.lvm.lvcreate(csi.vg.name, "foreign", 4 * MiB, tags=["csi-lvm.edge.io/owner=other"])
    csi.controller.CreateVolume(create_request("pvc-mine", required=4 * MiB))
    ids = [e.volume.volume_id for e in
           csi.controller.ListVolumes(csi_pb2.ListVolumesRequest()).entries]
    assert ids == [f"{csi.vg.name}/pvc-mine"]


def test_a_token_stays_valid_when_the_last_listed_volume_is_deleted(csi: CsiRig) -> None:
    for i in range(4):
        csi.controller.CreateVolume(create_request(f"pvc-{i}", required=4 * MiB))
    first = csi.controller.ListVolumes(csi_pb2.ListVolumesRequest(max_entries=2))
    csi.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(
        volume_id=first.entries[-1].volume.volume_id))
    rest = csi.controller.ListVolumes(csi_pb2.ListVolumesRequest(
        starting_token=first.next_token))
    assert [e.volume.volume_id.rsplit("/", 1)[1] for e in rest.entries] == ["pvc-2", "pvc-3"]


@pytest.mark.parametrize("token", ["invalid-token", "djEKeA==x", "AAAA"])
def test_a_token_this_driver_never_issued_is_aborted(csi: CsiRig, token: str) -> None:
    req = csi_pb2.ListVolumesRequest(starting_token=token)
    assert code_of(lambda: csi.controller.ListVolumes(req)) == grpc.StatusCode.ABORTED


def test_negative_max_entries_is_invalid_argument(csi: CsiRig) -> None:
    req = csi_pb2.ListVolumesRequest(max_entries=-1)
    assert code_of(lambda: csi.controller.ListVolumes(req)) == grpc.StatusCode.INVALID_ARGUMENT


def test_controller_get_volume_reports_the_volume_and_a_healthy_condition(csi: CsiRig) -> None:
    vol = csi.controller.CreateVolume(create_request("pvc-g", required=4 * MiB)).volume
    resp = csi.controller.ControllerGetVolume(
        csi_pb2.ControllerGetVolumeRequest(volume_id=vol.volume_id))
    assert resp.volume.volume_id == vol.volume_id
    assert resp.volume.capacity_bytes == 4 * MiB
    assert dict(resp.volume.volume_context) == dict(vol.volume_context)
    assert resp.status.volume_condition.abnormal is False
    assert resp.status.volume_condition.message


def test_controller_get_volume_errors(csi: CsiRig) -> None:
    get = csi.controller.ControllerGetVolume
    assert code_of(lambda: get(csi_pb2.ControllerGetVolumeRequest())) == \
        grpc.StatusCode.INVALID_ARGUMENT
    for volume_id in (f"{csi.vg.name}/pvc-none", "garbage"):
        req = csi_pb2.ControllerGetVolumeRequest(volume_id=volume_id)
        assert code_of(partial(get, req)) == grpc.StatusCode.NOT_FOUND


def validate(csi: CsiRig, volume_id: str, *caps: csi_pb2.VolumeCapability,
             **ctx: str) -> csi_pb2.ValidateVolumeCapabilitiesResponse:
    return csi.controller.ValidateVolumeCapabilities(csi_pb2.ValidateVolumeCapabilitiesRequest(
        volume_id=volume_id, volume_capabilities=list(caps), volume_context=ctx))


def test_validate_confirms_supported_capabilities(csi: CsiRig) -> None:
    vol = csi.controller.CreateVolume(create_request("pvc-v", required=4 * MiB)).volume
    resp = validate(csi, vol.volume_id, mount_cap("ext4"), block_cap(),
                    mount_cap(mode=Mode.SINGLE_NODE_SINGLE_WRITER), **dict(vol.volume_context))
    assert resp.HasField("confirmed")
    assert len(resp.confirmed.volume_capabilities) == 3


@pytest.mark.parametrize("cap", [mount_cap(mode=Mode.MULTI_NODE_MULTI_WRITER),
                                 mount_cap(mode=Mode.MULTI_NODE_READER_ONLY),
                                 mount_cap("xfs")])
def test_validate_does_not_confirm_unsupported_capabilities(
        csi: CsiRig, cap: csi_pb2.VolumeCapability) -> None:
    vol = csi.controller.CreateVolume(create_request("pvc-v", required=4 * MiB)).volume
    resp = validate(csi, vol.volume_id, cap)
    assert not resp.HasField("confirmed")
    assert resp.message


def test_validate_errors(csi: CsiRig) -> None:
    vol = csi.controller.CreateVolume(create_request("pvc-v", required=4 * MiB)).volume
    assert code_of(lambda: validate(csi, "", mount_cap())) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: validate(csi, vol.volume_id)) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: validate(csi, f"{csi.vg.name}/none", mount_cap())) == \
        grpc.StatusCode.NOT_FOUND


def test_controller_capabilities_list_what_the_driver_does(csi: CsiRig) -> None:
    caps = csi.controller.ControllerGetCapabilities(csi_pb2.ControllerGetCapabilitiesRequest())
    types = {c.rpc.type for c in caps.capabilities}
    assert types == {RPC.CREATE_DELETE_VOLUME, RPC.LIST_VOLUMES, RPC.GET_CAPACITY,
                     RPC.CREATE_DELETE_SNAPSHOT, RPC.LIST_SNAPSHOTS,
                     RPC.CLONE_VOLUME, RPC.EXPAND_VOLUME, RPC.GET_VOLUME, RPC.VOLUME_CONDITION,
                     RPC.SINGLE_NODE_MULTI_WRITER}


def test_rpcs_not_offered_are_unimplemented(csi: CsiRig) -> None:
    ctl = csi.controller
    for call in (lambda: ctl.ControllerPublishVolume(csi_pb2.ControllerPublishVolumeRequest(
                     volume_id="vg/x", node_id="n")),
                 lambda: ctl.ControllerUnpublishVolume(
                     csi_pb2.ControllerUnpublishVolumeRequest(volume_id="vg/x")),
                 lambda: ctl.ControllerModifyVolume(csi_pb2.ControllerModifyVolumeRequest(
                     volume_id="vg/x", mutable_parameters={"a": "b"}))):
        assert code_of(call) == grpc.StatusCode.UNIMPLEMENTED
