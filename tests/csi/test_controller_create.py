"""CreateVolume against real LVM on loop disks (CSI spec v1.12, "CreateVolume" and its errors)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import grpc
import pytest

from csi_lvm.volume import parse_id, read_tags
from edge_common.devmapper import has_device_mapper
from edge_proto.csi.v1 import csi_pb2
from tests.csi.conftest import (
    NODE,
    CsiRig,
    MiB,
    block_cap,
    code_of,
    create_request,
    mount_cap,
)
from tests.rigs.lvm import VgFactory

Mode = csi_pb2.VolumeCapability.AccessMode


def lv_of(csi: CsiRig, volume_id: str) -> Any:
    ref = parse_id(volume_id)
    lv = csi.lvm.get_lv(ref.vg, ref.lv)
    assert lv is not None
    return lv


def test_create_volume_makes_one_tagged_lv_and_answers_its_id_context_and_topology(
        csi: CsiRig) -> None:
    vol = csi.controller.CreateVolume(create_request("pvc-a", required=8 * MiB)).volume
    assert vol.volume_id == f"{csi.vg.name}/pvc-a"
    assert vol.capacity_bytes == 8 * MiB
    assert dict(vol.volume_context) == {"vgName": csi.vg.name, "lvName": "pvc-a",
                                        "lvmType": "linear", "fsType": "ext4"}
    assert [dict(t.segments) for t in vol.accessible_topology] == [
        {f"topology.{csi.config.driver_name}/node": NODE}]
    lv = lv_of(csi, vol.volume_id)
    assert lv.size == 8 * MiB
    own = read_tags(lv.tags, csi.config.driver_name)
    assert own.owned and own.kind == "volume" and own.name == "pvc-a" and not own.pending
    assert [x.name for x in csi.our_lvs()] == ["pvc-a"]


def test_required_bytes_are_rounded_up_to_the_extent_and_the_real_size_reported(
        csi: CsiRig) -> None:
    vol = csi.controller.CreateVolume(create_request("pvc-r", required=10 * MiB)).volume
    assert vol.capacity_bytes == 12 * MiB
    assert lv_of(csi, vol.volume_id).size == 12 * MiB


def test_a_limit_below_the_rounded_size_is_out_of_range_and_creates_nothing(
        csi: CsiRig) -> None:
    req = create_request("pvc-o", required=10 * MiB, limit=11 * MiB)
    assert code_of(lambda: csi.controller.CreateVolume(req)) == grpc.StatusCode.OUT_OF_RANGE
    assert csi.our_lvs() == []


def test_required_above_limit_is_invalid_argument(csi: CsiRig) -> None:
    req = create_request("pvc-i", required=16 * MiB, limit=8 * MiB)
    assert code_of(lambda: csi.controller.CreateVolume(req)) == grpc.StatusCode.INVALID_ARGUMENT


def test_without_a_capacity_range_the_configured_default_size_is_used(
        csi_factory: Callable[..., CsiRig]) -> None:
    csi = csi_factory(default_volume_size=20 * MiB)
    req = csi_pb2.CreateVolumeRequest(name="pvc-d", volume_capabilities=[mount_cap()])
    assert csi.controller.CreateVolume(req).volume.capacity_bytes == 20 * MiB
    only_limit = create_request("pvc-l", required=0, limit=10 * MiB)
    assert csi.controller.CreateVolume(only_limit).volume.capacity_bytes == 8 * MiB


def test_above_the_largest_volume_the_vg_can_hold_is_resource_exhausted_so_another_node_is_tried(
        csi: CsiRig) -> None:
    # OUT_OF_RANGE is final for csi-provisioner: a WaitForFirstConsumer claim would stay stuck
    # on this node; RESOURCE_EXHAUSTED makes it reschedule.
    vg = csi.lvm.get_vg(csi.vg.name)
    assert vg is not None
    req = create_request("pvc-huge", required=vg.size + 4 * MiB)
    assert code_of(lambda: csi.controller.CreateVolume(req)) == \
        grpc.StatusCode.RESOURCE_EXHAUSTED
    assert csi.our_lvs() == []


def test_more_than_the_free_space_is_resource_exhausted(csi: CsiRig) -> None:
    vg = csi.lvm.get_vg(csi.vg.name)
    assert vg is not None
    csi.controller.CreateVolume(create_request("pvc-big", required=vg.free - 8 * MiB))
    req = create_request("pvc-more", required=16 * MiB)
    assert code_of(lambda: csi.controller.CreateVolume(req)) == \
        grpc.StatusCode.RESOURCE_EXHAUSTED
    assert [lv.name for lv in csi.our_lvs()] == ["pvc-big"]


def test_a_retry_after_the_volume_filled_the_vg_returns_it(csi: CsiRig) -> None:
    vg = csi.lvm.get_vg(csi.vg.name)
    assert vg is not None
    req = create_request("pvc-all", required=vg.free)
    first = csi.controller.CreateVolume(req).volume
    assert csi.controller.CreateVolume(req).volume == first


def test_the_same_name_and_a_compatible_range_returns_the_same_volume(csi: CsiRig) -> None:
    first = csi.controller.CreateVolume(create_request("pvc-same", required=10 * MiB)).volume
    again = csi.controller.CreateVolume(create_request("pvc-same", required=9 * MiB,
                                                       limit=12 * MiB)).volume
    assert again == first
    assert len(csi.our_lvs()) == 1


@pytest.mark.parametrize("change", [
    {"required": 20 * MiB},
    {"required": 4 * MiB, "limit": 8 * MiB},
    {"mkfsOptions": "-m 0"},
    {"caps": [mount_cap("xfs")]},
])
def test_the_same_name_with_an_incompatible_request_is_already_exists(
        csi: CsiRig, change: dict[str, Any]) -> None:
    csi.controller.CreateVolume(create_request("pvc-x", required=12 * MiB))
    args: dict[str, Any] = {"required": 12 * MiB}
    args.update(change)
    req = create_request("pvc-x", **args)
    assert code_of(lambda: csi.controller.CreateVolume(req)) == grpc.StatusCode.ALREADY_EXISTS
    assert len(csi.our_lvs()) == 1


@pytest.mark.parametrize("name", ["x" * 128, "ü" * 64, "snapshot-like", "Spaces and/slashes",
                                  "_tmeta", "pvc.with+plus"])
def test_any_name_csi_allows_gets_a_valid_lv_and_stays_idempotent(csi: CsiRig,
                                                                   name: str) -> None:
    first = csi.controller.CreateVolume(create_request(name)).volume
    assert csi.controller.CreateVolume(create_request(name)).volume.volume_id == first.volume_id
    [lv] = csi.our_lvs()
    assert read_tags(lv.tags, csi.config.driver_name).name == name


def test_a_name_longer_than_128_bytes_is_invalid_argument(csi: CsiRig) -> None:
    req = create_request("ü" * 65)
    assert code_of(lambda: csi.controller.CreateVolume(req)) == grpc.StatusCode.INVALID_ARGUMENT


def test_an_lv_of_someone_else_with_the_derived_name_is_already_exists_and_untouched(
        csi: CsiRig) -> None:
    csi.lvm.lvcreate(csi.vg.name, "pvc-foreign", 4 * MiB, tags=["someone=else"])
    req = create_request("pvc-foreign", required=4 * MiB)
    assert code_of(lambda: csi.controller.CreateVolume(req)) == grpc.StatusCode.ALREADY_EXISTS
    lv = csi.lvm.get_lv(csi.vg.name, "pvc-foreign")
    assert lv is not None and lv.tags == ("someone=else",)


def test_striped_volumes_use_every_pv_by_default_and_round_to_whole_stripes(
        csi: CsiRig) -> None:
    vol = csi.controller.CreateVolume(create_request(
        "pvc-s", required=10 * MiB, lvmType="striped", stripeSize="64Ki")).volume
    assert vol.capacity_bytes == 16 * MiB  # 2 stripes x 2 extents of 4 MiB
    lv = lv_of(csi, vol.volume_id)
    assert lv.stripes == 2 and lv.segtype == "striped" and lv.size == 16 * MiB
    assert vol.volume_context["lvmType"] == "striped"


def test_more_stripes_than_pvs_is_resource_exhausted(csi: CsiRig) -> None:
    req = create_request("pvc-s3", lvmType="striped", stripes="3")
    assert code_of(lambda: csi.controller.CreateVolume(req)) == \
        grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_thin_volume_in_a_pool_that_does_not_exist_is_resource_exhausted(csi: CsiRig) -> None:
    req = create_request("pvc-t", lvmType="thin", thinPool="nopool")
    assert code_of(lambda: csi.controller.CreateVolume(req)) == \
        grpc.StatusCode.RESOURCE_EXHAUSTED


def test_an_allowed_volume_group_missing_on_this_node_is_resource_exhausted(
        csi_factory: Callable[..., CsiRig]) -> None:
    absent = "absent-vg-of-this-test"
    csi = csi_factory(allowed_vgs=[absent])
    req = create_request("pvc-v", vgName=absent)
    assert code_of(lambda: csi.controller.CreateVolume(req)) == \
        grpc.StatusCode.RESOURCE_EXHAUSTED


def test_without_an_allow_list_only_the_default_vg_is_usable_and_the_error_names_the_option(
        csi: CsiRig, vg_factory: VgFactory) -> None:
    other_vg = vg_factory().name
    req = create_request("pvc-os", vgName=other_vg)  # exists on this host, like the OS's VG
    with pytest.raises(grpc.RpcError) as info:
        csi.controller.CreateVolume(req)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "allowed_vgs" in (info.value.details() or "")
    assert csi.lvm.lvs(other_vg) == []
    cap = csi.controller.GetCapacity(csi_pb2.GetCapacityRequest(parameters={"vgName": other_vg}))
    assert cap.available_capacity == 0


def test_a_volume_group_outside_allowed_vgs_is_invalid_argument(
        csi_factory: Callable[..., CsiRig]) -> None:
    csi = csi_factory(allowed_vgs=["only-this-one"])
    req = create_request("pvc-n", vgName="some-other-vg")  # RESOURCE_EXHAUSTED were it allowed
    assert code_of(lambda: csi.controller.CreateVolume(req)) == grpc.StatusCode.INVALID_ARGUMENT
    assert csi.controller.CreateVolume(create_request("pvc-n")).volume.volume_id


def test_parameters_and_capability_shape_the_volume_context(csi: CsiRig) -> None:
    req = create_request("pvc-c", caps=[mount_cap("xfs", flags=("noatime",))],
                         mkfsOptions="-m crc=1", mountOptions="nodiscard",
                         wipeOnDelete="zero")
    req.parameters["csi.storage.k8s.io/pvc/name"] = "data"
    ctx = dict(csi.controller.CreateVolume(req).volume.volume_context)
    assert ctx["fsType"] == "xfs"
    assert ctx["mkfsOptions"] == "-m crc=1"
    assert ctx["mountOptions"] == "nodiscard"
    assert ctx["wipeOnDelete"] == "zero"


def test_raw_block_volumes_have_no_filesystem_type_and_end_up_not_pending(csi: CsiRig) -> None:
    vol = csi.controller.CreateVolume(create_request("pvc-b", caps=[block_cap()])).volume
    assert "fsType" not in vol.volume_context
    own = read_tags(lv_of(csi, vol.volume_id).tags, csi.config.driver_name)
    assert own.owned and not own.pending


@pytest.mark.parametrize("mode", [Mode.SINGLE_NODE_WRITER, Mode.SINGLE_NODE_READER_ONLY,
                                  Mode.SINGLE_NODE_SINGLE_WRITER, Mode.SINGLE_NODE_MULTI_WRITER])
def test_every_single_node_access_mode_is_accepted(csi: CsiRig, mode: int) -> None:
    csi.controller.CreateVolume(create_request("pvc-m", caps=[mount_cap(mode=mode)]))


@pytest.mark.parametrize("mode", [Mode.MULTI_NODE_READER_ONLY, Mode.MULTI_NODE_SINGLE_WRITER,
                                  Mode.MULTI_NODE_MULTI_WRITER, Mode.UNKNOWN])
def test_multi_node_access_modes_are_invalid_argument(csi: CsiRig, mode: int) -> None:
    req = create_request("pvc-mm", caps=[mount_cap(mode=mode)])
    assert code_of(lambda: csi.controller.CreateVolume(req)) == grpc.StatusCode.INVALID_ARGUMENT
    assert csi.our_lvs() == []


def test_requisite_topology_of_another_node_is_resource_exhausted(csi: CsiRig) -> None:
    key = f"topology.{csi.config.driver_name}/node"
    req = create_request("pvc-topo")
    req.accessibility_requirements.requisite.add(segments={key: "node-b"})
    assert code_of(lambda: csi.controller.CreateVolume(req)) == \
        grpc.StatusCode.RESOURCE_EXHAUSTED
    req.accessibility_requirements.requisite.add(segments={key: NODE})
    req.accessibility_requirements.preferred.add(segments={key: NODE})
    assert csi.controller.CreateVolume(req).volume.volume_id


def test_preferred_topology_alone_places_the_volume_here(csi: CsiRig) -> None:
    req = create_request("pvc-pref")
    req.accessibility_requirements.preferred.add(segments={"other/key": "x"})
    assert csi.controller.CreateVolume(req).volume.volume_id


def test_a_content_source_that_does_not_exist_is_not_found(csi: CsiRig) -> None:
    for source in (csi_pb2.VolumeContentSource(
                       snapshot=csi_pb2.VolumeContentSource.SnapshotSource(
                           snapshot_id=f"{csi.vg.name}/snap-none_0123456789abcdef")),
                   csi_pb2.VolumeContentSource(
                       volume=csi_pb2.VolumeContentSource.VolumeSource(volume_id="garbage"))):
        req = create_request("pvc-src")
        req.volume_content_source.CopyFrom(source)
        assert code_of(partial(csi.controller.CreateVolume, req)) == grpc.StatusCode.NOT_FOUND
    assert csi.our_lvs() == []


@pytest.mark.skipif(has_device_mapper(), reason="the copy itself runs in the kernel suite")
def test_cloning_a_thick_volume_without_device_mapper_is_failed_precondition(
        csi: CsiRig) -> None:
    src = csi.controller.CreateVolume(create_request("pvc-src")).volume
    req = create_request("pvc-clone")
    req.volume_content_source.volume.volume_id = src.volume_id
    assert code_of(lambda: csi.controller.CreateVolume(req)) == \
        grpc.StatusCode.FAILED_PRECONDITION
    assert [lv.name for lv in csi.our_lvs()] == ["pvc-src"]


def _invalid_create_requests() -> list[Any]:
    no_access_type = csi_pb2.VolumeCapability(
        access_mode=csi_pb2.VolumeCapability.AccessMode(mode=Mode.SINGLE_NODE_WRITER))
    no_mode = csi_pb2.VolumeCapability(mount=csi_pb2.VolumeCapability.MountVolume())
    empty_source = create_request("v")
    empty_source.volume_content_source.snapshot.snapshot_id = ""
    return [
        create_request(""),
        create_request("v", caps=[]),
        create_request("v", caps=[no_access_type]),
        create_request("v", caps=[no_mode]),
        create_request("v", caps=[mount_cap("ntfs")]),
        create_request("v", required=-1),
        create_request("v", bogus="1"),
        create_request("v", vgName="in valid"),
        empty_source,
    ]


@pytest.mark.parametrize("index", range(len(_invalid_create_requests())))
def test_invalid_requests_are_refused_before_lvm_is_asked(
        csi_factory: Callable[..., CsiRig], index: int) -> None:
    """The driver's lvm command does not exist: any lookup would answer UNAVAILABLE."""
    csi = csi_factory(lvm_command=["/nonexistent/lvm"])
    req = _invalid_create_requests()[index]
    assert code_of(lambda: csi.controller.CreateVolume(req)) == grpc.StatusCode.INVALID_ARGUMENT


def test_an_lvm_that_cannot_run_is_unavailable(csi_factory: Callable[..., CsiRig]) -> None:
    csi = csi_factory(lvm_command=["/nonexistent/lvm"])
    assert code_of(lambda: csi.controller.CreateVolume(create_request("v"))) == \
        grpc.StatusCode.UNAVAILABLE
