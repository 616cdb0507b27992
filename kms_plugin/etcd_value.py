"""kube-apiserver's KMS v2 record in etcd, read the way the apiserver reads it.

Layout (k8s.io/apiserver storage/value/encrypt/envelope/kmsv2)::

    value         = "k8s:enc:kms:v2:" <provider name> ":" EncryptedObject (protobuf)
    EncryptedObject.encryptedDEKSource = the plugin's Encrypt ciphertext (seed or DEK, wrapped)
    EncryptedObject.keyID, .annotations = the plugin's Encrypt key_id and annotations

    HKDF_SHA256_XNONCE_AES_GCM_SEED (the default since Kubernetes 1.29):
        encryptedData = info[32] | nonce[12] | AES-256-GCM(dek, object, aad=etcd key) | tag
        dek           = HKDF-Expand(SHA-256, prk=seed, info, 32 bytes)   (no Extract step)
    AES_GCM_KEY (older):
        encryptedData = nonce[12] | AES-256-GCM(dek=the unwrapped source, object, aad) | tag

The associated data is the etcd key of the object, e.g. ``/registry/secrets/default/db``.
Used by ``kms-plugin inspect`` (operators: is encryption on, can this node read it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand
from google.protobuf.message import DecodeError

from edge_proto.kms.v2 import encrypted_object_pb2 as eo_pb2
from kms_plugin.envelope import annotation_problems

PREFIX = b"k8s:enc:kms:v2:"
INFO_SIZE = 32
NONCE_SIZE = 12
SEED_TYPE = "HKDF_SHA256_XNONCE_AES_GCM_SEED"
KEY_TYPE = "AES_GCM_KEY"


class EtcdValueError(Exception):
    """Not a KMS v2 value, or a malformed one (the message says which)."""


@dataclass(frozen=True)
class KmsV2Value:
    provider: str
    key_id: str
    dek_source_type: str  # SEED_TYPE | KEY_TYPE
    encrypted_dek_source: bytes
    annotations: dict[str, bytes]
    encrypted_data: bytes


def parse(raw: bytes) -> KmsV2Value:
    """Split and validate a raw etcd value (the checks of ValidateEncryptedObject)."""
    if not raw.startswith(PREFIX):
        if raw.startswith(b"k8s:enc:"):
            other = b":".join(raw.split(b":", 4)[:4]).decode(errors="replace")
            raise EtcdValueError(f"encrypted with another provider type ({other})")
        raise EtcdValueError("not encrypted by a KMS v2 provider (no k8s:enc:kms:v2: prefix)")
    rest = raw[len(PREFIX) :]
    name, sep, payload = rest.partition(b":")
    if not sep or not name:
        raise EtcdValueError("missing provider name")
    obj = eo_pb2.EncryptedObject()
    try:
        obj.ParseFromString(payload)
    except DecodeError as exc:
        raise EtcdValueError(f"EncryptedObject does not parse: {exc}") from None
    types = {eo_pb2.AES_GCM_KEY: KEY_TYPE, eo_pb2.HKDF_SHA256_XNONCE_AES_GCM_SEED: SEED_TYPE}
    if obj.encryptedDEKSourceType not in types:
        raise EtcdValueError(f"unknown encryptedDEKSourceType {obj.encryptedDEKSourceType}")
    if not obj.encryptedData:
        raise EtcdValueError("encryptedData is empty")
    if not 1 <= len(obj.encryptedDEKSource) <= 1024:
        raise EtcdValueError("encryptedDEKSource must be 1..1024 bytes")
    if not 1 <= len(obj.keyID.encode()) <= 1024:
        raise EtcdValueError("keyID must be 1..1024 bytes")
    annotations = {k: bytes(v) for k, v in obj.annotations.items()}
    problems = annotation_problems(annotations)
    if problems:
        raise EtcdValueError("; ".join(problems))
    return KmsV2Value(
        provider=name.decode("utf-8", "replace"),
        key_id=obj.keyID,
        dek_source_type=types[obj.encryptedDEKSourceType],
        encrypted_dek_source=bytes(obj.encryptedDEKSource),
        annotations=annotations,
        encrypted_data=bytes(obj.encryptedData),
    )


def derive_dek(seed: bytes, info: bytes) -> bytes:
    """HKDF-SHA256 *expand only* of the seed with the per-write info (as the apiserver does)."""
    return HKDFExpand(algorithm=hashes.SHA256(), length=32, info=info).derive(seed)


def open_data(value: KmsV2Value, dek_source: bytes, etcd_key: str) -> bytes:
    """Decrypt encryptedData with the unwrapped DEK source; the etcd key is the AAD."""
    data = value.encrypted_data
    aad = etcd_key.encode()
    if value.dek_source_type == SEED_TYPE:
        if len(dek_source) < 32:
            raise EtcdValueError("seed shorter than 32 bytes")
        if len(data) < INFO_SIZE + NONCE_SIZE + 16:
            raise EtcdValueError("encryptedData too short")
        info, data = data[:INFO_SIZE], data[INFO_SIZE:]
        key = derive_dek(dek_source, info)
    else:
        key = dek_source
        if len(data) < NONCE_SIZE + 16:
            raise EtcdValueError("encryptedData too short")
    try:
        return AESGCM(key).decrypt(data[:NONCE_SIZE], data[NONCE_SIZE:], aad)
    except (InvalidTag, ValueError):
        raise EtcdValueError(
            "the data does not authenticate: wrong etcd key, or the value was altered"
        ) from None


def decrypt(
    value: KmsV2Value,
    etcd_key: str,
    unwrap: Callable[[bytes, str, Mapping[str, bytes]], bytes],
) -> bytes:
    """Unwrap the DEK source with ``unwrap(ciphertext, key_id, annotations)`` then open."""
    source = unwrap(value.encrypted_dek_source, value.key_id, value.annotations)
    return open_data(value, source, etcd_key)


def describe_object(plaintext: bytes) -> dict[str, str]:
    """apiVersion/kind of a decrypted object (protobuf 'k8s\\0' envelope or JSON), no data."""
    if plaintext.startswith(b"k8s\x00"):
        unknown = _fields(plaintext[4:])
        type_meta = _fields(unknown.get(1, b""))
        return {
            "encoding": "protobuf",
            "apiVersion": type_meta.get(1, b"").decode("utf-8", "replace"),
            "kind": type_meta.get(2, b"").decode("utf-8", "replace"),
        }
    if plaintext.lstrip().startswith(b"{"):
        import json

        try:
            doc = json.loads(plaintext)
            return {
                "encoding": "json",
                "apiVersion": str(doc.get("apiVersion", "")),
                "kind": str(doc.get("kind", "")),
            }
        except (ValueError, AttributeError):
            pass
    return {"encoding": "unknown"}


def _fields(buf: bytes) -> dict[int, bytes]:
    """Length-delimited fields of a protobuf message (first occurrence); enough for TypeMeta."""
    out: dict[int, bytes] = {}
    i = 0
    try:
        while i < len(buf):
            tag, i = _varint(buf, i)
            field, wire = tag >> 3, tag & 7
            if wire == 2:
                n, i = _varint(buf, i)
                out.setdefault(field, buf[i : i + n])
                i += n
            elif wire == 0:
                _, i = _varint(buf, i)
            elif wire == 1:
                i += 8
            elif wire == 5:
                i += 4
            else:
                break
    except IndexError:
        pass
    return out


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7


__all__ = ["EtcdValueError", "KmsV2Value", "decrypt", "derive_dek", "describe_object",
           "open_data", "parse"]
