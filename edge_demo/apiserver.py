"""kube-apiserver's side of KMS v2, enough to store and read Secrets the way it does.

* ``sync()`` is its health loop: Status (healthz must be ``ok``, version ``v2``, key_id 1..1024
  bytes); when the key_id differs from the one the current seed was made under, a fresh 32-byte
  seed is Encrypted (the response's key_id must equal Status' key_id).
* ``write(key, object)``: per write a random 32-byte info, DEK = HKDF-SHA256-Expand(seed, info),
  AES-256-GCM with a random nonce and the etcd key as associated data; stored in etcd as
  ``k8s:enc:kms:v2:<provider>:`` + EncryptedObject.
* ``read(key, value)``: parse, look the seed up in this apiserver's cache (a restarted apiserver
  starts cold), else Decrypt through the plugin (3 s deadline, like the apiserver), then open.

The value format and the DEK derivation are kms_plugin.etcd_value's (the code ``kms-plugin
inspect`` uses), so the demo does not carry a second copy of them.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from edge_common.server import unix_channel
from edge_proto.kms.v2 import encrypted_object_pb2 as eo_pb2
from edge_proto.kms.v2 import service_pb2, service_pb2_grpc
from kms_plugin import etcd_value

RPC_TIMEOUT = 3.0  # kube-apiserver's KMS v2 call timeout
NONCE_SIZE = 12


class Refused(Exception):
    """kube-apiserver would refuse what the plugin answered."""


@dataclass(frozen=True)
class Seed:
    plaintext: bytes
    key_id: str
    ciphertext: bytes
    annotations: dict[str, bytes]


class KubeApiserver:
    def __init__(self, endpoint: str, provider: str = "edge-demo") -> None:
        self.provider = provider
        self.channel = unix_channel(endpoint)
        self.stub = service_pb2_grpc.KeyManagementServiceStub(self.channel)
        self.seed: Seed | None = None
        self.cache: dict[bytes, bytes] = {}
        self.calls: Counter[str] = Counter()

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> KubeApiserver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the health loop -------------------------------------------------------------------

    def status(self) -> service_pb2.StatusResponse:
        self.calls["Status"] += 1
        return self.stub.Status(service_pb2.StatusRequest(), timeout=RPC_TIMEOUT)

    def sync(self) -> bool:
        """One round of the apiserver's key loop; True when a new seed was made."""
        status = self.status()
        if status.version != "v2":
            raise Refused(f"Status version is {status.version!r}, not 'v2'")
        if status.healthz != "ok":
            raise Refused(f"Status healthz is {status.healthz!r}")
        if not 1 <= len(status.key_id.encode()) <= 1024:
            raise Refused("Status key_id must be 1..1024 bytes")
        if self.seed is not None and self.seed.key_id == status.key_id:
            return False
        plaintext = os.urandom(32)
        self.calls["Encrypt"] += 1
        resp = self.stub.Encrypt(
            service_pb2.EncryptRequest(plaintext=plaintext, uid=str(uuid.uuid4())),
            timeout=RPC_TIMEOUT,
        )
        if resp.key_id != status.key_id:
            raise Refused("Encrypt answered another key_id than Status")
        if not 1 <= len(resp.ciphertext) <= 1024:
            raise Refused("Encrypt ciphertext must be 1..1024 bytes")
        annotations = {k: bytes(v) for k, v in resp.annotations.items()}
        self.seed = Seed(plaintext, resp.key_id, bytes(resp.ciphertext), annotations)
        self.cache[_cache_key(self.seed.ciphertext, resp.key_id, annotations)] = plaintext
        return True

    # --- storage ---------------------------------------------------------------------------

    def write(self, etcd_key: str, data: bytes) -> bytes:
        if self.seed is None:
            self.sync()
        assert self.seed is not None
        info = os.urandom(etcd_value.INFO_SIZE)
        nonce = os.urandom(NONCE_SIZE)
        dek = etcd_value.derive_dek(self.seed.plaintext, info)
        sealed = AESGCM(dek).encrypt(nonce, data, etcd_key.encode())
        obj = eo_pb2.EncryptedObject(
            encryptedData=info + nonce + sealed,
            keyID=self.seed.key_id,
            encryptedDEKSource=self.seed.ciphertext,
            annotations=self.seed.annotations,
            encryptedDEKSourceType=eo_pb2.HKDF_SHA256_XNONCE_AES_GCM_SEED,
        )
        return f"k8s:enc:kms:v2:{self.provider}:".encode() + obj.SerializeToString()

    def read(self, etcd_key: str, raw: bytes) -> bytes:
        value = etcd_value.parse(raw)
        if value.provider != self.provider:
            raise Refused(f"written by provider {value.provider!r}, not {self.provider!r}")
        return etcd_value.decrypt(value, etcd_key, self._unwrap)

    def _unwrap(self, ciphertext: bytes, key_id: str, annotations: Mapping[str, bytes]) -> bytes:
        key = _cache_key(ciphertext, key_id, annotations)
        seed = self.cache.get(key)
        if seed is None:
            self.calls["Decrypt"] += 1
            resp = self.stub.Decrypt(
                service_pb2.DecryptRequest(ciphertext=ciphertext, key_id=key_id,
                                           annotations=dict(annotations),
                                           uid=str(uuid.uuid4())),
                timeout=RPC_TIMEOUT,
            )
            seed = bytes(resp.plaintext)
            self.cache[key] = seed
        return seed


def _cache_key(ciphertext: bytes, key_id: str, annotations: Mapping[str, bytes]) -> bytes:
    digest = hashlib.sha256()
    for part in (ciphertext, key_id.encode()):
        digest.update(len(part).to_bytes(4, "big") + part)
    for name in sorted(annotations):
        digest.update(len(name).to_bytes(4, "big") + name.encode())
        digest.update(len(annotations[name]).to_bytes(4, "big") + annotations[name])
    return digest.digest()


__all__ = ["KubeApiserver", "Refused", "Seed"]
