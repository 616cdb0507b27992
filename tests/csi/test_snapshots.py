"""Snapshot RPCs on this host: validation, lookups and error codes. Thin and thick snapshots
themselves need device-mapper: tests/kernel/test_csi_controller_kernel.py."""

from __future__ import annotations

from functools import partial

import grpc
import pytest

from edge_common.devmapper import has_device_mapper
from edge_proto.csi.v1 import csi_pb2
from tests.csi.conftest import CsiRig, code_of, create_request


def snap(csi: CsiRig, name: str, source: str, **params: str) -> csi_pb2.CreateSnapshotResponse:
    return csi.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(
        name=name, source_volume_id=source, parameters=params))


def test_create_snapshot_requires_a_name_and_a_source(csi: CsiRig) -> None:
    vol = csi.controller.CreateVolume(create_request("pvc-s")).volume
    assert code_of(lambda: snap(csi, "", vol.volume_id)) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: snap(csi, "snap-1", "")) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: snap(csi, "snap-1", vol.volume_id, unknown="1")) == \
        grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: snap(csi, "snap-1", vol.volume_id, snapshotSize="lots")) == \
        grpc.StatusCode.INVALID_ARGUMENT


def test_a_snapshot_of_a_volume_that_does_not_exist_is_not_found(csi: CsiRig) -> None:
    for source in (f"{csi.vg.name}/pvc-none", "garbage"):
        assert code_of(partial(snap, csi, "snap-1", source)) == grpc.StatusCode.NOT_FOUND


@pytest.mark.skipif(has_device_mapper(), reason="thick snapshots run in the kernel suite")
def test_a_thick_snapshot_without_device_mapper_is_failed_precondition(csi: CsiRig) -> None:
    vol = csi.controller.CreateVolume(create_request("pvc-s")).volume
    assert code_of(lambda: snap(csi, "snap-1", vol.volume_id)) == \
        grpc.StatusCode.FAILED_PRECONDITION
    assert [lv.name for lv in csi.our_lvs()] == ["pvc-s"]


def test_delete_snapshot_of_an_unknown_id_succeeds_and_an_empty_id_is_invalid(
        csi: CsiRig) -> None:
    for snapshot_id in (f"{csi.vg.name}/snap-none_0123456789abcdef", "garbage"):
        csi.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snapshot_id))
    assert code_of(lambda: csi.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest())) == \
        grpc.StatusCode.INVALID_ARGUMENT


def test_delete_snapshot_never_removes_a_volume(csi: CsiRig) -> None:
    vol = csi.controller.CreateVolume(create_request("pvc-s")).volume
    csi.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=vol.volume_id))
    assert [lv.name for lv in csi.our_lvs()] == ["pvc-s"]


def test_list_snapshots_filters_and_tokens(csi: CsiRig) -> None:
    ctl = csi.controller
    assert list(ctl.ListSnapshots(csi_pb2.ListSnapshotsRequest()).entries) == []
    assert list(ctl.ListSnapshots(csi_pb2.ListSnapshotsRequest(
        snapshot_id="garbage")).entries) == []
    assert list(ctl.ListSnapshots(csi_pb2.ListSnapshotsRequest(
        source_volume_id=f"{csi.vg.name}/none")).entries) == []
    assert code_of(lambda: ctl.ListSnapshots(csi_pb2.ListSnapshotsRequest(
        starting_token="nope"))) == grpc.StatusCode.ABORTED
    assert code_of(lambda: ctl.ListSnapshots(csi_pb2.ListSnapshotsRequest(
        max_entries=-1))) == grpc.StatusCode.INVALID_ARGUMENT


def test_get_snapshot_errors(csi: CsiRig) -> None:
    get = csi.controller.GetSnapshot
    assert code_of(lambda: get(csi_pb2.GetSnapshotRequest())) == \
        grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: get(csi_pb2.GetSnapshotRequest(snapshot_id="vg/none"))) == \
        grpc.StatusCode.NOT_FOUND


def test_a_volume_is_not_a_snapshot_source_for_restore(csi: CsiRig) -> None:
    vol = csi.controller.CreateVolume(create_request("pvc-s")).volume
    req = create_request("pvc-r")
    req.volume_content_source.snapshot.snapshot_id = vol.volume_id  # a volume id, not a snapshot
    assert code_of(lambda: csi.controller.CreateVolume(req)) == grpc.StatusCode.NOT_FOUND
