"""KMS v2 KeyManagementService (package ``v2``): Status, Encrypt, Decrypt.

Status answers from memory (the current key snapshot and the last health probe): no backend
call.  Encrypt seals the apiserver's seed with the in-memory local KEK: no backend call.
Decrypt unwraps the local KEK named in the annotation through the single-flight cache: a
backend call only for a local KEK this process has not seen yet.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import grpc

from edge_proto.kms.v2 import service_pb2, service_pb2_grpc
from kms_plugin.audit import AuditLog
from kms_plugin.keys import KeyManager
from kms_plugin.metrics import PluginMetrics
from kms_plugin.monitor import Monitor
from kms_plugin.rpc import Rpc, deadline_of

API_VERSION = "v2"


class KmsV2Service(service_pb2_grpc.KeyManagementServiceServicer):
    def __init__(
        self,
        keys: KeyManager,
        monitor: Monitor,
        metrics: PluginMetrics | None = None,
        *,
        audit: AuditLog | None = None,
    ) -> None:
        self.keys = keys
        self.monitor = monitor
        self.rpc = Rpc(API_VERSION, metrics, audit)

    def Status(  # noqa: N802 (gRPC method name)
        self, request: service_pb2.StatusRequest, context: grpc.ServicerContext
    ) -> service_pb2.StatusResponse:
        with self.rpc.call("Status", audited=False, context=context):
            return service_pb2.StatusResponse(
                version=API_VERSION,
                healthz=self.monitor.status_healthz(),
                key_id=self.keys.status_key_id(),
            )

    def Encrypt(  # noqa: N802
        self, request: service_pb2.EncryptRequest, context: grpc.ServicerContext
    ) -> service_pb2.EncryptResponse:
        with self.rpc.call("Encrypt", request.uid, context=context) as scope:
            ciphertext, key_id, annotations = self.keys.encrypt_seed(request.plaintext)
            scope.key_id = key_id
            return service_pb2.EncryptResponse(
                ciphertext=ciphertext, key_id=key_id, annotations=annotations
            )

    def Decrypt(  # noqa: N802
        self, request: service_pb2.DecryptRequest, context: grpc.ServicerContext
    ) -> service_pb2.DecryptResponse:
        with self.rpc.call("Decrypt", request.uid, context=context) as scope:
            scope.key_id = request.key_id
            plaintext = self.keys.decrypt_seed(
                request.ciphertext,
                request.key_id,
                request.annotations,  # the protobuf map reads like a dict: no copy
                deadline=functools.partial(deadline_of, context),  # only on a cache miss
            )
            return service_pb2.DecryptResponse(plaintext=plaintext)


def register(service: KmsV2Service) -> Callable[[grpc.Server], None]:
    def _register(server: grpc.Server) -> None:
        service_pb2_grpc.add_KeyManagementServiceServicer_to_server(service, server)

    return _register

__all__ = ["API_VERSION", "KmsV2Service", "register"]
