"""The generated stubs speak exactly the upstream wire contracts.

Every number pinned here was checked against the published specifications:
CSI v1.12 ``csi.proto`` (container-storage-interface/spec), and Kubernetes'
``k8s.io/kms/apis/v2/api.proto``, ``k8s.io/kms/apis/v1beta1/api.proto`` and
``k8s.io/apiserver/.../envelope/kmsv2/v2/api.proto`` (EncryptedObject).
"""

from __future__ import annotations

import pytest
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from edge_proto.csi.v1 import csi_pb2, csi_pb2_grpc
from edge_proto.kms.v1beta1 import service_pb2 as v1beta1_pb2
from edge_proto.kms.v1beta1 import service_pb2_grpc as v1beta1_pb2_grpc
from edge_proto.kms.v2 import encrypted_object_pb2, service_pb2, service_pb2_grpc

STRING = FieldDescriptor.TYPE_STRING
BYTES = FieldDescriptor.TYPE_BYTES
INT64 = FieldDescriptor.TYPE_INT64
INT32 = FieldDescriptor.TYPE_INT32
BOOL = FieldDescriptor.TYPE_BOOL
MESSAGE = FieldDescriptor.TYPE_MESSAGE
ENUM = FieldDescriptor.TYPE_ENUM

# (message full name, field name, number, protobuf type)
PINNED_FIELDS: list[tuple[str, str, int, int]] = [
    # --- CSI csi.v1 ---
    ("csi.v1.GetPluginInfoResponse", "name", 1, STRING),
    ("csi.v1.GetPluginInfoResponse", "vendor_version", 2, STRING),
    ("csi.v1.GetPluginInfoResponse", "manifest", 3, MESSAGE),
    ("csi.v1.GetPluginCapabilitiesResponse", "capabilities", 1, MESSAGE),
    ("csi.v1.PluginCapability", "service", 1, MESSAGE),
    ("csi.v1.PluginCapability", "volume_expansion", 2, MESSAGE),
    ("csi.v1.ProbeResponse", "ready", 1, MESSAGE),
    ("csi.v1.CreateVolumeRequest", "name", 1, STRING),
    ("csi.v1.CreateVolumeRequest", "capacity_range", 2, MESSAGE),
    ("csi.v1.CreateVolumeRequest", "volume_capabilities", 3, MESSAGE),
    ("csi.v1.CreateVolumeRequest", "parameters", 4, MESSAGE),
    ("csi.v1.CreateVolumeRequest", "secrets", 5, MESSAGE),
    ("csi.v1.CreateVolumeRequest", "volume_content_source", 6, MESSAGE),
    ("csi.v1.CreateVolumeRequest", "accessibility_requirements", 7, MESSAGE),
    ("csi.v1.CreateVolumeRequest", "mutable_parameters", 8, MESSAGE),
    ("csi.v1.CapacityRange", "required_bytes", 1, INT64),
    ("csi.v1.CapacityRange", "limit_bytes", 2, INT64),
    ("csi.v1.Volume", "capacity_bytes", 1, INT64),
    ("csi.v1.Volume", "volume_id", 2, STRING),
    ("csi.v1.Volume", "volume_context", 3, MESSAGE),
    ("csi.v1.Volume", "content_source", 4, MESSAGE),
    ("csi.v1.Volume", "accessible_topology", 5, MESSAGE),
    ("csi.v1.VolumeCapability", "block", 1, MESSAGE),
    ("csi.v1.VolumeCapability", "mount", 2, MESSAGE),
    ("csi.v1.VolumeCapability", "access_mode", 3, MESSAGE),
    ("csi.v1.VolumeCapability.MountVolume", "fs_type", 1, STRING),
    ("csi.v1.VolumeCapability.MountVolume", "mount_flags", 2, STRING),
    ("csi.v1.VolumeCapability.MountVolume", "volume_mount_group", 3, STRING),
    ("csi.v1.VolumeContentSource", "snapshot", 1, MESSAGE),
    ("csi.v1.VolumeContentSource", "volume", 2, MESSAGE),
    ("csi.v1.TopologyRequirement", "requisite", 1, MESSAGE),
    ("csi.v1.TopologyRequirement", "preferred", 2, MESSAGE),
    ("csi.v1.Topology", "segments", 1, MESSAGE),
    ("csi.v1.DeleteVolumeRequest", "volume_id", 1, STRING),
    ("csi.v1.DeleteVolumeRequest", "secrets", 2, MESSAGE),
    ("csi.v1.ValidateVolumeCapabilitiesRequest", "mutable_parameters", 6, MESSAGE),
    ("csi.v1.ValidateVolumeCapabilitiesResponse", "confirmed", 1, MESSAGE),
    ("csi.v1.ValidateVolumeCapabilitiesResponse", "message", 2, STRING),
    ("csi.v1.ListVolumesRequest", "max_entries", 1, INT32),
    ("csi.v1.ListVolumesRequest", "starting_token", 2, STRING),
    ("csi.v1.ListVolumesResponse.VolumeStatus", "volume_condition", 2, MESSAGE),
    ("csi.v1.ControllerModifyVolumeRequest", "volume_id", 1, STRING),
    ("csi.v1.ControllerModifyVolumeRequest", "secrets", 2, MESSAGE),
    ("csi.v1.ControllerModifyVolumeRequest", "mutable_parameters", 3, MESSAGE),
    ("csi.v1.GetCapacityRequest", "accessible_topology", 3, MESSAGE),
    ("csi.v1.GetCapacityResponse", "available_capacity", 1, INT64),
    ("csi.v1.GetCapacityResponse", "maximum_volume_size", 2, MESSAGE),
    ("csi.v1.GetCapacityResponse", "minimum_volume_size", 3, MESSAGE),
    ("csi.v1.CreateSnapshotRequest", "source_volume_id", 1, STRING),
    ("csi.v1.CreateSnapshotRequest", "name", 2, STRING),
    ("csi.v1.CreateSnapshotRequest", "secrets", 3, MESSAGE),
    ("csi.v1.CreateSnapshotRequest", "parameters", 4, MESSAGE),
    ("csi.v1.Snapshot", "size_bytes", 1, INT64),
    ("csi.v1.Snapshot", "snapshot_id", 2, STRING),
    ("csi.v1.Snapshot", "source_volume_id", 3, STRING),
    ("csi.v1.Snapshot", "creation_time", 4, MESSAGE),
    ("csi.v1.Snapshot", "ready_to_use", 5, BOOL),
    ("csi.v1.Snapshot", "group_snapshot_id", 6, STRING),
    ("csi.v1.ListSnapshotsRequest", "source_volume_id", 3, STRING),
    ("csi.v1.ListSnapshotsRequest", "snapshot_id", 4, STRING),
    ("csi.v1.GetSnapshotRequest", "snapshot_id", 1, STRING),
    ("csi.v1.GetSnapshotRequest", "secrets", 2, MESSAGE),
    ("csi.v1.ControllerExpandVolumeRequest", "volume_id", 1, STRING),
    ("csi.v1.ControllerExpandVolumeRequest", "capacity_range", 2, MESSAGE),
    ("csi.v1.ControllerExpandVolumeRequest", "secrets", 3, MESSAGE),
    ("csi.v1.ControllerExpandVolumeRequest", "volume_capability", 4, MESSAGE),
    ("csi.v1.ControllerExpandVolumeResponse", "capacity_bytes", 1, INT64),
    ("csi.v1.ControllerExpandVolumeResponse", "node_expansion_required", 2, BOOL),
    ("csi.v1.NodeStageVolumeRequest", "volume_id", 1, STRING),
    ("csi.v1.NodeStageVolumeRequest", "publish_context", 2, MESSAGE),
    ("csi.v1.NodeStageVolumeRequest", "staging_target_path", 3, STRING),
    ("csi.v1.NodeStageVolumeRequest", "volume_capability", 4, MESSAGE),
    ("csi.v1.NodeStageVolumeRequest", "secrets", 5, MESSAGE),
    ("csi.v1.NodeStageVolumeRequest", "volume_context", 6, MESSAGE),
    ("csi.v1.NodePublishVolumeRequest", "volume_id", 1, STRING),
    ("csi.v1.NodePublishVolumeRequest", "publish_context", 2, MESSAGE),
    ("csi.v1.NodePublishVolumeRequest", "staging_target_path", 3, STRING),
    ("csi.v1.NodePublishVolumeRequest", "target_path", 4, STRING),
    ("csi.v1.NodePublishVolumeRequest", "volume_capability", 5, MESSAGE),
    ("csi.v1.NodePublishVolumeRequest", "readonly", 6, BOOL),
    ("csi.v1.NodePublishVolumeRequest", "secrets", 7, MESSAGE),
    ("csi.v1.NodePublishVolumeRequest", "volume_context", 8, MESSAGE),
    ("csi.v1.NodeGetVolumeStatsRequest", "volume_id", 1, STRING),
    ("csi.v1.NodeGetVolumeStatsRequest", "volume_path", 2, STRING),
    ("csi.v1.NodeGetVolumeStatsRequest", "staging_target_path", 3, STRING),
    ("csi.v1.NodeGetVolumeStatsResponse", "usage", 1, MESSAGE),
    ("csi.v1.NodeGetVolumeStatsResponse", "volume_condition", 2, MESSAGE),
    ("csi.v1.VolumeUsage", "available", 1, INT64),
    ("csi.v1.VolumeUsage", "total", 2, INT64),
    ("csi.v1.VolumeUsage", "used", 3, INT64),
    ("csi.v1.VolumeUsage", "unit", 4, ENUM),
    ("csi.v1.VolumeCondition", "abnormal", 1, BOOL),
    ("csi.v1.VolumeCondition", "message", 2, STRING),
    ("csi.v1.NodeGetInfoResponse", "node_id", 1, STRING),
    ("csi.v1.NodeGetInfoResponse", "max_volumes_per_node", 2, INT64),
    ("csi.v1.NodeGetInfoResponse", "accessible_topology", 3, MESSAGE),
    ("csi.v1.NodeExpandVolumeRequest", "volume_id", 1, STRING),
    ("csi.v1.NodeExpandVolumeRequest", "volume_path", 2, STRING),
    ("csi.v1.NodeExpandVolumeRequest", "capacity_range", 3, MESSAGE),
    ("csi.v1.NodeExpandVolumeRequest", "staging_target_path", 4, STRING),
    ("csi.v1.NodeExpandVolumeRequest", "volume_capability", 5, MESSAGE),
    ("csi.v1.NodeExpandVolumeRequest", "secrets", 6, MESSAGE),
    ("csi.v1.NodeExpandVolumeResponse", "capacity_bytes", 1, INT64),
    # --- KMS plugin API v2 ---
    ("v2.StatusResponse", "version", 1, STRING),
    ("v2.StatusResponse", "healthz", 2, STRING),
    ("v2.StatusResponse", "key_id", 3, STRING),
    ("v2.EncryptRequest", "plaintext", 1, BYTES),
    ("v2.EncryptRequest", "uid", 2, STRING),
    ("v2.EncryptResponse", "ciphertext", 1, BYTES),
    ("v2.EncryptResponse", "key_id", 2, STRING),
    ("v2.EncryptResponse", "annotations", 3, MESSAGE),
    ("v2.DecryptRequest", "ciphertext", 1, BYTES),
    ("v2.DecryptRequest", "uid", 2, STRING),
    ("v2.DecryptRequest", "key_id", 3, STRING),
    ("v2.DecryptRequest", "annotations", 4, MESSAGE),
    ("v2.DecryptResponse", "plaintext", 1, BYTES),
    # --- etcd record of KMS v2 data ---
    ("v2.EncryptedObject", "encryptedData", 1, BYTES),
    ("v2.EncryptedObject", "keyID", 2, STRING),
    ("v2.EncryptedObject", "encryptedDEKSource", 3, BYTES),
    ("v2.EncryptedObject", "annotations", 4, MESSAGE),
    ("v2.EncryptedObject", "encryptedDEKSourceType", 5, ENUM),
    # --- KMS plugin API v1beta1 ---
    ("v1beta1.VersionRequest", "version", 1, STRING),
    ("v1beta1.VersionResponse", "version", 1, STRING),
    ("v1beta1.VersionResponse", "runtime_name", 2, STRING),
    ("v1beta1.VersionResponse", "runtime_version", 3, STRING),
    ("v1beta1.EncryptRequest", "version", 1, STRING),
    ("v1beta1.EncryptRequest", "plain", 2, BYTES),
    ("v1beta1.EncryptResponse", "cipher", 1, BYTES),
    ("v1beta1.DecryptRequest", "version", 1, STRING),
    ("v1beta1.DecryptRequest", "cipher", 2, BYTES),
    ("v1beta1.DecryptResponse", "plain", 1, BYTES),
]

