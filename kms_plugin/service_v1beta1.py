"""KMS v1beta1 KeyManagementService (deprecated upstream, still used by older clusters).

kube-apiserver's KMS v1 calls Encrypt once per write with a fresh DEK and has no key_id and
no annotations, so the ciphertext is self-contained (envelope.LegacyBlob): the key_id, the
local-KEK record and the DEK sealed with that local KEK.  Encrypt therefore costs no backend
call either; Decrypt costs one per local KEK this process has not seen yet.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import grpc

from edge_common.version import project_version
from edge_proto.kms.v1beta1 import service_pb2, service_pb2_grpc
from kms_plugin.audit import AuditLog
from kms_plugin.envelope import EnvelopeError
from kms_plugin.keys import KeyManager
from kms_plugin.metrics import PluginMetrics
from kms_plugin.rpc import Rpc, deadline_of

API_VERSION = "v1beta1"
RUNTIME_NAME = "edge-kms-plugin"


def _check_version(version: str) -> None:
    if version not in ("", API_VERSION):
        raise EnvelopeError("unsupported KMS API version")


class KmsV1beta1Service(service_pb2_grpc.KeyManagementServiceServicer):
    def __init__(
        self,
        keys: KeyManager,
        metrics: PluginMetrics | None = None,
        *,
        audit: AuditLog | None = None,
    ) -> None:
        self.keys = keys
        self.rpc = Rpc(API_VERSION, metrics, audit)

    def Version(  # noqa: N802 (gRPC method name)
        self, request: service_pb2.VersionRequest, context: grpc.ServicerContext
    ) -> service_pb2.VersionResponse:
        with self.rpc.call("Version", audited=False, context=context):
            return service_pb2.VersionResponse(
                version=API_VERSION, runtime_name=RUNTIME_NAME, runtime_version=project_version()
            )

    def Encrypt(  # noqa: N802
        self, request: service_pb2.EncryptRequest, context: grpc.ServicerContext
    ) -> service_pb2.EncryptResponse:
        with self.rpc.call("Encrypt", context=context) as scope:
            _check_version(request.version)
            blob, scope.key_id = self.keys.encrypt_legacy(request.plain)
            return service_pb2.EncryptResponse(cipher=blob)

    def Decrypt(  # noqa: N802
        self, request: service_pb2.DecryptRequest, context: grpc.ServicerContext
    ) -> service_pb2.DecryptResponse:
        with self.rpc.call("Decrypt", context=context) as scope:
            _check_version(request.version)
            plain, scope.key_id = self.keys.decrypt_legacy(
                request.cipher, deadline=functools.partial(deadline_of, context)
            )
            return service_pb2.DecryptResponse(plain=plain)


def register(service: KmsV1beta1Service) -> Callable[[grpc.Server], None]:
    def _register(server: grpc.Server) -> None:
        service_pb2_grpc.add_KeyManagementServiceServicer_to_server(service, server)

    return _register


__all__ = ["API_VERSION", "KmsV1beta1Service", "register"]
