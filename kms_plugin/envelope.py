"""The plugin's wire formats, versioned and strictly parsed.

Three records leave the plugin and come back later, possibly to another plugin process on
another control-plane node, so everything needed to read them travels inside them:

* the **local-KEK record** (:class:`KekRecord`): the local key-encryption key wrapped by the
  backend's root key, plus the name of that root key version.  It rides in the Encrypt
  response as the annotation :data:`ANNOTATION_KEY` and is stored by kube-apiserver in clear.
* the **v2 ciphertext** (:class:`SealedSeed`): the apiserver's 32-byte DEK seed sealed with
  the local KEK (AES-256-GCM, random 96-bit nonce).  The associated data binds the format
  version, the local KEK id and the key_id, so a changed key_id or a record swapped in from
  another object cannot open it.
* the **v1beta1 blob** (:class:`LegacyBlob`): KMS v1 has no key_id and no annotations, so the
  blob carries the key_id and the local-KEK record itself, then the sealed plaintext.

Layouts (all integers big-endian, ``lp16(x)`` = 2-byte length then bytes)::

    KekRecord  = 0x01 | kek_id[16] | lp8(backend) | lp16(key_ref) | lp16(version) | lp16(wrapped)
    SealedSeed = 0x01 | kek_id[16] | nonce[12] | AES-GCM(kek, plaintext, aad) (ciphertext+tag)
    LegacyBlob = 0x01 | lp16(key_id) | lp16(kek_record) | nonce[12] | AES-GCM(kek, plaintext, aad)

As in Fernet, parsing rejects anything malformed before a key is touched, and there is one
exception type, :class:`EnvelopeError`, for every way an input can be bad; its message is
the same for every cause (the cause is kept in ``reason`` for debug logs only).
"""

from __future__ import annotations

import functools
import hashlib
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass

from kms_plugin.backends.base import RootKeyVersion

FORMAT_V1 = 0x01
ANNOTATION_KEY = "kek.kms-plugin.edge.io"
KEK_ID_SIZE = 16
NONCE_SIZE = 12
TAG_SIZE = 16
KEY_SIZE = 32

# kube-apiserver limits (k8s.io/apiserver .../envelope/kmsv2)
CIPHERTEXT_MAX = 1024
KEY_ID_MAX = 1024
ANNOTATIONS_MAX_TOTAL = 32 * 1024

# our own limits on the record fields (generous for ARNs and HSM labels, small enough that
# the record stays far below the annotation limit)
BACKEND_NAME_MAX = 64
KEY_REF_MAX = 2048
VERSION_MAX = 512
WRAPPED_MAX = 6144

_AAD_SEED = b"kms-plugin.edge.io/v2-ciphertext\x00"
_AAD_LEGACY = b"kms-plugin.edge.io/v1beta1-blob\x00"
_KEY_ID_DOMAIN = b"kms-plugin.edge.io/key-id\x00"
_BACKEND_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]*$")

_SEED_HEADER = 1 + KEK_ID_SIZE + NONCE_SIZE
_SEED_MIN = _SEED_HEADER + TAG_SIZE + 1
MAX_SEALED_PLAINTEXT = CIPHERTEXT_MAX - _SEED_HEADER - TAG_SIZE


class EnvelopeError(Exception):
    """Any malformed, oversized, unauthentic or mismatched ciphertext, key_id or annotation."""

    MESSAGE = "invalid ciphertext, key_id or annotations"

    def __init__(self, reason: str = "") -> None:
        super().__init__(self.MESSAGE)
        self.reason = reason


def _lp8(data: bytes) -> bytes:
    return struct.pack(">B", len(data)) + data


