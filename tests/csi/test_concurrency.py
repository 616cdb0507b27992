"""In-flight rules: a second call for the same volume is ABORTED; parallel creates are safe."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import grpc

from csi_lvm.volume import read_tags
from edge_proto.csi.v1 import csi_pb2
from tests.csi.conftest import CsiRig, LvmGate, MiB, code_of, create_request


def test_a_second_create_of_the_same_name_in_flight_is_aborted_then_the_retry_succeeds(
        csi_factory: Callable[..., CsiRig], gate: LvmGate) -> None:
    csi = csi_factory(lvm_command=gate.command)
    gate.arm("lvcreate")
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(csi.controller.CreateVolume, create_request("pvc-1"))
        gate.wait_reached()
        assert code_of(lambda: csi.controller.CreateVolume(create_request("pvc-1"))) == \
            grpc.StatusCode.ABORTED
        volume_id = f"{csi.vg.name}/pvc-1"
        assert code_of(lambda: csi.controller.DeleteVolume(
            csi_pb2.DeleteVolumeRequest(volume_id=volume_id))) == grpc.StatusCode.ABORTED
        # another name is not held up by it
        assert csi.controller.CreateVolume(create_request("pvc-other")).volume.volume_id
        gate.release()
        vol = first.result(timeout=60).volume
    assert csi.controller.CreateVolume(create_request("pvc-1")).volume == vol
    assert sorted(lv.name for lv in csi.our_lvs()) == ["pvc-1", "pvc-other"]


def test_expand_of_a_volume_being_deleted_is_aborted(
        csi_factory: Callable[..., CsiRig], gate: LvmGate) -> None:
    csi = csi_factory(lvm_command=gate.command)
    vol = csi.controller.CreateVolume(create_request("pvc-2")).volume
    gate.arm("lvremove")
    with ThreadPoolExecutor(1) as pool:
        deleting = pool.submit(csi.controller.DeleteVolume,
                               csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id))
        gate.wait_reached()
        req = csi_pb2.ControllerExpandVolumeRequest(
            volume_id=vol.volume_id, capacity_range=csi_pb2.CapacityRange(required_bytes=MiB * 64))
        assert code_of(lambda: csi.controller.ControllerExpandVolume(req)) == \
            grpc.StatusCode.ABORTED
        gate.release()
        deleting.result(timeout=60)
    assert csi.our_lvs() == []


def test_parallel_creates_and_deletes_in_one_vg_all_succeed(
        csi_factory: Callable[..., CsiRig]) -> None:
    csi = csi_factory()
    names = [f"pvc-par-{i}" for i in range(24)]
    with ThreadPoolExecutor(12) as pool:
        vols = list(pool.map(lambda n: csi.controller.CreateVolume(
            create_request(n, required=4 * MiB)).volume, names))
    lvs = csi.our_lvs()
    assert sorted(lv.name for lv in lvs) == sorted(names)
    assert all(read_tags(lv.tags, csi.config.driver_name).name == lv.name for lv in lvs)
    assert len({v.volume_id for v in vols}) == len(names)
    with ThreadPoolExecutor(12) as pool:
        list(pool.map(lambda v: csi.controller.DeleteVolume(
            csi_pb2.DeleteVolumeRequest(volume_id=v.volume_id)), vols))
    assert csi.our_lvs() == []
