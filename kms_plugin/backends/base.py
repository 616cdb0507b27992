"""The interface every key backend implements.

A backend holds the *root key* (a keyring file, a key inside an HSM, a cloud KMS key).  The
plugin core only asks it to wrap and unwrap its local key-encryption keys, and to name the
current root key version; everything else (caching, key ids, formats) lives in the core.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True)
class RootKeyVersion:
    """One version of the backend's root key.

    ``key_ref`` is the backend's stable name of the root key (keyring key name, HSM label,
    KMS key ARN); ``version`` is the backend's version of that key (keyring generation, HSM
    key version, AWS key material / rotation id).  The key_id shown to kube-apiserver is
    derived by the core from (backend name, key_ref, version), and it must never repeat once
    used, even if an old key is reinstated: ``version`` must be unique over time for a
    ``key_ref`` (e.g. a generation counter bumped on every reinstatement).
    """

    key_ref: str
    version: str


@dataclass(frozen=True)
class WrapResult:
    """The outcome of :meth:`KeyBackend.wrap`."""

    ciphertext: bytes  # opaque blob the backend can unwrap later (AWS: CiphertextBlob)
    key: RootKeyVersion  # the version actually used


class KeyBackend(abc.ABC):
    """A root-key backend.

    ``deadline`` arguments are absolute :func:`time.monotonic` values (``None``: the
    backend's default timeout).  ``context`` is bound to the wrapped blob (AES-GCM associated
    data, AWS EncryptionContext): unwrapping with a different context must fail with
    :class:`~kms_plugin.backends.errors.InvalidCiphertext`.

    Errors are the classes of :mod:`kms_plugin.backends.errors`; messages never contain key
    material or plaintext.  Implementations must be safe to call from several threads.
    """

    name: ClassVar[str]

    @classmethod
    @abc.abstractmethod
    def from_options(cls, options: Mapping[str, object]) -> KeyBackend:
        """Build the backend from its config section; unknown keys -> BackendConfigError."""

    @abc.abstractmethod
    def current_key(self, *, deadline: float | None = None) -> RootKeyVersion:
        """Return the current (primary) root key version; may call the backend."""

    @abc.abstractmethod
    def wrap(
        self, plaintext: bytes, context: Mapping[str, str], *, deadline: float | None = None
    ) -> WrapResult:
        """Encrypt ``plaintext`` under the current root key, bound to ``context``."""

    @abc.abstractmethod
    def unwrap(
        self,
        ciphertext: bytes,
        key: RootKeyVersion,
        context: Mapping[str, str],
        *,
        deadline: float | None = None,
    ) -> bytes:
        """Decrypt a blob made by :meth:`wrap` with root key version ``key``."""

    def close(self) -> None:  # noqa: B027 - optional hook, default does nothing
        """Release sessions, sockets and file handles."""


def wrap_aad(domain: bytes, key: RootKeyVersion, context: Mapping[str, str]) -> bytes:
    """Associated data for backends that wrap with AES-GCM themselves (local, pkcs11): binds
    the backend's domain, the root key version and the caller's context."""
    parts = [domain, key.key_ref.encode(), b"\x00", key.version.encode(), b"\x00"]
    for k in sorted(context):
        parts += [k.encode(), b"=", context[k].encode(), b"\x00"]
    return b"".join(parts)


__all__ = ["KeyBackend", "RootKeyVersion", "WrapResult", "wrap_aad"]