# Field counts of a few messages: an extra or missing field is a contract change too.
FIELD_COUNTS = {
    "csi.v1.CreateVolumeRequest": 8,
    "csi.v1.NodePublishVolumeRequest": 8,
    "csi.v1.NodeExpandVolumeRequest": 6,
    "v2.EncryptRequest": 2,
    "v2.EncryptResponse": 3,
    "v2.DecryptRequest": 4,
    "v2.StatusResponse": 3,
    "v2.EncryptedObject": 5,
    "v1beta1.EncryptRequest": 2,
    "v1beta1.DecryptRequest": 2,
}


def _message(full_name: str) -> Descriptor:
    return descriptor_pool.Default().FindMessageTypeByName(full_name)


@pytest.mark.parametrize(
    ("message", "field", "number", "ftype"),
    PINNED_FIELDS,
    ids=[f"{m}.{f}" for m, f, _, _ in PINNED_FIELDS],
)
def test_field_has_the_upstream_number_and_type(
    message: str, field: str, number: int, ftype: int
) -> None:
    descriptor = _message(message).fields_by_name[field]
    assert descriptor.number == number
    assert descriptor.type == ftype


@pytest.mark.parametrize(("message", "count"), sorted(FIELD_COUNTS.items()))
def test_message_has_exactly_the_upstream_fields(message: str, count: int) -> None:
    assert len(_message(message).fields) == count