def _lp16(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


class _Reader:
    """A cursor over bytes; every short read is an :class:`EnvelopeError`."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def take(self, n: int) -> bytes:
        if n < 0 or self._pos + n > len(self._data):
            raise EnvelopeError("truncated")
        out = self._data[self._pos : self._pos + n]
        self._pos += n
        return out

    def byte(self) -> int:
        return self.take(1)[0]

    def lp8(self) -> bytes:
        return self.take(self.byte())

    def lp16(self) -> bytes:
        (n,) = struct.unpack(">H", self.take(2))
        return self.take(n)

    def rest(self) -> bytes:
        out = self._data[self._pos :]
        self._pos = len(self._data)
        return out

    def end(self) -> None:
        if self._pos != len(self._data):
            raise EnvelopeError("trailing bytes")


def _text(raw: bytes, limit: int, what: str) -> str:
    if not 1 <= len(raw) <= limit:
        raise EnvelopeError(f"{what} length out of range")
    try:
        return raw.decode("utf-8", "strict")
    except UnicodeDecodeError as exc:
        raise EnvelopeError(f"{what} is not UTF-8") from exc


def derive_key_id(backend: str, key: RootKeyVersion) -> str:
    """The key_id reported to kube-apiserver for root key ``key`` of backend ``backend``.

    A hash of (backend, key_ref, version): stable while the root key version is unchanged,
    different for every other version (backends never reuse a version for a key_ref), 1..1024
    bytes, and without key material.  ``kms-plugin inspect`` shows the readable parts.
    """
    material = (
        _KEY_ID_DOMAIN
        + _lp16(backend.encode())
        + _lp16(key.key_ref.encode())
        + _lp16(key.version.encode())
    )
    return f"kp1:{backend}:{hashlib.sha256(material).hexdigest()[:40]}"


def key_id_hash(key_id: str) -> str:
    """The form kube-apiserver logs key ids in (``sha256:<hex>``); safe for metric labels."""
    return "sha256:" + hashlib.sha256(key_id.encode()).hexdigest()


def local_kek_context(kek_id: bytes) -> dict[str, str]:
    """The context the backend binds to a wrapped local KEK (AAD / EncryptionContext)."""
    return {"kms-plugin.edge.io/purpose": "local-kek-v1", "kms-plugin.edge.io/kek-id": kek_id.hex()}


@dataclass(frozen=True)
class KekRecord:
    """A local KEK wrapped by a backend root key version (the annotation value)."""

    kek_id: bytes
    backend: str
    root: RootKeyVersion
    wrapped: bytes

    def __post_init__(self) -> None:
        if len(self.kek_id) != KEK_ID_SIZE:
            raise EnvelopeError("kek id size")
        if not (
            len(self.backend) <= BACKEND_NAME_MAX and _BACKEND_NAME_RE.match(self.backend)
        ):
            raise EnvelopeError("backend name")
        if not 1 <= len(self.root.key_ref.encode()) <= KEY_REF_MAX:
            raise EnvelopeError("key_ref length out of range")
        if not 1 <= len(self.root.version.encode()) <= VERSION_MAX:
            raise EnvelopeError("version length out of range")
        if not 1 <= len(self.wrapped) <= WRAPPED_MAX:
            raise EnvelopeError("wrapped length out of range")

    @functools.cached_property
    def key_id(self) -> str:
        return derive_key_id(self.backend, self.root)

    def encode(self) -> bytes:
        return (
            bytes([FORMAT_V1])
            + self.kek_id
            + _lp8(self.backend.encode())
            + _lp16(self.root.key_ref.encode())
            + _lp16(self.root.version.encode())
            + _lp16(self.wrapped)
        )

    @classmethod
    def decode(cls, data: bytes) -> KekRecord:
        if not isinstance(data, bytes | bytearray) or not data:
            raise EnvelopeError("empty record")
        r = _Reader(bytes(data))
        if r.byte() != FORMAT_V1:
            raise EnvelopeError("record version")
        kek_id = r.take(KEK_ID_SIZE)
        backend = _text(r.lp8(), BACKEND_NAME_MAX, "backend")
        key_ref = _text(r.lp16(), KEY_REF_MAX, "key_ref")
        version = _text(r.lp16(), VERSION_MAX, "version")
        wrapped = r.lp16()
        r.end()
        return cls(kek_id, backend, RootKeyVersion(key_ref, version), wrapped)


# --- the hot path: split without building objects ----------------------------------------
# Decrypt of a local KEK this process already holds (kms_plugin.keys) compares the parts with
# what was checked when the KEK was cached, so it needs only these splits: length, version,
# bounds.  Everything else is parsed strictly (the classes below) on the way into the cache.

_NONCE_AT = 1 + KEK_ID_SIZE


def seed_header(kek_id: bytes) -> bytes:
    """The bytes a v2 ciphertext sealed with local KEK ``kek_id`` starts with."""
    return bytes([FORMAT_V1]) + kek_id


def legacy_header(key_id: str, record: bytes) -> bytes:
    """The bytes a v1beta1 blob under ``key_id`` and local-KEK ``record`` starts with."""
    return bytes([FORMAT_V1]) + _lp16(key_id.encode()) + _lp16(record)


def split_seed(data: bytes) -> tuple[bytes, bytes, bytes]:
    """(kek_id, nonce, sealed) of a v2 ciphertext: length and version checked, nothing else."""
    if not _SEED_MIN <= len(data) <= CIPHERTEXT_MAX:
        raise EnvelopeError("ciphertext length out of range")
    if data[0] != FORMAT_V1:
        raise EnvelopeError("ciphertext version")
    return data[1:_NONCE_AT], data[_NONCE_AT:_SEED_HEADER], data[_SEED_HEADER:]


def split_legacy(data: bytes) -> tuple[bytes, bytes, bytes, bytes]:
    """(key_id as bytes, local-KEK record, nonce, sealed) of a v1beta1 blob: version and
    bounds checked; the key_id's text and the record are not parsed here."""
    size = len(data)
    if not size:
        raise EnvelopeError("empty blob")
    if data[0] != FORMAT_V1:
        raise EnvelopeError("blob version")
    if size < 3:
        raise EnvelopeError("truncated")
    key_end = 3 + ((data[1] << 8) | data[2])
    if key_end + 2 > size:
        raise EnvelopeError("truncated")
    record_end = key_end + 2 + ((data[key_end] << 8) | data[key_end + 1])
    nonce_end = record_end + NONCE_SIZE
    if size - nonce_end < TAG_SIZE + 1:
        raise EnvelopeError("truncated or sealed part too short")
    record = data[key_end + 2 : record_end]
    return data[3:key_end], record, data[record_end:nonce_end], data[nonce_end:]


def _seed_aad(kek_id: bytes, key_id: str) -> bytes:
    return _AAD_SEED + bytes([FORMAT_V1]) + kek_id + _lp16(key_id.encode())


def _legacy_aad(kek_id: bytes, key_id: str) -> bytes:
    return _AAD_LEGACY + bytes([FORMAT_V1]) + kek_id + _lp16(key_id.encode())


@dataclass(frozen=True)
class SealedSeed:
    """The v2 Encrypt ciphertext, parsed (not yet opened)."""

    kek_id: bytes
    nonce: bytes
    sealed: bytes

    def encode(self) -> bytes:
        return seed_header(self.kek_id) + self.nonce + self.sealed

    @classmethod
    def decode(cls, data: bytes) -> SealedSeed:
        return cls(*split_seed(bytes(data)))

    @staticmethod
    def aad(kek_id: bytes, key_id: str) -> bytes:
        return _seed_aad(kek_id, key_id)


@dataclass(frozen=True)
class LegacyBlob:
    """The v1beta1 Encrypt ciphertext: key_id, local-KEK record and sealed plaintext."""

    key_id: str
    record: bytes
    nonce: bytes
    sealed: bytes

    def encode(self) -> bytes:
        return legacy_header(self.key_id, self.record) + self.nonce + self.sealed

    @classmethod
    def decode(cls, data: bytes) -> LegacyBlob:
        key_id, record, nonce, sealed = split_legacy(bytes(data))
        return cls(_text(key_id, KEY_ID_MAX, "key_id"), record, nonce, sealed)

    @staticmethod
    def aad(kek_id: bytes, key_id: str) -> bytes:
        return _legacy_aad(kek_id, key_id)


# --- kube-apiserver's validation rules --------------------------------------------------

_DNS_LABEL_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def is_fully_qualified_domain_name(name: str) -> bool:
    """kube-apiserver's IsFullyQualifiedDomainName: lowercase RFC 1123, >= 2 labels."""
    if not name:
        return False
    if name.endswith("."):
        name = name[:-1]
    if len(name) > 253:
        return False
    labels = name.split(".")
    if len(labels) < 2:
        return False
    return all(len(label) <= 63 and _DNS_LABEL_RE.match(label) for label in labels)


def annotation_problems(annotations: Mapping[str, bytes]) -> list[str]:
    """Why kube-apiserver would refuse these annotations (empty list: it accepts them)."""
    problems = []
    total = 0
    for key, value in annotations.items():
        if not is_fully_qualified_domain_name(key):
            problems.append(f"annotation key {key!r} is not a fully qualified domain name")
        total += len(key.encode()) + len(value)
    if total > ANNOTATIONS_MAX_TOTAL:
        problems.append(f"annotations total {total} bytes > {ANNOTATIONS_MAX_TOTAL}")
    return problems


def validate_key_id(key_id: str) -> None:
    if not 1 <= len(key_id.encode()) <= KEY_ID_MAX:
        raise EnvelopeError("key_id length out of range")


@dataclass(frozen=True)
class DecryptInput:
    """A v2 Decrypt request after strict validation; ready for the key manager."""

    sealed: SealedSeed
    record: KekRecord
    record_bytes: bytes
    key_id: str


@functools.lru_cache(maxsize=1024)
def decode_record(data: bytes) -> KekRecord:
    """KekRecord.decode, memoised: the same few records come back on every Decrypt."""
    return KekRecord.decode(data)


def parse_decrypt_request(
    ciphertext: bytes, key_id: str, annotations: Mapping[str, bytes]
) -> DecryptInput:
    """Validate a v2 Decrypt request before any key is used.

    Rules: ciphertext 1..1024 bytes in our format; key_id 1..1024 bytes; annotations exactly
    ``{ANNOTATION_KEY: record}`` (a valid FQDN key) within kube-apiserver's 32 KiB; the
    record's local KEK id is the ciphertext's; the key_id is the one derived from the
    record's root key version.
    """
    validate_key_id(key_id)
    sealed = SealedSeed.decode(ciphertext)
    if len(annotations) != 1 or ANNOTATION_KEY not in annotations:
        raise EnvelopeError("unexpected annotation keys")
    record_bytes = bytes(annotations[ANNOTATION_KEY])
    if len(ANNOTATION_KEY) + len(record_bytes) > ANNOTATIONS_MAX_TOTAL:
        raise EnvelopeError("annotations too large")
    record = decode_record(record_bytes)
    if record.kek_id != sealed.kek_id:
        raise EnvelopeError("ciphertext and record name different local KEKs")
    if record.key_id != key_id:
        raise EnvelopeError("key_id does not match the record's root key")
    return DecryptInput(sealed, record, record_bytes, key_id)


def parse_legacy_blob(blob: bytes) -> tuple[LegacyBlob, KekRecord]:
    """Validate a v1beta1 Decrypt input before any key is used."""
    legacy = LegacyBlob.decode(blob)
    record = decode_record(legacy.record)
    if record.key_id != legacy.key_id:
        raise EnvelopeError("key_id does not match the record's root key")
    return legacy, record


__all__ = [
    "ANNOTATION_KEY",
    "DecryptInput",
    "EnvelopeError",
    "KekRecord",
    "LegacyBlob",
    "SealedSeed",
    "annotation_problems",
    "derive_key_id",
    "is_fully_qualified_domain_name",
    "key_id_hash",
    "local_kek_context",
    "parse_decrypt_request",
    "legacy_header",
    "parse_legacy_blob",
    "seed_header",
    "split_legacy",
    "split_seed",
    "validate_key_id",
]
