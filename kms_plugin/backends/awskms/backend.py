"""The ``awskms`` key backend: the root key is an AWS KMS symmetric key.

``wrap``/``unwrap`` are KMS ``Encrypt``/``Decrypt`` with the context as EncryptionContext, so
AWS itself refuses to unwrap under another context.  ``current_key`` is ``DescribeKey`` plus,
where needed, ``ListKeyRotations``:

* ``key_ref`` is the key ARN (an alias in ``key_id`` is resolved; if the alias is moved to
  another key, ``key_ref`` changes);
* ``version`` is ``m-<CurrentKeyMaterialId>`` when DescribeKey reports the current key
  material (AWS does for symmetric keys since 2025), else ``r<n>-<ms>`` from
  ListKeyRotations: the number of completed rotations and the latest rotation date in
  milliseconds (``r0`` before the first rotation, and for keys in custom key stores, which
  cannot rotate).  Both change on every rotation and never return to an earlier value.
* ``version`` is ``static`` when the endpoint offers neither (AWS KMS emulators:
  nsmithuk/local-kms, older LocalStack and moto).  Rotations there keep the key_id, and
  everything stays decryptable because those emulators keep every key material too.
  GetKeyRotationStatus is asked once, only to warn when automatic rotation is enabled.

The scheme that produced a key's first version sticks for the life of the backend: a later
answer that lacks what that scheme needs is an error, never a silent switch to another
scheme (which could bring back a key_id used before).  An operation the endpoint answered
as not implemented is remembered and not called again.

AWS keeps every key material of a key, so blobs wrapped before a rotation still unwrap;
``unwrap`` pins ``KeyId`` to the blob's ``key_ref`` so a blob is never decrypted by a
different key than the one it names.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from kms_plugin.backends.awskms.breaker import CircuitBreaker
from kms_plugin.backends.awskms.client import (
    ClientSettings,
    KmsClient,
    UnsupportedOperation,
    aws_error_type,
)
from kms_plugin.backends.awskms.credentials import (
    check_endpoint_scheme,
    resolve_credentials,
    resolve_endpoint,
    resolve_region,
)
from kms_plugin.backends.base import KeyBackend, RootKeyVersion, WrapResult
from kms_plugin.backends.errors import (
    BackendConfigError,
    BackendError,
    BackendUnavailable,
    InvalidCiphertext,
    KeyDisabled,
    KeyNotFound,
)

log = logging.getLogger(__name__)

MAX_PLAINTEXT = 4096  # AWS KMS Encrypt limit
MAX_CIPHERTEXT = 6144  # AWS KMS Decrypt CiphertextBlob limit
_DISABLED_STATES = frozenset(
    {"Disabled", "PendingDeletion", "PendingReplicaDeletion", "PendingImport"}
)
_ROTATION_PAGE = 1000
STATIC_VERSION = "static"
# Version schemes, in the order they are tried.
_MATERIAL = "material"  # DescribeKey CurrentKeyMaterialId
_ROTATIONS = "rotations"  # ListKeyRotations
_STATIC = "static"  # neither is available


@dataclass(frozen=True)
class AwsKmsOptions:
    """The ``awskms`` backend section of the plugin config."""

    key_id: str
    region: str | None = None
    endpoint_url: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None
    session_token: str | None = None
    credentials_file: str | None = None
    profile: str | None = None
    ca_bundle: str | None = None
    connect_timeout: float = 1.0
    request_timeout: float = 2.0
    max_attempts: int = 3
    retry_base_seconds: float = 0.05
    retry_max_seconds: float = 1.0
    breaker_failure_threshold: int = 5
    breaker_reset_seconds: float = 10.0
    allow_http: str | None = None  # "true": plain http to a non-loopback endpoint is allowed
    previous_key_arns: str | None = None  # comma-separated ARNs Decrypt may still use

    def __repr__(self) -> str:  # never show secrets
        shown = {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name not in ("secret_access_key", "session_token")
        }
        return f"AwsKmsOptions({shown!r})"

    @classmethod
    def parse(cls, options: Mapping[str, object]) -> AwsKmsOptions:
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise BackendConfigError(
                f"unknown awskms option(s): {', '.join(unknown)}; known: {', '.join(known)}"
            )
        values: dict[str, Any] = {}
        for name, raw in options.items():
            if raw is None or raw == "":
                continue
            kind = known[name].type
            try:
                if kind in ("float", float):
                    value: Any = float(raw)  # type: ignore[arg-type]
                elif kind in ("int", int):
                    if isinstance(raw, bool):
                        raise ValueError(raw)
                    value = int(raw)  # type: ignore[call-overload]
                elif isinstance(raw, bool):  # flags of the plugin config
                    value = "true" if raw else "false"
                elif isinstance(raw, list | tuple):
                    value = ",".join(str(item) for item in raw)
                else:
                    if not isinstance(raw, str):
                        raise ValueError(raw)
                    value = raw
            except (TypeError, ValueError):
                raise BackendConfigError(
                    f"awskms option {name} has a bad value (expected {kind})"
                ) from None
            values[name] = value
        if not values.get("key_id"):
            raise BackendConfigError("awskms option key_id (key ARN, alias or id) is required")
        parsed = cls(**values)
        for name in ("connect_timeout", "request_timeout", "breaker_reset_seconds"):
            if getattr(parsed, name) <= 0:
                raise BackendConfigError(f"awskms option {name} must be positive")
        for name in ("retry_base_seconds", "retry_max_seconds"):
            if getattr(parsed, name) < 0:
                raise BackendConfigError(f"awskms option {name} must not be negative")
        if parsed.max_attempts < 1 or parsed.breaker_failure_threshold < 1:
            raise BackendConfigError(
                "awskms options max_attempts and breaker_failure_threshold must be >= 1"
            )
        return parsed


class AwsKmsBackend(KeyBackend):
    """Root key in AWS KMS (or anything speaking its JSON API: our fake, moto)."""

    name: ClassVar[str] = "awskms"

    def __init__(
        self,
        options: AwsKmsOptions,
        *,
        env: Mapping[str, str] | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        environ: Mapping[str, str] = os.environ if env is None else env
        self.options = options
        self.region = resolve_region(options.region, options.key_id, environ)
        self.endpoint = resolve_endpoint(options.endpoint_url, self.region, environ)
        check_endpoint_scheme(self.endpoint, _truthy(options.allow_http))
        self.previous_key_arns = frozenset(
            a.strip() for a in (options.previous_key_arns or "").split(",") if a.strip()
        )
        bad = sorted(a for a in self.previous_key_arns if not a.startswith("arn:"))
        if bad:
            raise BackendConfigError(f"awskms previous_key_arns must be key ARNs: {bad}")
        credentials = resolve_credentials(
            access_key_id=options.access_key_id,
            secret_access_key=options.secret_access_key,
            session_token=options.session_token,
            credentials_file=options.credentials_file,
            profile=options.profile,
            env=environ,
            region=self.region,
        )
        extra: dict[str, Any] = {} if clock is None else {"clock": clock}
        self.breaker = CircuitBreaker(
            options.breaker_failure_threshold, options.breaker_reset_seconds, **extra
        )
        self.client = KmsClient(
            ClientSettings(
                endpoint=self.endpoint,
                region=self.region,
                connect_timeout=options.connect_timeout,
                request_timeout=options.request_timeout,
                max_attempts=options.max_attempts,
                retry_base_seconds=options.retry_base_seconds,
                retry_max_seconds=options.retry_max_seconds,
                ca_bundle=options.ca_bundle or environ.get("AWS_CA_BUNDLE") or None,
            ),
            credentials,
            self.breaker,
            **extra,
        )
        self.credentials_source = credentials.source
        self._lock = threading.Lock()
        self._current: RootKeyVersion | None = None
        self._schemes: dict[str, str] = {}  # key ARN -> version scheme (sticky)
        self._unsupported: set[str] = set()  # operations the endpoint does not implement
        self._rotation_status_seen = False
        arn_region = _arn_part(options.key_id, 3)
        if arn_region and arn_region != self.region:
            log.warning(
                "awskms key ARN names another region than the one requests are signed for; "
                "AWS and LocalStack will not find the key",
                extra={"kms_key": options.key_id, "region": self.region},
            )
        log.info(
            "awskms backend configured",
            extra={
                "endpoint": self.endpoint,
                "region": self.region,
                "kms_key": options.key_id,
                "credentials_source": credentials.source,
            },
        )

    @classmethod
    def from_options(cls, options: Mapping[str, object]) -> AwsKmsBackend:
        return cls(AwsKmsOptions.parse(options))

    # -- KeyBackend -------------------------------------------------------------------------

    def current_key(self, *, deadline: float | None = None) -> RootKeyVersion:
        answer = self.client.call("DescribeKey", {"KeyId": self.options.key_id}, deadline=deadline)
        meta = answer.get("KeyMetadata")
        if not isinstance(meta, dict):
            raise BackendError("AWS KMS DescribeKey answer lacks KeyMetadata")
        arn = self._arn_of(meta)
        state = meta.get("KeyState") or None
        enabled = meta.get("Enabled")
        if state is not None and not isinstance(state, str):
            raise BackendError(f"AWS KMS DescribeKey answer has a malformed KeyState for {arn}")
        if state in _DISABLED_STATES or (state in (None, "Enabled") and enabled is False):
            raise KeyDisabled(f"AWS KMS key {arn} is not usable: state {state or 'Disabled'}")
        if state not in (None, "Enabled"):
            raise BackendUnavailable(f"AWS KMS key {arn} is not usable now: state {state}")
        usage = meta.get("KeyUsage") or "ENCRYPT_DECRYPT"
        spec = meta.get("KeySpec") or meta.get("CustomerMasterKeySpec") or "SYMMETRIC_DEFAULT"
        if usage != "ENCRYPT_DECRYPT" or spec != "SYMMETRIC_DEFAULT":
            raise BackendConfigError(
                f"AWS KMS key {arn} must be a SYMMETRIC_DEFAULT ENCRYPT_DECRYPT key "
                f"(is {spec} {usage})"
            )
        material = meta.get("CurrentKeyMaterialId")
        has_material = isinstance(material, str) and bool(material.strip())
        with self._lock:
            scheme = self._schemes.get(arn)
        if scheme == _MATERIAL or (scheme is None and has_material):
            if not has_material:
                raise BackendError(
                    f"AWS KMS DescribeKey stopped reporting CurrentKeyMaterialId for {arn}; "
                    "the key version cannot be told"
                )
            version, scheme = f"m-{material}", _MATERIAL
        else:
            version, scheme = self._fallback_version(arn, scheme, deadline)
        key = RootKeyVersion(key_ref=arn, version=version)
        with self._lock:
            if self._current != key:
                log.info("awskms root key version", extra={"kms_key": arn, "key_version": version})
            self._current = key
            self._schemes[arn] = scheme
        return key

    def wrap(
        self, plaintext: bytes, context: Mapping[str, str], *, deadline: float | None = None
    ) -> WrapResult:
        if not 1 <= len(plaintext) <= MAX_PLAINTEXT:
            raise BackendError(f"AWS KMS can wrap 1..{MAX_PLAINTEXT} bytes")
        with self._lock:
            key = self._current
        if key is None:
            key = self.current_key(deadline=deadline)
        payload: dict[str, Any] = {
            "KeyId": key.key_ref,
            "Plaintext": base64.b64encode(plaintext).decode("ascii"),
        }
        if context:
            payload["EncryptionContext"] = _context(context)
        answer = self.client.call("Encrypt", payload, deadline=deadline)
        blob = _b64_field(answer, "CiphertextBlob", "Encrypt")
        if not _names_key(answer.get("KeyId"), key.key_ref):
            raise BackendError("AWS KMS Encrypt used another key than the one requested")
        return WrapResult(ciphertext=blob, key=key)

    def unwrap(
        self,
        ciphertext: bytes,
        key: RootKeyVersion,
        context: Mapping[str, str],
        *,
        deadline: float | None = None,
    ) -> bytes:
        if not 1 <= len(ciphertext) <= MAX_CIPHERTEXT:
            raise InvalidCiphertext("wrapped key has an impossible length for AWS KMS")
        self._check_decrypt_key(key.key_ref, deadline)
        payload: dict[str, Any] = {
            "KeyId": key.key_ref,
            "CiphertextBlob": base64.b64encode(ciphertext).decode("ascii"),
        }
        if context:
            payload["EncryptionContext"] = _context(context)
        answer = self.client.call("Decrypt", payload, deadline=deadline)
        if not _names_key(answer.get("KeyId"), key.key_ref):
            raise InvalidCiphertext("AWS KMS Decrypt used another key than the one named")
        return _b64_field(answer, "Plaintext", "Decrypt")

    def close(self) -> None:
        self.client.close()

    def _check_decrypt_key(self, key_ref: str, deadline: float | None) -> None:
        """Decrypt only with the configured key or an explicitly allowed earlier one: the key
        named in a stored record is attacker-controlled input (whoever can write etcd)."""
        if key_ref in self.previous_key_arns or key_ref == self.options.key_id:
            return
        with self._lock:
            current = self._current
        if current is None:
            current = self.current_key(deadline=deadline)
        if key_ref != current.key_ref:
            raise KeyNotFound(
                f"AWS KMS key {key_ref} is neither the configured key nor in "
                "previous_key_arns; refused (add it to --awskms-previous-key-arns if data "
                "written under it must stay readable)"
            )

    # -- internals --------------------------------------------------------------------------

    def _arn_of(self, meta: Mapping[str, Any]) -> str:
        arn = meta.get("Arn")
        if isinstance(arn, str) and arn.startswith("arn:"):
            return arn
        # No ARN in the answer: the configured ARN will do if the answer names its key.
        key_id = meta.get("KeyId")
        configured = self.options.key_id
        if (
            isinstance(key_id, str)
            and key_id
            and configured.startswith("arn:")
            and configured.endswith(f":key/{key_id}")
        ):
            return configured
        raise BackendError("AWS KMS DescribeKey answer lacks KeyMetadata.Arn")

    def _fallback_version(
        self, arn: str, scheme: str | None, deadline: float | None
    ) -> tuple[str, str]:
        """The version when DescribeKey reports no key material: rotations, else static."""
        if scheme in (None, _ROTATIONS) and "ListKeyRotations" not in self._unsupported:
            try:
                return self._rotation_version(arn, deadline), _ROTATIONS
            except UnsupportedOperation:
                if scheme == _ROTATIONS:
                    raise  # it answered before: now it is a fault, not a missing feature
                self._mark_unsupported("ListKeyRotations")
                log.warning(
                    "awskms endpoint reports neither CurrentKeyMaterialId nor "
                    "ListKeyRotations: the root key version is 'static', so a rotation of "
                    "the key will not change the key_id (everything stays decryptable)",
                    extra={"kms_key": arn, "endpoint": self.endpoint},
                )
        self._check_rotation_status(arn, deadline)
        return STATIC_VERSION, _STATIC

    def _mark_unsupported(self, operation: str) -> None:
        with self._lock:
            self._unsupported.add(operation)

    def _check_rotation_status(self, arn: str, deadline: float | None) -> None:
        """Once: warn if the key rotates automatically although rotations are not visible."""
        with self._lock:
            if self._rotation_status_seen or "GetKeyRotationStatus" in self._unsupported:
                return
        try:
            answer = self.client.call(
                "GetKeyRotationStatus", {"KeyId": arn}, deadline=deadline, optional=True
            )
        except UnsupportedOperation:
            self._mark_unsupported("GetKeyRotationStatus")
            return
        except BackendError as exc:  # informational only: ask again next time
            log.debug("awskms GetKeyRotationStatus failed: %s", exc)
            return
        with self._lock:
            self._rotation_status_seen = True
        if answer.get("KeyRotationEnabled") is True:
            log.warning(
                "awskms root key has automatic rotation enabled, but this endpoint does not "
                "report rotations: the key_id will not change when it rotates",
                extra={"kms_key": arn},
            )

    def _rotation_version(self, arn: str, deadline: float | None) -> str:
        count = 0
        latest_ms = 0
        marker: str | None = None
        while True:
            payload: dict[str, Any] = {"KeyId": arn, "Limit": _ROTATION_PAGE}
            if marker:
                payload["Marker"] = marker
            try:
                answer = self.client.call(
                    "ListKeyRotations", payload, deadline=deadline, optional=True
                )
            except UnsupportedOperation:
                raise
            except BackendError as exc:
                if aws_error_type(exc) == "UnsupportedOperationException":
                    return "r0"  # keys in custom key stores cannot rotate
                raise
            rotations = answer.get("Rotations")
            if rotations is None:
                rotations = []
            if not isinstance(rotations, list):
                raise BackendError("AWS KMS ListKeyRotations answer is malformed")
            for rotation in rotations:
                if not isinstance(rotation, dict):
                    raise BackendError("AWS KMS ListKeyRotations answer is malformed")
                count += 1
                when = rotation.get("RotationDate")
                if isinstance(when, int | float) and not isinstance(when, bool):
                    latest_ms = max(latest_ms, round(float(when) * 1000))
            next_marker = answer.get("NextMarker")
            if answer.get("Truncated") is not True:
                break
            if not isinstance(next_marker, str) or not next_marker or next_marker == marker:
                raise BackendError("AWS KMS ListKeyRotations is truncated without a new marker")
            marker = next_marker
        return "r0" if count == 0 else f"r{count}-{latest_ms}"


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def _arn_part(value: str, index: int) -> str:
    parts = value.split(":")
    return parts[index] if value.startswith("arn:") and len(parts) >= 6 else ""


def _names_key(answered: object, key_ref: str) -> bool:
    """Does an Encrypt/Decrypt answer's KeyId name ``key_ref`` (or name no key at all)?

    AWS answers the key ARN; some emulators answer the bare key id; a missing or null
    KeyId names nothing and is accepted (the request named the key).
    """
    if answered is None:
        return True
    if not isinstance(answered, str):
        return False
    if answered == key_ref:
        return True
    return ":key/" in key_ref and answered == key_ref.rsplit(":key/", 1)[1]


def _context(context: Mapping[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in context.items():
        if not isinstance(k, str) or not isinstance(v, str) or not k:
            raise BackendError("encryption context keys and values must be strings")
        out[k] = v
    return out


def _b64_field(answer: Mapping[str, Any], name: str, operation: str) -> bytes:
    raw = answer.get(name)
    if not isinstance(raw, str) or not raw:
        raise BackendError(f"AWS KMS {operation} answer lacks {name}")
    try:
        return base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise BackendError(f"AWS KMS {operation} answer has a malformed {name}") from None


__all__ = ["STATIC_VERSION", "AwsKmsBackend", "AwsKmsOptions"]
