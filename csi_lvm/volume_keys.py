"""Per-volume keys of encrypted volumes, wrapped by the KMS plugin's key backends.

An encrypted volume is a LUKS2 container whose only key slot opens with a 256-bit random
*volume secret*, made on the node for that volume. The secret is never stored in clear: a
key backend of the node (kms_plugin.backends: local keyring file, PKCS#11 HSM/TPM, AWS KMS)
wraps it, and the wrapped blob lives in the LUKS2 header itself as a token:

    {"type": "csi-lvm.edge.io/wrapped-key", "keyslots": ["0"], "version": 1,
     "backend": "<name in the node's backends file>", "key_ref": "<root key name>",
     "key_version": "<root key version>", "wrapped": "<base64 of the backend's blob>"}

The wrap is bound to the LUKS2 UUID of the header (AES-GCM associated data / AWS
EncryptionContext), so a token copied into another volume's header does not unwrap there.
Clones and restores copy the header, so they open with their source's secret.

Parsing is strict (exact fields, types, sizes, canonical base64); every way a token can be
bad is one error, InvalidToken.

The node's backends are named in a YAML file (``encryption_backends_file``)::

    default: node-key            # used when a StorageClass names no encryptionKeyBackend
    backends:
      node-key: {type: local, keyring: /etc/csi-lvm/keyring.json}
      hsm: {type: pkcs11, module: /usr/lib/softhsm/libsofthsm2.so, token_label: edge,
            key_label: csi-volumes, pin_file: /etc/csi-lvm/hsm-pin}
      cloud: {type: awskms, key_id: "arn:aws:kms:...", region: eu-west-1}

Every key but ``type`` goes to the backend's own ``from_options`` (the KMS plugin's option
names without their prefix).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import secrets
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_common.errors import FailedPrecondition, InvalidArgument, ServiceError, Unavailable
from kms_plugin.backends import errors as backend_errors
from kms_plugin.backends.base import KeyBackend, RootKeyVersion
from kms_plugin.backends.registry import available, create_backend

TOKEN_TYPE = "csi-lvm.edge.io/wrapped-key"
TOKEN_VERSION = 1
SECRET_BYTES = 32
CONTEXT_KEY = "csi-lvm.edge.io/luks-uuid"
MAX_WRAPPED_BYTES = 4096
MAX_FIELD_CHARS = 512
BACKEND_TIMEOUT_SECONDS = 10.0
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_TOKEN_FIELDS = frozenset({"type", "keyslots", "version", "backend", "key_ref", "key_version",
                           "wrapped"})


class InvalidToken(Exception):
    """A key token that is malformed, or whose wrapped key fails its integrity check."""


class BackendsFileError(Exception):
    """The node's backends file is unreadable or wrong (the driver refuses to start)."""


# ------------------------------------------------------------------------------ the token


@dataclass(frozen=True)
class WrappedKey:
    backend: str
    key: RootKeyVersion
    wrapped: bytes

    def token_json(self, keyslot: int = 0) -> str:
        return json.dumps({
            "type": TOKEN_TYPE, "keyslots": [str(keyslot)], "version": TOKEN_VERSION,
            "backend": self.backend, "key_ref": self.key.key_ref,
            "key_version": self.key.version,
            "wrapped": base64.b64encode(self.wrapped).decode("ascii"),
        }, separators=(",", ":"))


