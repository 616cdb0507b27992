"""The fake KMS's keys and operations: an in-memory model of the AWS KMS subset we use.

Symmetric keys only (``SYMMETRIC_DEFAULT``, ``ENCRYPT_DECRYPT``).  Each key keeps every key
material it ever had; Encrypt uses the current one, Decrypt the one named in the blob, so
ciphertexts made before a rotation still decrypt.

Ciphertext blob format (ours, version 1)::

    b"FK" | 0x01 | key uuid (16 bytes) | material ordinal (u32 BE) | nonce (12) | AES-256-GCM ct+tag

The associated data is everything before the nonce followed by the canonical JSON of the
EncryptionContext (sorted keys, no spaces, UTF-8), so a blob decrypts only under the same
context and only as the key and material it names.  Every way a blob can be bad yields the
same ``InvalidCiphertextException``.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import struct
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fake_kms.profiles import AWS, EmulationProfile, RotationStatusStyle

MAGIC = b"FK"
BLOB_VERSION = 1
_HEADER = struct.Struct(">2sB16sI")
_NONCE = 12
_TAG = 16
MAX_PLAINTEXT = 4096
MAX_CIPHERTEXT = 6144
DEFAULT_ACCOUNT = "111122223333"


class KmsApiError(Exception):
    """An AWS-style error answer: ``{"__type": error_type, "message": message}``."""

    def __init__(self, error_type: str, message: str, status: int = 400) -> None:
        super().__init__(f"{error_type}: {message}")
        self.error_type = error_type
        self.message = message
        self.status = status


def _validation(message: str) -> KmsApiError:
    return KmsApiError("ValidationException", message)


@dataclass
class FakeKey:
    key_id: str
    arn: str
    description: str
    creation_date: float
    materials: list[tuple[str, bytes]] = field(default_factory=list, repr=False)
    state: str = "Enabled"
    rotation_enabled: bool = False
    rotation_period_days: int = 365
    rotations: list[dict[str, Any]] = field(default_factory=list)
    deletion_date: float | None = None
    pending_window_days: int | None = None
    reported_material_id: str = ""  # what DescribeKey says (an emulator may lag behind)

    @property
    def current_material_id(self) -> str:
        return self.materials[-1][0]


def _new_material() -> tuple[str, bytes]:
    return os.urandom(32).hex(), AESGCM.generate_key(bit_length=256)


def canonical_context(context: Mapping[str, str]) -> bytes:
    return json.dumps(
        dict(sorted(context.items())), separators=(",", ":"), ensure_ascii=False
    ).encode("utf-8")


class KeyStore:
    """Thread-safe key store and operation implementations (parameters are AWS JSON)."""

    def __init__(
        self,
        region: str = "us-east-1",
        account_id: str = DEFAULT_ACCOUNT,
        *,
        report_key_material_id: bool = True,
        clock: Callable[[], float] = time.time,
        profile: EmulationProfile = AWS,
    ) -> None:
        self.region = region
        self.account_id = account_id
        self.report_key_material_id = report_key_material_id
        self.profile = profile
        self._clock = clock
        self._lock = threading.RLock()
        self._keys: dict[str, FakeKey] = {}
        self._aliases: dict[str, str] = {}
        self._purged: set[str] = set()

    # -- key lookup -------------------------------------------------------------------------

    def _arn(self, key_id: str) -> str:
        return f"arn:aws:kms:{self.region}:{self.account_id}:key/{key_id}"

    def _resolve(self, ref: object) -> FakeKey:
        if not isinstance(ref, str) or not ref:
            raise _validation("KeyId is required")
        key_id: str | None = ref
        prefix = f"arn:aws:kms:{self.region}:{self.account_id}:"
        if ref.startswith("arn:"):
            if not ref.startswith(prefix):
                raise KmsApiError("NotFoundException", f"Invalid arn {ref}")
            ref = ref[len(prefix) :]
            if ref.startswith("key/"):
                key_id = ref[4:]
            elif ref.startswith("alias/"):
                key_id = self._aliases.get(ref)
            else:
                key_id = None
        elif ref.startswith("alias/"):
            key_id = self._aliases.get(ref)
        if key_id is None:
            raise KmsApiError("NotFoundException", f"Alias {ref} is not found.")
        key = self._keys.get(key_id)
        if key is None:
            raise KmsApiError("NotFoundException", f"Key '{self._arn(key_id)}' does not exist")
        return key

    def _require_usable(self, key: FakeKey, *, crypto: bool = False) -> None:
        if crypto and self.profile.disabled_key_usable:
            return  # moto: only DescribeKey shows the state
        if key.state == "Disabled":
            raise KmsApiError("DisabledException", f"{key.arn} is disabled.")
        if key.state != "Enabled":
            raise KmsApiError("KMSInvalidStateException", f"{key.arn} is pending deletion.")

    def get(self, ref: str) -> FakeKey:
        with self._lock:
            return self._resolve(ref)

    # -- operations -------------------------------------------------------------------------

    def create_key(self, params: Mapping[str, Any]) -> dict[str, Any]:
        usage = params.get("KeyUsage", "ENCRYPT_DECRYPT")
        spec = params.get("KeySpec") or params.get("CustomerMasterKeySpec") or "SYMMETRIC_DEFAULT"
        if usage != "ENCRYPT_DECRYPT" or spec != "SYMMETRIC_DEFAULT":
            raise KmsApiError(
                "UnsupportedOperationException",
                "the fake KMS supports SYMMETRIC_DEFAULT ENCRYPT_DECRYPT keys only",
            )
        description = params.get("Description", "")
        if not isinstance(description, str):
            raise _validation("Description must be a string")
        key_id = str(uuid.uuid4())
        key = FakeKey(
            key_id=key_id,
            arn=self._arn(key_id),
            description=description,
            creation_date=self._clock(),
            materials=[_new_material()],
        )
        key.reported_material_id = key.current_material_id
        with self._lock:
            self._keys[key_id] = key
            return {"KeyMetadata": self._metadata(key)}

    def _metadata(self, key: FakeKey) -> dict[str, Any]:
        profile = self.profile
        meta: dict[str, Any] = {
            "AWSAccountId": self.account_id,
            "KeyId": key.key_id,
            "Arn": key.arn,
            "CreationDate": key.creation_date,
            "Enabled": key.state == "Enabled",
            "Description": key.description,
            "KeyUsage": "ENCRYPT_DECRYPT",
            "KeyState": key.state,
            "Origin": "AWS_KMS",
            "KeyManager": "CUSTOMER",
            "CustomerMasterKeySpec": "SYMMETRIC_DEFAULT",
            "KeySpec": "SYMMETRIC_DEFAULT",
            "EncryptionAlgorithms": ["SYMMETRIC_DEFAULT"],
            "MultiRegion": False,
        }
        if profile.minimal_fields:  # local-kms: Go struct, no KeySpec, null description
            for name in ("CustomerMasterKeySpec", "KeySpec", "EncryptionAlgorithms", "MultiRegion"):
                del meta[name]
            meta["CreationDate"] = int(key.creation_date)
            meta["Description"] = key.description or None
        if profile.null_fields:  # moto: optional fields present as null
            meta.update({"MultiRegion": None, "SigningAlgorithms": None})
            meta["Description"] = key.description or None
        if self.report_key_material_id:
            meta["CurrentKeyMaterialId"] = key.reported_material_id
        if key.deletion_date is not None:
            meta["DeletionDate"] = key.deletion_date
            meta["PendingDeletionWindowInDays"] = key.pending_window_days
        return meta

    def describe_key(self, params: Mapping[str, Any]) -> dict[str, Any]:
        with self._lock:
            return {"KeyMetadata": self._metadata(self._resolve(params.get("KeyId")))}

    def enable_key(self, params: Mapping[str, Any]) -> dict[str, Any]:
        with self._lock:
            key = self._resolve(params.get("KeyId"))
            if key.state == "PendingDeletion":
                raise KmsApiError("KMSInvalidStateException", f"{key.arn} is pending deletion.")
            key.state = "Enabled"
        return {}

    def disable_key(self, params: Mapping[str, Any]) -> dict[str, Any]:
        with self._lock:
            key = self._resolve(params.get("KeyId"))
            if key.state == "PendingDeletion":
                raise KmsApiError("KMSInvalidStateException", f"{key.arn} is pending deletion.")
            key.state = "Disabled"
        return {}

    def schedule_key_deletion(self, params: Mapping[str, Any]) -> dict[str, Any]:
        days = params.get("PendingWindowInDays", 30)
        if not isinstance(days, int) or isinstance(days, bool) or not 7 <= days <= 30:
            raise _validation("PendingWindowInDays must be between 7 and 30")
        with self._lock:
            key = self._resolve(params.get("KeyId"))
            if key.state == "PendingDeletion":
                raise KmsApiError("KMSInvalidStateException", f"{key.arn} is pending deletion.")
            key.state = "PendingDeletion"
            key.pending_window_days = days
            key.deletion_date = self._clock() + days * 86400
            return {
                "KeyId": key.arn,
                "DeletionDate": key.deletion_date,
                "KeyState": key.state,
                "PendingWindowInDays": days,
            }

    def cancel_key_deletion(self, params: Mapping[str, Any]) -> dict[str, Any]:
        with self._lock:
            key = self._resolve(params.get("KeyId"))
            if key.state != "PendingDeletion":
                raise KmsApiError("KMSInvalidStateException", f"{key.arn} is not pending deletion.")
            key.state = "Disabled"  # as AWS does: re-enable explicitly
            key.deletion_date = None
            key.pending_window_days = None
            return {"KeyId": key.arn}

    def purge_key(self, ref: str) -> str:
        """Complete a deletion now (not an AWS operation): the key is gone for good."""
        with self._lock:
            key = self._resolve(ref)
            del self._keys[key.key_id]
            self._purged.add(key.key_id)
            for alias in [a for a, target in self._aliases.items() if target == key.key_id]:
                del self._aliases[alias]
            return key.arn

    def rotate_key_on_demand(self, params: Mapping[str, Any]) -> dict[str, Any]:
        limit = self.profile.on_demand_rotation_limit
        with self._lock:
            key = self._resolve(params.get("KeyId"))
            self._require_usable(key)
            on_demand = sum(1 for r in key.rotations if r["RotationType"] == "ON_DEMAND")
            if limit is not None and on_demand >= limit:
                raise KmsApiError(
                    "LimitExceededException",
                    f"the on-demand rotation limit of {key.arn} has been reached",
                )
            self.rotate(key, "ON_DEMAND")
            return {"KeyId": key.key_id}

    def rotate(self, key: FakeKey, rotation_type: str = "ON_DEMAND") -> str:
        """Give ``key`` new key material (old material keeps decrypting); its material id."""
        with self._lock:
            material_id, material = _new_material()
            key.materials.append((material_id, material))
            key.rotations.append(
                {
                    "KeyId": key.arn,
                    "KeyMaterialId": material_id,
                    "RotationDate": self._clock(),
                    "RotationType": rotation_type,
                }
            )
            if self.profile.material_id_follows_rotation:
                key.reported_material_id = material_id
            return material_id

    def enable_key_rotation(self, params: Mapping[str, Any]) -> dict[str, Any]:
        period = params.get("RotationPeriodInDays", 365)
        if not isinstance(period, int) or isinstance(period, bool) or not 90 <= period <= 2560:
            raise _validation("RotationPeriodInDays must be between 90 and 2560")
        with self._lock:
            key = self._resolve(params.get("KeyId"))
            self._require_usable(key)
            key.rotation_enabled = True
            key.rotation_period_days = period
        return {}

    def disable_key_rotation(self, params: Mapping[str, Any]) -> dict[str, Any]:
        with self._lock:
            key = self._resolve(params.get("KeyId"))
            self._require_usable(key)
            key.rotation_enabled = False
        return {}

    def get_key_rotation_status(self, params: Mapping[str, Any]) -> dict[str, Any]:
        style = self.profile.rotation_status
        with self._lock:
            key = self._resolve(params.get("KeyId"))
            answer: dict[str, Any] = {"KeyRotationEnabled": key.rotation_enabled}
            if style is RotationStatusStyle.ENABLED_ONLY:
                return answer
            if style is RotationStatusStyle.LOCALSTACK:
                answer["KeyId"] = key.key_id
                if key.rotation_enabled:
                    answer["RotationPeriodInDays"] = key.rotation_period_days
                    answer["NextRotationDate"] = self._clock() + key.rotation_period_days * 86400
                return answer
            answer["KeyId"] = key.arn
            if key.rotation_enabled:
                answer["RotationPeriodInDays"] = key.rotation_period_days
            if key.rotations:
                answer["OnDemandRotationStartDate"] = key.rotations[-1]["RotationDate"]
            return answer

    def list_key_rotations(self, params: Mapping[str, Any]) -> dict[str, Any]:
        limit = params.get("Limit", 100)
        if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= 1000:
            raise _validation("Limit must be between 1 and 1000")
        marker = params.get("Marker")
        start = 0
        if marker is not None:
            if not isinstance(marker, str) or not marker.isdigit():
                raise KmsApiError("InvalidMarkerException", "Marker is invalid")
            start = int(marker)
        with self._lock:
            key = self._resolve(params.get("KeyId"))
            page = [dict(r) for r in key.rotations[start : start + limit]]
            if not self.report_key_material_id:
                for rotation in page:
                    rotation.pop("KeyMaterialId", None)
            answer: dict[str, Any] = {"Rotations": page, "Truncated": False}
            if start + limit < len(key.rotations):
                answer["Truncated"] = True
                answer["NextMarker"] = str(start + limit)
            return answer

    def create_alias(self, params: Mapping[str, Any]) -> dict[str, Any]:
        name = params.get("AliasName")
        if not isinstance(name, str) or not name.startswith("alias/") or len(name) < 7:
            raise _validation("AliasName must start with alias/")
        if name.startswith("alias/aws/"):
            raise KmsApiError("NotAuthorizedException", "alias/aws/ is reserved")
        with self._lock:
            key = self._resolve(params.get("TargetKeyId"))
            if name in self._aliases:
                raise KmsApiError("AlreadyExistsException", f"Alias {name} already exists")
            self._aliases[name] = key.key_id
        return {}

    def update_alias(self, params: Mapping[str, Any]) -> dict[str, Any]:
        name = params.get("AliasName")
        with self._lock:
            if not isinstance(name, str) or name not in self._aliases:
                raise KmsApiError("NotFoundException", f"Alias {name} is not found.")
            self._aliases[name] = self._resolve(params.get("TargetKeyId")).key_id
        return {}

    def list_aliases(self, params: Mapping[str, Any]) -> dict[str, Any]:
        with self._lock:
            only = self._resolve(params["KeyId"]).key_id if params.get("KeyId") else None
            aliases = [
                {
                    "AliasName": name,
                    "AliasArn": f"arn:aws:kms:{self.region}:{self.account_id}:{name}",
                    "TargetKeyId": target,
                }
                for name, target in sorted(self._aliases.items())
                if only is None or target == only
            ]
        return {"Aliases": aliases, "Truncated": False}

    def list_keys(self, params: Mapping[str, Any]) -> dict[str, Any]:
        with self._lock:
            keys = [{"KeyId": k.key_id, "KeyArn": k.arn} for k in self._keys.values()]
        return {"Keys": keys, "Truncated": False}

    def encrypt(self, params: Mapping[str, Any]) -> dict[str, Any]:
        plaintext = _b64_param(params, "Plaintext")
        if not 1 <= len(plaintext) <= MAX_PLAINTEXT:
            raise _validation(f"Plaintext must be 1..{MAX_PLAINTEXT} bytes")
        context = _context_param(params)
        _algorithm_param(params)
        with self._lock:
            key = self._resolve(params.get("KeyId"))
            self._require_usable(key, crypto=True)
            ordinal = len(key.materials) - 1
            material = key.materials[ordinal][1]
            arn = key.arn
            key_uuid = uuid.UUID(key.key_id).bytes
        header = _HEADER.pack(MAGIC, BLOB_VERSION, key_uuid, ordinal)
        nonce = os.urandom(_NONCE)
        sealed = AESGCM(material).encrypt(nonce, plaintext, header + canonical_context(context))
        answer = {
            "CiphertextBlob": base64.b64encode(header + nonce + sealed).decode("ascii"),
            "KeyId": arn,
        }
        if not self.profile.minimal_fields:
            answer["EncryptionAlgorithm"] = "SYMMETRIC_DEFAULT"
        return answer

    def decrypt(self, params: Mapping[str, Any]) -> dict[str, Any]:
        blob = _b64_param(params, "CiphertextBlob")
        context = _context_param(params)
        _algorithm_param(params)
        bad = KmsApiError(
            "InvalidCiphertextException",
            "" if self.profile.bare_invalid_ciphertext else "The ciphertext is invalid.",
        )
        if not _HEADER.size + _NONCE + _TAG <= len(blob) <= MAX_CIPHERTEXT:
            raise bad
        magic, version, key_uuid, ordinal = _HEADER.unpack_from(blob)
        if magic != MAGIC or version != BLOB_VERSION:
            raise bad
        blob_key_id = str(uuid.UUID(bytes=key_uuid))
        with self._lock:
            requested = self._resolve(params["KeyId"]) if params.get("KeyId") else None
            key = self._keys.get(blob_key_id)
            if self.profile.decrypt_key_mismatch == "AccessDeniedException":
                key = self._local_kms_decrypt_key(requested, key)
            if key is None:
                if blob_key_id in self._purged:
                    raise KmsApiError(
                        "NotFoundException", f"Key '{self._arn(blob_key_id)}' does not exist"
                    )
                raise bad
            if requested is not None and requested.key_id != key.key_id:
                raise KmsApiError(
                    self.profile.decrypt_key_mismatch,
                    "The key ID in the request does not identify a KMS key that can perform "
                    "this operation.",
                )
            self._require_usable(key, crypto=True)
            if ordinal >= len(key.materials):
                raise bad
            material_id, material = key.materials[ordinal]
            arn = key.arn
        header = blob[: _HEADER.size]
        nonce = blob[_HEADER.size : _HEADER.size + _NONCE]
        try:
            plaintext = AESGCM(material).decrypt(
                nonce, blob[_HEADER.size + _NONCE :], header + canonical_context(context)
            )
        except InvalidTag:
            raise bad from None
        answer = {"KeyId": arn, "Plaintext": base64.b64encode(plaintext).decode("ascii")}
        if not self.profile.minimal_fields:
            answer["EncryptionAlgorithm"] = "SYMMETRIC_DEFAULT"
        if self.report_key_material_id:
            answer["KeyMaterialId"] = material_id
        return answer

    def _local_kms_decrypt_key(
        self, requested: FakeKey | None, key: FakeKey | None
    ) -> FakeKey | None:
        """local-kms: a KeyId must be usable itself; any other trouble is AccessDenied."""
        denied = KmsApiError(
            "AccessDeniedException",
            "The ciphertext refers to a customer master key that does not exist, does not "
            "exist in this region, or you are not allowed to access.",
        )
        if requested is not None:
            self._require_usable(requested, crypto=True)
            if key is None or key.key_id != requested.key_id:
                raise denied
            return key
        if key is None:
            raise denied
        try:
            self._require_usable(key, crypto=True)
        except KmsApiError:
            raise denied from None
        return key


def _b64_param(params: Mapping[str, Any], name: str) -> bytes:
    raw = params.get(name)
    if not isinstance(raw, str) or not raw:
        raise _validation(f"{name} is required")
    try:
        return base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise KmsApiError("SerializationException", f"{name} is not valid base64") from None


def _context_param(params: Mapping[str, Any]) -> dict[str, str]:
    context = params.get("EncryptionContext") or {}
    if not isinstance(context, dict) or not all(
        isinstance(k, str) and k and isinstance(v, str) for k, v in context.items()
    ):
        raise KmsApiError("SerializationException", "EncryptionContext must map strings")
    return context


def _algorithm_param(params: Mapping[str, Any]) -> None:
    algorithm = params.get("EncryptionAlgorithm", "SYMMETRIC_DEFAULT")
    if algorithm != "SYMMETRIC_DEFAULT":
        raise KmsApiError(
            "InvalidKeyUsageException", "only SYMMETRIC_DEFAULT is supported by this key"
        )


OPERATIONS: dict[str, Callable[[KeyStore, Mapping[str, Any]], dict[str, Any]]] = {
    "CreateKey": KeyStore.create_key,
    "DescribeKey": KeyStore.describe_key,
    "Encrypt": KeyStore.encrypt,
    "Decrypt": KeyStore.decrypt,
    "EnableKey": KeyStore.enable_key,
    "DisableKey": KeyStore.disable_key,
    "ScheduleKeyDeletion": KeyStore.schedule_key_deletion,
    "CancelKeyDeletion": KeyStore.cancel_key_deletion,
    "RotateKeyOnDemand": KeyStore.rotate_key_on_demand,
    "EnableKeyRotation": KeyStore.enable_key_rotation,
    "DisableKeyRotation": KeyStore.disable_key_rotation,
    "GetKeyRotationStatus": KeyStore.get_key_rotation_status,
    "ListKeyRotations": KeyStore.list_key_rotations,
    "CreateAlias": KeyStore.create_alias,
    "UpdateAlias": KeyStore.update_alias,
    "ListAliases": KeyStore.list_aliases,
    "ListKeys": KeyStore.list_keys,
}

__all__ = ["OPERATIONS", "FakeKey", "KeyStore", "KmsApiError", "canonical_context"]