@pytest.mark.parametrize(
    ("message", "field"),
    [
        ("v2.EncryptResponse", "annotations"),
        ("v2.DecryptRequest", "annotations"),
        ("v2.EncryptedObject", "annotations"),
    ],
)
def test_kms_annotations_are_string_to_bytes_maps(message: str, field: str) -> None:
    entry = _message(message).fields_by_name[field].message_type
    assert entry.GetOptions().map_entry
    assert entry.fields_by_name["key"].type == STRING
    assert entry.fields_by_name["value"].type == BYTES


def test_encrypted_dek_source_type_values_match_upstream() -> None:
    enum = encrypted_object_pb2.EncryptedDEKSourceType
    assert enum.DESCRIPTOR.full_name == "v2.EncryptedDEKSourceType"
    assert dict(enum.items()) == {"AES_GCM_KEY": 0, "HKDF_SHA256_XNONCE_AES_GCM_SEED": 1}


def test_csi_enums_match_upstream_values() -> None:
    rpc = csi_pb2.ControllerServiceCapability.RPC
    assert rpc.CREATE_DELETE_VOLUME == 1
    assert rpc.EXPAND_VOLUME == 9
    assert rpc.GET_CAPACITY == 4
    assert rpc.MODIFY_VOLUME == 14
    assert rpc.GET_SNAPSHOT == 15
    node = csi_pb2.NodeServiceCapability.RPC
    assert node.STAGE_UNSTAGE_VOLUME == 1
    assert node.GET_VOLUME_STATS == 2
    assert node.EXPAND_VOLUME == 3
    assert node.VOLUME_CONDITION == 4
    assert node.VOLUME_MOUNT_GROUP == 6
    mode = csi_pb2.VolumeCapability.AccessMode
    assert mode.SINGLE_NODE_WRITER == 1
    assert mode.MULTI_NODE_MULTI_WRITER == 5
    assert mode.SINGLE_NODE_SINGLE_WRITER == 6
    assert mode.SINGLE_NODE_MULTI_WRITER == 7
    plugin = csi_pb2.PluginCapability
    assert plugin.Service.CONTROLLER_SERVICE == 1
    assert plugin.Service.VOLUME_ACCESSIBILITY_CONSTRAINTS == 2
    assert plugin.VolumeExpansion.ONLINE == 1
    assert plugin.VolumeExpansion.OFFLINE == 2
    assert csi_pb2.VolumeUsage.BYTES == 1
    assert csi_pb2.VolumeUsage.INODES == 2


