"""Wire-level checks: encodings and gRPC method paths are the ones upstream peers use."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from edge_proto.csi.v1 import csi_pb2, csi_pb2_grpc
from edge_proto.kms.v1beta1 import service_pb2 as v1beta1_pb2
from edge_proto.kms.v1beta1 import service_pb2_grpc as v1beta1_pb2_grpc
from edge_proto.kms.v2 import encrypted_object_pb2, service_pb2, service_pb2_grpc


def test_encrypted_object_encodes_with_upstream_tags() -> None:
    record = encrypted_object_pb2.EncryptedObject(
        encryptedData=b"D",
        keyID="k",
        encryptedDEKSource=b"S",
        encryptedDEKSourceType=encrypted_object_pb2.HKDF_SHA256_XNONCE_AES_GCM_SEED,
    )
    # field 1 bytes, 2 string, 3 bytes (wire type 2), 5 enum (wire type 0)
    assert record.SerializeToString(deterministic=True) == (b"\x0a\x01D\x12\x01k\x1a\x01S\x28\x01")


def test_encrypted_object_decodes_annotations_from_field_four() -> None:
    # map entry: field 4, length-delimited; key (1) "a.io", value (2) b"\x00\x01"
    entry = b"\x0a\x04a.io" + b"\x12\x02\x00\x01"
    wire = b"\x22" + bytes([len(entry)]) + entry
    record = encrypted_object_pb2.EncryptedObject.FromString(wire)
    assert dict(record.annotations) == {"a.io": b"\x00\x01"}
    assert record.encryptedDEKSourceType == encrypted_object_pb2.AES_GCM_KEY


def test_csi_create_volume_request_encodes_with_upstream_tags() -> None:
    request = csi_pb2.CreateVolumeRequest(
        name="pvc-1",
        capacity_range=csi_pb2.CapacityRange(required_bytes=1),
    )
    # name: field 1 string; capacity_range: field 2 message holding field 1 varint
    assert request.SerializeToString(deterministic=True) == (b"\x0a\x05pvc-1\x12\x02\x08\x01")


class _KmsV2(service_pb2_grpc.KeyManagementServiceServicer):
    def Status(  # noqa: N802 - gRPC method name
        self, request: service_pb2.StatusRequest, context: grpc.ServicerContext
    ) -> service_pb2.StatusResponse:
        return service_pb2.StatusResponse(version="v2", healthz="ok", key_id="key-1")


class _KmsV1beta1(v1beta1_pb2_grpc.KeyManagementServiceServicer):
    def Version(  # noqa: N802 - gRPC method name
        self, request: v1beta1_pb2.VersionRequest, context: grpc.ServicerContext
    ) -> v1beta1_pb2.VersionResponse:
        return v1beta1_pb2.VersionResponse(
            version=request.version, runtime_name="edge", runtime_version="0.1.0"
        )


class _Identity(csi_pb2_grpc.IdentityServicer):
    def GetPluginInfo(  # noqa: N802 - gRPC method name
        self, request: csi_pb2.GetPluginInfoRequest, context: grpc.ServicerContext
    ) -> csi_pb2.GetPluginInfoResponse:
        return csi_pb2.GetPluginInfoResponse(name="lvm.csi.example.org", vendor_version="1")


@pytest.fixture
def channel() -> Iterator[grpc.Channel]:
    """A real gRPC server on an abstract unix socket serving all three services."""
    address = f"unix-abstract:edge-proto-test-{secrets.token_hex(6)}"
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    service_pb2_grpc.add_KeyManagementServiceServicer_to_server(_KmsV2(), server)
    v1beta1_pb2_grpc.add_KeyManagementServiceServicer_to_server(_KmsV1beta1(), server)
    csi_pb2_grpc.add_IdentityServicer_to_server(_Identity(), server)
    server.add_insecure_port(address)
    server.start()
    try:
        with grpc.insecure_channel(address) as chan:
            yield chan
    finally:
        server.stop(None)


def _raw_call(channel: grpc.Channel, path: str, request: bytes) -> bytes:
    """Call a method by its HTTP/2 path with raw bytes, as a foreign peer would."""
    call = channel.unary_unary(path, request_serializer=None, response_deserializer=None)
    response: bytes = call(request, timeout=10)
    return response


def test_kms_v2_status_is_served_on_the_apiserver_method_path(channel: grpc.Channel) -> None:
    raw = _raw_call(channel, "/v2.KeyManagementService/Status", b"")
    reply = service_pb2.StatusResponse.FromString(raw)
    assert (reply.version, reply.healthz, reply.key_id) == ("v2", "ok", "key-1")


def test_kms_v1beta1_version_is_served_on_its_method_path(channel: grpc.Channel) -> None:
    request = v1beta1_pb2.VersionRequest(version="v1beta1").SerializeToString()
    raw = _raw_call(channel, "/v1beta1.KeyManagementService/Version", request)
    reply = v1beta1_pb2.VersionResponse.FromString(raw)
    assert (reply.version, reply.runtime_name) == ("v1beta1", "edge")


def test_csi_identity_is_served_on_the_kubelet_method_path(channel: grpc.Channel) -> None:
    raw = _raw_call(channel, "/csi.v1.Identity/GetPluginInfo", b"")
    assert csi_pb2.GetPluginInfoResponse.FromString(raw).name == "lvm.csi.example.org"
