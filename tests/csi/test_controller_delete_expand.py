"""DeleteVolume and ControllerExpandVolume (CSI spec v1.12) on real LVM."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from csi_lvm.config import Mode
from edge_proto.csi.v1 import csi_pb2
from tests.csi.conftest import CsiRig, MiB, block_cap, code_of, create_request, mount_cap
from tests.rigs.fake_kube import FakeKubeServer


def expand(csi: CsiRig, volume_id: str, required: int, limit: int = 0,
           cap: csi_pb2.VolumeCapability | None = None) -> csi_pb2.ControllerExpandVolumeResponse:
    req = csi_pb2.ControllerExpandVolumeRequest(
        volume_id=volume_id,
        capacity_range=csi_pb2.CapacityRange(required_bytes=required, limit_bytes=limit))
    if cap is not None:
        req.volume_capability.CopyFrom(cap)
    return csi.controller.ControllerExpandVolume(req)


def test_delete_volume_removes_the_lv_and_a_second_delete_succeeds(csi: CsiRig) -> None:
    vol = csi.controller.CreateVolume(create_request("pvc-del")).volume
    csi.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id))
    assert csi.our_lvs() == []
    csi.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id))


def test_delete_of_an_unknown_or_malformed_id_succeeds(csi: CsiRig) -> None:
    for volume_id in (f"{csi.vg.name}/pvc-never", "reallyfakevolumeid", "novg/x"):
        csi.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume_id))


def test_delete_without_an_id_is_invalid_argument(csi: CsiRig) -> None:
    assert code_of(lambda: csi.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest())) == \
        grpc.StatusCode.INVALID_ARGUMENT


def test_delete_never_removes_an_lv_without_our_ownership_tag(
        csi_factory: Callable[..., CsiRig]) -> None:
    csi = csi_factory()
    csi.lvm.lvcreate(csi.vg.name, "foreign", 4 * MiB)
    csi.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=f"{csi.vg.name}/foreign"))
    assert csi.lvm.get_lv(csi.vg.name, "foreign") is not None
    # nor one of another driver instance (another ownership tag) in the same VG
    other = csi_factory()
    theirs = other.controller.CreateVolume(create_request("pvc-theirs")).volume
    csi.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=theirs.volume_id))
    assert csi.lvm.get_lv(csi.vg.name, "pvc-theirs") is not None
    other.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=theirs.volume_id))
    assert csi.lvm.get_lv(csi.vg.name, "pvc-theirs") is None


def test_expand_grows_the_lv_rounded_to_extents_and_asks_for_node_expansion(
        csi: CsiRig) -> None:
    vol = csi.controller.CreateVolume(create_request("pvc-e", required=8 * MiB)).volume
    resp = expand(csi, vol.volume_id, 18 * MiB, cap=mount_cap())
    assert resp.capacity_bytes == 20 * MiB
    assert resp.node_expansion_required
    lv = csi.lvm.get_lv(csi.vg.name, "pvc-e")
    assert lv is not None and lv.size == 20 * MiB


def test_expand_to_a_size_the_volume_already_has_is_a_no_op(csi: CsiRig) -> None:
    vol = csi.controller.CreateVolume(create_request("pvc-e2", required=12 * MiB)).volume
    assert expand(csi, vol.volume_id, 8 * MiB).capacity_bytes == 12 * MiB
    assert expand(csi, vol.volume_id, 12 * MiB).capacity_bytes == 12 * MiB


def test_expanding_a_raw_block_volume_needs_no_node_step(csi: CsiRig) -> None:
    vol = csi.controller.CreateVolume(create_request("pvc-eb", caps=[block_cap()])).volume
    assert not expand(csi, vol.volume_id, 16 * MiB, cap=block_cap()).node_expansion_required
    # without a capability in the request, the volume's own type decides
    assert not expand(csi, vol.volume_id, 20 * MiB).node_expansion_required


def test_expand_errors_follow_the_spec(csi: CsiRig) -> None:
    vol = csi.controller.CreateVolume(create_request("pvc-ee", required=8 * MiB)).volume
    ctl = csi.controller
    assert code_of(lambda: ctl.ControllerExpandVolume(csi_pb2.ControllerExpandVolumeRequest(
        capacity_range=csi_pb2.CapacityRange(required_bytes=MiB)))) == \
        grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: ctl.ControllerExpandVolume(csi_pb2.ControllerExpandVolumeRequest(
        volume_id=vol.volume_id))) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: expand(csi, f"{csi.vg.name}/pvc-nope", 16 * MiB)) == \
        grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: expand(csi, "garbage", 16 * MiB)) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: expand(csi, vol.volume_id, 18 * MiB, limit=19 * MiB)) == \
        grpc.StatusCode.OUT_OF_RANGE
    vg = csi.lvm.get_vg(csi.vg.name)
    assert vg is not None
    assert code_of(lambda: expand(csi, vol.volume_id, vg.size + 64 * MiB)) == \
        grpc.StatusCode.RESOURCE_EXHAUSTED  # more than the VG could ever hold: not final
    lv = csi.lvm.get_lv(csi.vg.name, "pvc-ee")
    assert lv is not None and lv.size == 8 * MiB


def test_expand_beyond_free_space_is_resource_exhausted(csi: CsiRig) -> None:
    vol = csi.controller.CreateVolume(create_request("pvc-ef", required=8 * MiB)).volume
    vg = csi.lvm.get_vg(csi.vg.name)
    assert vg is not None
    csi.controller.CreateVolume(create_request("pvc-filler", required=vg.free - 4 * MiB))
    assert code_of(lambda: expand(csi, vol.volume_id, 32 * MiB)) == \
        grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_controller_only_instance_answers_expansion_without_lvm(
        csi_factory: Callable[..., CsiRig]) -> None:
    csi = csi_factory(mode=Mode.CONTROLLER, node_id="", lvm_command=["/nonexistent/lvm"])
    resp = expand(csi, "anyvg/pvc-x", 100 * MiB)
    assert resp.capacity_bytes == 100 * MiB and resp.node_expansion_required
    caps = csi.controller.ControllerGetCapabilities(csi_pb2.ControllerGetCapabilitiesRequest())
    assert [c.rpc.type for c in caps.capabilities] == [
        csi_pb2.ControllerServiceCapability.RPC.EXPAND_VOLUME]
    assert code_of(lambda: csi.controller.CreateVolume(create_request("v"))) == \
        grpc.StatusCode.UNIMPLEMENTED


def _pv(name: str, driver: str, handle: str, node: str, size: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": name},
        "spec": {
            "capacity": {"storage": size}, "accessModes": ["ReadWriteOnce"],
            "storageClassName": "csi-local-lvm",
            "csi": {"driver": driver, "volumeHandle": handle},
            "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                {"key": f"topology.{driver}/node", "operator": "In", "values": [node]}]}]}},
        },
    }


def _published(name: str, driver: str, node: str, maximum: str) -> dict[str, Any]:
    return {
        "apiVersion": "storage.k8s.io/v1", "kind": "CSIStorageCapacity",
        "metadata": {"name": name, "namespace": "kube-system"},
        "storageClassName": "csi-local-lvm", "capacity": maximum, "maximumVolumeSize": maximum,
        "nodeTopology": {"matchLabels": {f"topology.{driver}/node": node}},
    }


def test_a_controller_only_instance_refuses_growth_beyond_what_the_node_publishes(
        csi_factory: Callable[..., CsiRig], fake_kube: FakeKubeServer, tmp_path: Path) -> None:
    kubeconfig = fake_kube.write_kubeconfig(tmp_path / "kubeconfig")
    csi = csi_factory(mode=Mode.CONTROLLER, node_id="", lvm_command=["/nonexistent/lvm"],
                      kubeconfig=str(kubeconfig))
    driver = csi.config.driver_name
    fake_kube.create("persistentvolumes", _pv("pv-a", driver, "vg1/pvc-a", "node-a", "1Gi"))
    fake_kube.create("persistentvolumes", _pv("pv-b", driver, "vg1/pvc-b", "node-b", "1Gi"))
    fake_kube.create("csistoragecapacities.storage.k8s.io",
                     _published("cap-a", driver, "node-a", "512Mi"), namespace="kube-system")
    # Within what node-a publishes (1 GiB + 512 MiB): accepted, the node grows it.
    ok = expand(csi, "vg1/pvc-a", 1536 * MiB)
    assert ok.capacity_bytes == 1536 * MiB and ok.node_expansion_required
    # Beyond it: RESOURCE_EXHAUSTED, naming the node and what it publishes.
    with pytest.raises(grpc.RpcError) as info:
        expand(csi, "vg1/pvc-a", 2048 * MiB)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "node-a" in (info.value.details() or "")
    # node-b publishes nothing (yet): the node decides.
    assert expand(csi, "vg1/pvc-b", 8192 * MiB).capacity_bytes == 8192 * MiB
    # No PV with that handle: NOT_FOUND.
    assert code_of(lambda: expand(csi, "vg1/pvc-nope", 2048 * MiB)) == grpc.StatusCode.NOT_FOUND


def _counting_lvm(tmp_path: Path) -> tuple[list[str], Path]:
    log = tmp_path / "lvm-calls"
    wrapper = tmp_path / "lvm"
    wrapper.write_text(f'#!/bin/sh\necho "$1" >> {log}\nexec lvm "$@"\n')
    wrapper.chmod(0o755)
    return [str(wrapper)], log


def _calls(log: Path) -> list[str]:
    return [c for c in log.read_text().split() if c != "fullreport"] if log.exists() else []


def test_delete_of_a_plain_volume_is_one_lvremove_and_others_take_the_full_path(
        csi_factory: Callable[..., CsiRig], tmp_path: Path) -> None:
    command, log = _counting_lvm(tmp_path)
    csi = csi_factory(lvm_command=command)
    plain = csi.controller.CreateVolume(create_request("pvc-plain")).volume
    wiped = csi.controller.CreateVolume(create_request("pvc-wiped", wipeOnDelete="zero")).volume
    log.unlink()
    csi.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=plain.volume_id))
    assert _calls(log) == ["lvremove"]  # no lookup: the ownership condition rides along
    assert csi.lvm.get_lv(csi.vg.name, "pvc-plain") is None
    log.unlink()
    # A volume with a wipe policy (or one made before the plain-delete tag existed) is looked
    # up first, then wiped (where device-mapper exists) and removed.
    csi.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=wiped.volume_id))
    assert _calls(log) == ["lvremove", "lvs", "lvremove"]
    assert csi.lvm.get_lv(csi.vg.name, "pvc-wiped") is None
    csi.lvm.lvcreate(csi.vg.name, "pvc-older", 4 * MiB, tags=[
        csi.owner_tag, "csi-lvm.edge.io/kind=volume",
        "csi-lvm.edge.io/name=cHZjLW9sZGVy"])
    csi.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=f"{csi.vg.name}/pvc-older"))
    assert csi.lvm.get_lv(csi.vg.name, "pvc-older") is None
    # Idempotent: a second delete finds nothing (one lvremove matching nothing, one lookup).
    log.unlink()
    csi.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=plain.volume_id))
    assert _calls(log) == ["lvremove", "lvs"]