def test_csi_secret_fields_carry_the_csi_secret_option() -> None:
    secrets = _message("csi.v1.NodeStageVolumeRequest").fields_by_name["secrets"]
    assert secrets.GetOptions().Extensions[csi_pb2.csi_secret] is True
    assert csi_pb2.csi_secret.number == 1059
    parameters = _message("csi.v1.CreateVolumeRequest").fields_by_name["parameters"]
    assert parameters.GetOptions().Extensions[csi_pb2.csi_secret] is False


@pytest.mark.parametrize(
    ("module", "service", "full_name", "methods"),
    [
        (
            csi_pb2,
            "Identity",
            "csi.v1.Identity",
            {"GetPluginInfo", "GetPluginCapabilities", "Probe"},
        ),
        (
            csi_pb2,
            "Controller",
            "csi.v1.Controller",
            {
                "CreateVolume",
                "DeleteVolume",
                "ControllerPublishVolume",
                "ControllerUnpublishVolume",
                "ValidateVolumeCapabilities",
                "ListVolumes",
                "GetCapacity",
                "ControllerGetCapabilities",
                "CreateSnapshot",
                "DeleteSnapshot",
                "ListSnapshots",
                "GetSnapshot",
                "ControllerExpandVolume",
                "ControllerGetVolume",
                "ControllerModifyVolume",
            },
        ),
        (
            csi_pb2,
            "Node",
            "csi.v1.Node",
            {
                "NodeStageVolume",
                "NodeUnstageVolume",
                "NodePublishVolume",
                "NodeUnpublishVolume",
                "NodeGetVolumeStats",
                "NodeExpandVolume",
                "NodeGetCapabilities",
                "NodeGetInfo",
            },
        ),
        (
            service_pb2,
            "KeyManagementService",
            "v2.KeyManagementService",
            {"Status", "Encrypt", "Decrypt"},
        ),
        (
            v1beta1_pb2,
            "KeyManagementService",
            "v1beta1.KeyManagementService",
            {"Version", "Encrypt", "Decrypt"},
        ),
    ],
)
def test_service_full_names_and_methods_match_upstream(
    module: object, service: str, full_name: str, methods: set[str]
) -> None:
    descriptor = module.DESCRIPTOR.services_by_name[service]  # type: ignore[attr-defined]
    assert descriptor.full_name == full_name
    assert {m.name for m in descriptor.methods} == methods


