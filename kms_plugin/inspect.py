"""``kms-plugin inspect``: what is this etcd value, and can this plugin decrypt it?"""

from __future__ import annotations

import base64
import time
from collections.abc import Mapping
from typing import Any

from kms_plugin import etcd_value
from kms_plugin.config import PluginConfig
from kms_plugin.envelope import ANNOTATION_KEY, EnvelopeError, KekRecord, key_id_hash


def _describe_annotations(annotations: Mapping[str, bytes]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key in sorted(annotations):
        value = annotations[key]
        if key == ANNOTATION_KEY:
            try:
                rec = KekRecord.decode(value)
                out[key] = (
                    f"local KEK {rec.kek_id.hex()} wrapped by backend {rec.backend}, root key "
                    f"{rec.root.key_ref} version {rec.root.version} ({len(rec.wrapped)} bytes)"
                )
                continue
            except EnvelopeError:
                out[key] = f"MALFORMED local-KEK record ({len(value)} bytes)"
                continue
        out[key] = f"{len(value)} bytes"
    return out


def _unwrap_in_process(config: PluginConfig) -> Any:
    from kms_plugin.plugin import build_backend, build_key_manager

    backend = build_backend(config, None)
    keys = build_key_manager(config, backend)

    def unwrap(ciphertext: bytes, key_id: str, annotations: Mapping[str, bytes]) -> bytes:
        return keys.decrypt_seed(
            ciphertext, key_id, annotations, deadline=time.monotonic() + config.backend_timeout
        )

    return unwrap, keys.close


def _unwrap_via_socket(config: PluginConfig) -> Any:
    from edge_common.server import unix_channel
    from edge_proto.kms.v2 import service_pb2, service_pb2_grpc

    channel = unix_channel(config.endpoint)
    stub = service_pb2_grpc.KeyManagementServiceStub(channel)

    def unwrap(ciphertext: bytes, key_id: str, annotations: Mapping[str, bytes]) -> bytes:
        resp = stub.Decrypt(
            service_pb2.DecryptRequest(
                ciphertext=ciphertext, key_id=key_id, annotations=dict(annotations),
                uid="kms-plugin-inspect",
            ),
            timeout=config.backend_timeout,
        )
        return bytes(resp.plaintext)

    return unwrap, channel.close


def inspect_value(
    raw: bytes,
    config: PluginConfig,
    *,
    decrypt: bool = False,
    etcd_key: str | None = None,
    show_secret: bool = False,
    via_socket: bool = False,
) -> tuple[dict[str, Any], bool]:
    """A report for people (or --json) and whether everything asked for worked."""
    report: dict[str, Any] = {}
    try:
        value = etcd_value.parse(raw)
    except etcd_value.EtcdValueError as exc:
        report["encrypted"] = f"NO or unreadable: {exc}"
        return report, False
    report["encrypted"] = "yes, KMS v2"
    report["provider"] = value.provider
    report["key_id"] = value.key_id
    report["key_id_hash"] = key_id_hash(value.key_id)
    report["dek_source_type"] = value.dek_source_type
    report["encrypted_dek_source_bytes"] = len(value.encrypted_dek_source)
    report["encrypted_data_bytes"] = len(value.encrypted_data)
    report["annotations"] = _describe_annotations(value.annotations)
    if not decrypt:
        return report, True
    assert etcd_key is not None
    unwrap, close = _unwrap_via_socket(config) if via_socket else _unwrap_in_process(config)
    try:
        plaintext = etcd_value.decrypt(value, etcd_key, unwrap)
    except etcd_value.EtcdValueError as exc:
        report["decrypt"] = f"FAILED: {exc}"
        return report, False
    except Exception as exc:
        from kms_plugin.errors import to_service_error

        err = to_service_error(exc)
        if hasattr(exc, "code") and callable(exc.code):  # grpc.RpcError
            report["decrypt"] = f"FAILED: {exc.code().name}: {exc.details()}"  # type: ignore[attr-defined]
        else:
            report["decrypt"] = f"FAILED: {err.code.name}: {err.message}"
        return report, False
    finally:
        close()
    report["decrypt"] = f"ok, {len(plaintext)} bytes"
    report["object"] = etcd_value.describe_object(plaintext)
    if show_secret:
        report["plaintext_base64"] = base64.b64encode(plaintext).decode()
    return report, True


__all__ = ["inspect_value"]
