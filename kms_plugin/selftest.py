"""``kms-plugin selftest``: prove the configured backend (or the running plugin) works.

Backend mode: a key manager wraps a fresh local KEK and seals a random seed, then a second,
*cold* key manager (empty cache, like a plugin on another node) opens it, which costs one real
unwrap through the backend; a ciphertext with a flipped bit must be refused.
Socket mode: Status, Encrypt of a 32-byte seed and Decrypt through the plugin's socket.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

from kms_plugin.config import PluginConfig
from kms_plugin.envelope import EnvelopeError, key_id_hash


@dataclass
class SelftestResult:
    ok: bool
    mode: str
    steps: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    error: str = ""

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"result": "ok" if self.ok else "FAILED", "mode": self.mode}
        out.update(self.details)
        out["steps"] = ", ".join(self.steps)
        if self.error:
            out["error"] = self.error
        return out


def selftest_backend(config: PluginConfig) -> SelftestResult:
    from kms_plugin.plugin import build_backend, build_key_manager

    result = SelftestResult(False, f"backend {config.backend}")
    started = time.monotonic()
    backend = build_backend(config, None)
    try:
        writer = build_key_manager(config, backend)
        writer.refresh_root(deadline=time.monotonic() + config.backend_timeout)
        result.steps.append("current root key and local KEK wrapped")
        seed = os.urandom(32)
        ct, key_id, annotations = writer.encrypt_seed(seed)
        result.details["key_id"] = key_id
        result.details["key_id_hash"] = key_id_hash(key_id)
        cur = writer.current
        assert cur is not None
        result.details["root_key"] = f"{cur.root.key_ref} version {cur.root.version}"
        result.steps.append("seed encrypted")
        reader = build_key_manager(config, backend)
        out = reader.decrypt_seed(
            ct, key_id, annotations, deadline=time.monotonic() + config.backend_timeout
        )
        if out != seed:
            result.error = "decrypted seed differs from the original"
            return result
        result.steps.append("decrypted by a cold key manager")
        tampered = bytes([ct[0]]) + bytes([ct[1] ^ 1]) + ct[2:]
        try:
            reader.decrypt_seed(tampered, key_id, annotations)
        except EnvelopeError:
            result.steps.append("tampered ciphertext refused")
        else:
            result.error = "a tampered ciphertext was accepted"
            return result
        result.details["backend_calls"] = dict(backend.tally)
        result.details["seconds"] = round(time.monotonic() - started, 3)
        result.ok = True
        return result
    except Exception as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    finally:
        backend.close()


def selftest_socket(endpoint: str, *, timeout: float = 5.0) -> SelftestResult:
    import grpc

    from edge_common.server import unix_channel
    from edge_proto.kms.v2 import service_pb2, service_pb2_grpc

    result = SelftestResult(False, f"socket {endpoint}")
    try:
        with unix_channel(endpoint) as channel:
            stub = service_pb2_grpc.KeyManagementServiceStub(channel)
            status = stub.Status(service_pb2.StatusRequest(), timeout=timeout)
            result.details["healthz"] = status.healthz
            result.details["version"] = status.version
            result.details["key_id"] = status.key_id
            result.steps.append("status")
            seed = os.urandom(32)
            enc = stub.Encrypt(
                service_pb2.EncryptRequest(plaintext=seed, uid="selftest"), timeout=timeout
            )
            if enc.key_id != status.key_id:
                result.steps.append("key_id changed between Status and Encrypt (rotation?)")
            result.steps.append("encrypt")
            dec = stub.Decrypt(
                service_pb2.DecryptRequest(
                    ciphertext=enc.ciphertext, key_id=enc.key_id,
                    annotations=dict(enc.annotations), uid="selftest",
                ),
                timeout=timeout,
            )
            if dec.plaintext != seed:
                result.error = "decrypted seed differs from the original"
                return result
            result.steps.append("decrypt")
            result.ok = status.healthz == "ok" and status.version == "v2"
            if not result.ok:
                result.error = f"Status healthz is {status.healthz!r}"
            return result
    except grpc.RpcError as exc:
        result.error = f"{exc.code().name}: {exc.details()}"  # type: ignore[attr-defined]
        return result


__all__ = ["SelftestResult", "selftest_backend", "selftest_socket"]