def test_kms_v2_and_encrypted_object_share_package_v2_in_distinct_files() -> None:
    assert service_pb2.DESCRIPTOR.package == "v2"
    assert encrypted_object_pb2.DESCRIPTOR.package == "v2"
    assert service_pb2.DESCRIPTOR.name == "edge_proto/kms/v2/service.proto"
    assert encrypted_object_pb2.DESCRIPTOR.name == "edge_proto/kms/v2/encrypted_object.proto"
    pool = descriptor_pool.Default()
    assert pool.FindMessageTypeByName("v2.EncryptedObject").file.name == (
        "edge_proto/kms/v2/encrypted_object.proto"
    )
    assert pool.FindMessageTypeByName("v2.EncryptRequest").file.name == (
        "edge_proto/kms/v2/service.proto"
    )
    assert v1beta1_pb2.DESCRIPTOR.package == "v1beta1"
    assert csi_pb2.DESCRIPTOR.package == "csi.v1"


def test_grpc_modules_expose_servicers_and_stubs() -> None:
    for module, names in [
        (csi_pb2_grpc, ["Identity", "Controller", "Node"]),
        (service_pb2_grpc, ["KeyManagementService"]),
        (v1beta1_pb2_grpc, ["KeyManagementService"]),
    ]:
        for name in names:
            assert callable(getattr(module, f"add_{name}Servicer_to_server"))
            assert isinstance(getattr(module, f"{name}Servicer"), type)
            assert isinstance(getattr(module, f"{name}Stub"), type)
