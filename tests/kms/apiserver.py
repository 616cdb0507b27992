"""A test client that behaves like kube-apiserver's KMS v2 envelope transformer.

Written from the apiserver's behaviour, independently of kms_plugin's own code (its HKDF is a
hand-written RFC 5869 expand over hmac), so the plugin and ``kms-plugin inspect`` are checked
against a second implementation:

* ``sync()``: Status (must be version v2, healthz ok, key_id 1..1024 bytes); when the key_id
  differs from the one of the current seed, generate a 32-byte seed and Encrypt it; the
  response's key_id must equal Status' key_id, ciphertext 1..1024 bytes, annotation keys
  fully-qualified domain names, keys + values <= 32 KiB (else the apiserver discards it).
* ``write(etcd_key, data)``: per write a random 32-byte info, DEK = HKDF-SHA256-Expand(seed,
  info), AES-256-GCM with a random 12-byte nonce and the etcd key as associated data;
  ``encryptedData = info | nonce | ct+tag``; the EncryptedObject stored behind
  ``k8s:enc:kms:v2:<provider>:``.
* ``read(etcd_key, value)``: parse, validate, look the DEK source up in this client's cache
  (a new client starts cold), else Decrypt (3 s deadline, no retry), then derive and open.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import uuid
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from edge_common.server import unix_channel
from edge_proto.kms.v2 import encrypted_object_pb2 as eo_pb2
from edge_proto.kms.v2 import service_pb2, service_pb2_grpc

DECRYPT_TIMEOUT = 3.0
_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class ApiserverRefused(Exception):
    """The apiserver would refuse what the plugin answered."""


def hkdf_sha256_expand(prk: bytes, info: bytes, length: int = 32) -> bytes:
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out += block
        counter += 1
    return out[:length]


def is_fqdn(name: str) -> bool:
    name = name[:-1] if name.endswith(".") else name
    labels = name.split(".")
    return (
        0 < len(name) <= 253
        and len(labels) >= 2
        and all(len(x) <= 63 and _LABEL.match(x) for x in labels)
    )


def check_annotations(annotations: Mapping[str, bytes]) -> None:
    total = 0
    for key, value in annotations.items():
        if not is_fqdn(key):
            raise ApiserverRefused(f"annotation key {key!r} is not a fully qualified domain name")
        total += len(key.encode()) + len(value)
    if total > 32 * 1024:
        raise ApiserverRefused(f"annotations are {total} bytes, more than 32 KiB")


@dataclass
class SeedState:
    seed: bytes
    key_id: str
    ciphertext: bytes
    annotations: dict[str, bytes]


class FakeApiserver:
    def __init__(self, endpoint: str, provider: str = "edge-kms") -> None:
        self.endpoint = endpoint
        self.provider = provider
        self.channel = unix_channel(endpoint)
        self.stub = service_pb2_grpc.KeyManagementServiceStub(self.channel)
        self.state: SeedState | None = None
        self.cache: dict[bytes, bytes] = {}  # cache key -> unwrapped seed
        self.calls: Counter[str] = Counter()

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> FakeApiserver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the health loop -----------------------------------------------------------------

    def status(self) -> service_pb2.StatusResponse:
        self.calls["Status"] += 1
        return self.stub.Status(service_pb2.StatusRequest(), timeout=DECRYPT_TIMEOUT)

    def sync(self) -> SeedState:
        status = self.status()
        if status.version != "v2":
            raise ApiserverRefused(f"Status version {status.version!r}")
        if status.healthz != "ok":
            raise ApiserverRefused(f"Status healthz {status.healthz!r}")
        if not 1 <= len(status.key_id.encode()) <= 1024:
            raise ApiserverRefused("Status key_id length out of range")
        if self.state is not None and self.state.key_id == status.key_id:
            return self.state
        seed = os.urandom(32)
        self.calls["Encrypt"] += 1
        resp = self.stub.Encrypt(
            service_pb2.EncryptRequest(plaintext=seed, uid=str(uuid.uuid4())),
            timeout=DECRYPT_TIMEOUT,
        )
        if resp.key_id != status.key_id:
            raise ApiserverRefused("Encrypt key_id differs from Status key_id")
        if not 1 <= len(resp.ciphertext) <= 1024:
            raise ApiserverRefused("Encrypt ciphertext length out of range")
        annotations = {k: bytes(v) for k, v in resp.annotations.items()}
        check_annotations(annotations)
        self.state = SeedState(seed, resp.key_id, bytes(resp.ciphertext), annotations)
        self.cache[self._cache_key(self.state.ciphertext, resp.key_id, annotations)] = seed
        return self.state

    # --- storage -------------------------------------------------------------------------

    def write(self, etcd_key: str, data: bytes) -> bytes:
        state = self.state or self.sync()
        info = os.urandom(32)
        dek = hkdf_sha256_expand(state.seed, info)
        nonce = os.urandom(12)
        sealed = AESGCM(dek).encrypt(nonce, data, etcd_key.encode())
        obj = eo_pb2.EncryptedObject(
            encryptedData=info + nonce + sealed,
            keyID=state.key_id,
            encryptedDEKSource=state.ciphertext,
            annotations=state.annotations,
            encryptedDEKSourceType=eo_pb2.HKDF_SHA256_XNONCE_AES_GCM_SEED,
        )
        return f"k8s:enc:kms:v2:{self.provider}:".encode() + obj.SerializeToString()

    @staticmethod
    def parse(value: bytes, provider: str) -> eo_pb2.EncryptedObject:
        prefix = f"k8s:enc:kms:v2:{provider}:".encode()
        if not value.startswith(prefix):
            raise ApiserverRefused("no KMS v2 prefix for this provider")
        obj = eo_pb2.EncryptedObject()
        obj.ParseFromString(value[len(prefix) :])
        return obj

    @staticmethod
    def _cache_key(source: bytes, key_id: str, annotations: Mapping[str, bytes]) -> bytes:
        h = hashlib.sha256()
        for part in (source, key_id.encode()):
            h.update(len(part).to_bytes(4, "big") + part)
        for k in sorted(annotations):
            h.update(len(k).to_bytes(4, "big") + k.encode())
            h.update(len(annotations[k]).to_bytes(4, "big") + annotations[k])
        return h.digest()

    def unwrap(self, obj: eo_pb2.EncryptedObject) -> bytes:
        annotations = {k: bytes(v) for k, v in obj.annotations.items()}
        check_annotations(annotations)
        key = self._cache_key(obj.encryptedDEKSource, obj.keyID, annotations)
        seed = self.cache.get(key)
        if seed is None:
            self.calls["Decrypt"] += 1
            resp = self.stub.Decrypt(
                service_pb2.DecryptRequest(
                    ciphertext=obj.encryptedDEKSource,
                    key_id=obj.keyID,
                    annotations=annotations,
                    uid=str(uuid.uuid4()),
                ),
                timeout=DECRYPT_TIMEOUT,
            )
            seed = bytes(resp.plaintext)
            self.cache[key] = seed
        return seed

    def read(self, etcd_key: str, value: bytes) -> bytes:
        obj = self.parse(value, self.provider)
        if obj.encryptedDEKSourceType != eo_pb2.HKDF_SHA256_XNONCE_AES_GCM_SEED:
            raise ApiserverRefused("unexpected DEK source type")
        seed = self.unwrap(obj)
        data = obj.encryptedData
        info, nonce, sealed = data[:32], data[32:44], data[44:]
        return AESGCM(hkdf_sha256_expand(seed, info)).decrypt(nonce, sealed, etcd_key.encode())


__all__ = ["ApiserverRefused", "FakeApiserver", "SeedState", "hkdf_sha256_expand", "is_fqdn"]