def parse_token(text: str | bytes) -> WrappedKey:
    """The wrapped key of a token exported from a LUKS2 header; InvalidToken when bad."""
    try:
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError):
        raise InvalidToken("the key token is not JSON") from None
    if not isinstance(data, dict) or set(data) != _TOKEN_FIELDS:
        raise InvalidToken("the key token does not have exactly the expected fields")
    if data["type"] != TOKEN_TYPE or data["version"] != TOKEN_VERSION \
            or type(data["version"]) is not int:
        raise InvalidToken("the key token has an unknown type or version")
    slots = data["keyslots"]
    if not isinstance(slots, list) or len(slots) != 1 or not isinstance(slots[0], str):
        raise InvalidToken("the key token must name one key slot")
    texts = [data[k] for k in ("backend", "key_ref", "key_version", "wrapped")]
    if not all(isinstance(t, str) and 0 < len(t) for t in texts) \
            or any(len(t) > MAX_FIELD_CHARS for t in texts[:3]):
        raise InvalidToken("the key token has an empty, oversized or non-text field")
    if not _NAME.fullmatch(data["backend"]):
        raise InvalidToken("the key token names no valid backend")
    try:
        wrapped = base64.b64decode(data["wrapped"].encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise InvalidToken("the wrapped key is not base64") from None
    if not 0 < len(wrapped) <= MAX_WRAPPED_BYTES \
            or base64.b64encode(wrapped).decode("ascii") != data["wrapped"]:
        raise InvalidToken("the wrapped key has a bad size or a non-canonical encoding")
    return WrappedKey(data["backend"], RootKeyVersion(data["key_ref"], data["key_version"]),
                      wrapped)


def key_context(luks_uuid: str) -> dict[str, str]:
    """What the wrap is bound to: the LUKS2 UUID of the header that holds the token."""
    return {CONTEXT_KEY: luks_uuid}


def new_volume_secret() -> bytes:
    return secrets.token_bytes(SECRET_BYTES)


# ------------------------------------------------------------------------------ backends


@dataclass(frozen=True)
class BackendSpec:
    name: str
    type: str
    options: Mapping[str, object]


@dataclass(frozen=True)
class BackendsFile:
    default: str
    backends: Mapping[str, BackendSpec]


def load_backends_file(path: str) -> BackendsFile:
    import yaml  # only nodes that configure encryption pay for it

    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise BackendsFileError(f"encryption backends file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise BackendsFileError(f"encryption backends file {path}: not YAML: {exc}") from None
    return parse_backends(data, path)


def parse_backends(data: Any, where: str = "encryption backends") -> BackendsFile:
    if not isinstance(data, dict) or set(data) - {"default", "backends"}:
        raise BackendsFileError(f"{where}: expected a mapping with 'backends' and 'default'")
    entries = data.get("backends")
    if not isinstance(entries, dict) or not entries:
        raise BackendsFileError(f"{where}: 'backends' must map names to backend settings")
    specs: dict[str, BackendSpec] = {}
    for name, entry in entries.items():
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise BackendsFileError(f"{where}: backend name {name!r} is not a simple name")
        if not isinstance(entry, dict) or not isinstance(entry.get("type"), str):
            raise BackendsFileError(f"{where}: backend {name!r} needs a 'type' "
                                    f"({', '.join(available())})")
        if entry["type"] not in available():
            raise BackendsFileError(f"{where}: backend {name!r} has unknown type "
                                    f"{entry['type']!r} ({', '.join(available())})")
        options = {k: v for k, v in entry.items() if k != "type"}
        specs[name] = BackendSpec(name, entry["type"], options)
    default = data.get("default", "")
    if default and default not in specs:
        raise BackendsFileError(f"{where}: default backend {default!r} is not defined")
    if not default and len(specs) == 1:
        default = next(iter(specs))
    return BackendsFile(str(default or ""), specs)


def backend_failure(exc: backend_errors.BackendError, doing: str) -> ServiceError:
    """One place that turns a key backend's error into a CSI status."""
    if isinstance(exc, (backend_errors.BackendUnavailable, backend_errors.BackendThrottled)):
        return Unavailable(f"{doing}: the key backend is unreachable now ({exc}); retry")
    if isinstance(exc, backend_errors.KeyDisabled):
        return FailedPrecondition(f"{doing}: the root key is disabled ({exc})")
    if isinstance(exc, backend_errors.KeyNotFound):
        return FailedPrecondition(f"{doing}: the root key does not exist ({exc}); without it "
                                  "the volume cannot be opened")
    if isinstance(exc, backend_errors.InvalidCiphertext):
        return FailedPrecondition(f"{doing}: the wrapped key failed its integrity check "
                                  "(tampered, or copied from another volume); refusing to open")
    if isinstance(exc, backend_errors.BackendConfigError):
        return FailedPrecondition(f"{doing}: the key backend is misconfigured on this node "
                                  f"({exc})")
    return Unavailable(f"{doing}: key backend error ({exc})")


class KeyBackends:
    """The node's named key backends, built on first use and shared by all volumes."""

    def __init__(self, spec: BackendsFile | None,
                 timeout: float = BACKEND_TIMEOUT_SECONDS) -> None:
        self.spec = spec
        self.timeout = timeout
        self._built: dict[str, KeyBackend] = {}
        self._lock = threading.Lock()

    @property
    def configured(self) -> bool:
        return self.spec is not None

    def names(self) -> list[str]:
        return sorted(self.spec.backends) if self.spec else []

    def resolve_name(self, asked: str) -> str:
        """The backend a StorageClass means (its encryptionKeyBackend, or the default)."""
        if self.spec is None:
            raise InvalidArgument("encrypted volumes need key backends on the node "
                                  "(encryption_backends_file is not configured)")
        name = asked or self.spec.default
        if not name:
            raise InvalidArgument(f"encryptionKeyBackend is required: this node has no default "
                                  f"(configured: {', '.join(self.names())})")
        if name not in self.spec.backends:
            raise InvalidArgument(f"encryptionKeyBackend {name!r} is not configured on this "
                                  f"node (configured: {', '.join(self.names())})")
        return name

    def get(self, name: str) -> KeyBackend:
        if self.spec is None or name not in self.spec.backends:
            raise FailedPrecondition(f"key backend {name!r} is not configured on this node")
        with self._lock:
            backend = self._built.get(name)
            if backend is None:
                spec = self.spec.backends[name]
                try:
                    backend = create_backend(spec.type, spec.options)
                except backend_errors.BackendError as exc:
                    raise backend_failure(exc, f"building key backend {name!r}") from None
                self._built[name] = backend
            return backend

    def _deadline(self) -> float:
        return time.monotonic() + self.timeout

    def wrap(self, name: str, secret: bytes, luks_uuid: str) -> WrappedKey:
        backend = self.get(name)
        try:
            result = backend.wrap(secret, key_context(luks_uuid), deadline=self._deadline())
        except backend_errors.BackendError as exc:
            raise backend_failure(exc, f"wrapping a volume key with backend {name!r}") from None
        return WrappedKey(name, result.key, result.ciphertext)

    def unwrap(self, token: WrappedKey, luks_uuid: str) -> bytes:
        backend = self.get(token.backend)
        try:
            secret = backend.unwrap(token.wrapped, token.key, key_context(luks_uuid),
                                    deadline=self._deadline())
        except backend_errors.BackendError as exc:
            raise backend_failure(exc, f"unwrapping the volume key with backend "
                                       f"{token.backend!r}") from None
        if len(secret) != SECRET_BYTES:
            raise FailedPrecondition("the unwrapped volume key has the wrong size; refusing "
                                     "to open")
        return secret

    def current_key(self, name: str) -> RootKeyVersion:
        backend = self.get(name)
        try:
            return backend.current_key(deadline=self._deadline())
        except backend_errors.BackendError as exc:
            raise backend_failure(exc, f"asking backend {name!r} for its current key") from None

    def close(self) -> None:
        with self._lock:
            for backend in self._built.values():
                backend.close()
            self._built.clear()


def is_luks_uuid(text: str) -> bool:
    return bool(_UUID.fullmatch(text))


__all__ = ["BackendsFile", "BackendsFileError", "InvalidToken", "KeyBackends", "WrappedKey",
           "backend_failure", "key_context", "load_backends_file", "new_volume_secret",
           "parse_backends", "parse_token", "TOKEN_TYPE"]
