"""The ``local`` backend: a keyring file of AES-256 root keys.

File format (JSON, written by ``kms-plugin keygen`` / ``kms-plugin rotate``, mode 0600)::

    {
      "format": "kms-plugin-keyring/v1",
      "name": "cluster-a",            # key_ref of every key in the ring
      "next_generation": 4,           # never decreases, so a version is never reused
      "keys": [                       # the first key is the primary (used to wrap)
        {"generation": 3, "key": "<base64, 32 bytes>", "created": "2024-..Z", "state": "enabled"},
        {"generation": 2, ...}, ...
      ]
    }

Operators name a key ``g<generation>``; the version the plugin reports (and key_ids derive
from) is ``g<generation>.<fingerprint>``, an HMAC of the material, so two rings made apart
never share a key_id.  A generation is allocated once from
``next_generation``; putting an old key back into service (``rotate --reinstate g2``) copies
its material under a *new* generation, so a key_id is never repeated.  The primary must carry
the highest generation of the keys that are not staged: a file edited by hand to move an old
key to the front is refused.  ``state: disabled`` makes a key refuse to wrap and unwrap
(KeyDisabled), which is how an operator revokes a root key.

Several control-plane nodes need the same keyring.  ``rotate --stage`` adds the new key with
``state: staged`` (it unwraps, it never wraps); once the file is on every node,
``rotate --promote gN`` makes it the primary, so no node ever meets data wrapped under a key it
does not have.

The file is refused if group or others have any permission on it.  It is re-read when its
inode, size or mtime changes, so ``kms-plugin rotate`` takes effect without a restart.
Wrapping is AES-256-GCM with a random 96-bit nonce; the associated data binds the key_ref,
the version and the caller's context.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import os
import stat
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kms_plugin.backends.base import KeyBackend, RootKeyVersion, WrapResult, wrap_aad
from kms_plugin.backends.errors import (
    BackendConfigError,
    BackendUnavailable,
    InvalidCiphertext,
    KeyDisabled,
    KeyNotFound,
)

FORMAT = "kms-plugin-keyring/v1"
_BLOB_V1 = 0x01
_NONCE = 12
_AAD_DOMAIN = b"kms-plugin.edge.io/local-backend-wrap\x00"


class KeyringError(Exception):
    """The keyring file is missing, unsafe or malformed (message names the problem)."""


@dataclass(frozen=True)
class RingKey:
    generation: int
    key: bytes
    created: str
    state: str = "enabled"

    @property
    def version(self) -> str:
        """The generation as operators name it (``rotate --promote g3``)."""
        return f"g{self.generation}"

    @property
    def root_version(self) -> str:
        """The version reported to the core: generation plus a fingerprint of the material.

        Two keyrings made apart (or ``keygen --force``) both start at g1; the fingerprint keeps
        their key_ids apart, so a key_id never names two different keys.
        """
        mac = hmac.new(self.key, b"kms-plugin local key fingerprint v1", hashlib.sha256)
        return f"{self.version}.{mac.hexdigest()[:12]}"

    def to_json(self) -> dict[str, Any]:
        return {
            "generation": self.generation,
            "key": base64.b64encode(self.key).decode(),
            "created": self.created,
            "state": self.state,
        }


@dataclass(frozen=True)
class Keyring:
    name: str
    next_generation: int
    keys: tuple[RingKey, ...]

    @property
    def primary(self) -> RingKey:
        return self.keys[0]

    def find(self, version: str) -> RingKey | None:
        """The key named gN (as operators write it) or gN.<fingerprint> (as the core has it)."""
        for key in self.keys:
            if version in (key.version, key.root_version):
                return key
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "name": self.name,
            "next_generation": self.next_generation,
            "keys": [k.to_json() for k in self.keys],
        }


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def check_permissions(path: Path) -> None:
    st = path.stat()
    if not stat.S_ISREG(st.st_mode):
        raise KeyringError(f"keyring {path} is not a regular file")
    if st.st_mode & 0o077:
        raise KeyringError(
            f"keyring {path} has mode {stat.S_IMODE(st.st_mode):04o}: group and others must "
            f"have no access (chmod 600 {path})"
        )


def parse_keyring(data: Any, where: str) -> Keyring:
    if not isinstance(data, dict):
        raise KeyringError(f"{where}: not a JSON object")
    unknown = set(data) - {"format", "name", "next_generation", "keys"}
    if unknown:
        raise KeyringError(f"{where}: unknown fields {sorted(unknown)}")
    if data.get("format") != FORMAT:
        raise KeyringError(f"{where}: format must be {FORMAT!r}")
    name = data.get("name")
    if not isinstance(name, str) or not 1 <= len(name) <= 128:
        raise KeyringError(f"{where}: name must be a string of 1..128 characters")
    next_gen = data.get("next_generation")
    raw_keys = data.get("keys")
    if not isinstance(next_gen, int) or isinstance(next_gen, bool) or next_gen < 2:
        raise KeyringError(f"{where}: next_generation must be an integer >= 2")
    if not isinstance(raw_keys, list) or not raw_keys:
        raise KeyringError(f"{where}: keys must be a non-empty list")
    keys = []
    seen: set[int] = set()
    for i, item in enumerate(raw_keys):
        if not isinstance(item, dict) or set(item) - {"generation", "key", "created", "state"}:
            raise KeyringError(f"{where}: keys[{i}] has unknown or missing fields")
        gen = item.get("generation")
        if not isinstance(gen, int) or isinstance(gen, bool) or not 1 <= gen < next_gen:
            raise KeyringError(f"{where}: keys[{i}].generation must be in 1..next_generation-1")
        if gen in seen:
            raise KeyringError(f"{where}: generation {gen} appears twice")
        seen.add(gen)
        try:
            material = base64.b64decode(str(item.get("key", "")), validate=True)
        except (binascii.Error, ValueError):
            raise KeyringError(f"{where}: keys[{i}].key is not base64") from None
        if len(material) != 32:
            raise KeyringError(f"{where}: keys[{i}].key must be 32 bytes (AES-256)")
        state = item.get("state", "enabled")
        if state not in ("enabled", "disabled", "staged"):
            raise KeyringError(f"{where}: keys[{i}].state must be enabled, disabled or staged")
        keys.append(RingKey(gen, material, str(item.get("created", "")), state))
    if keys[0].state == "staged":
        raise KeyringError(f"{where}: the primary (first) key cannot be staged")
    primary = keys[0].generation
    if any(k.generation > primary for k in keys if k.state != "staged") or any(
        k.generation < primary for k in keys if k.state == "staged"
    ):
        raise KeyringError(
            f"{where}: the primary (first) key must have the highest generation (staged keys "
            "excepted, which must be newer); use `kms-plugin rotate --reinstate gN` to put an "
            "old key back into service"
        )
    return Keyring(name, next_gen, tuple(keys))


def load_keyring(path: Path) -> Keyring:
    try:
        check_permissions(path)
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise KeyringError(
            f"keyring {path} does not exist (create it with kms-plugin keygen)"
        ) from None
    except json.JSONDecodeError as exc:
        raise KeyringError(f"keyring {path}: invalid JSON at line {exc.lineno}") from None
    except OSError as exc:
        raise KeyringError(f"keyring {path}: {exc.strerror or exc}") from None
    return parse_keyring(data, f"keyring {path}")


def write_keyring(path: Path, ring: Keyring) -> None:
    """Atomically replace the keyring file (0600, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".keyring-", dir=str(path.parent))
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(ring.to_json(), fh, indent=2)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(str(path.parent), os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def keygen(path: Path, name: str = "local", *, force: bool = False) -> Keyring:
    """Create a keyring with one fresh key (generation 1)."""
    if path.exists() and not force:
        raise KeyringError(f"{path} exists; refusing to overwrite a keyring (keys would be lost)")
    ring = Keyring(name, 2, (RingKey(1, AESGCM.generate_key(bit_length=256), _now()),))
    parse_keyring(ring.to_json(), "new keyring")
    write_keyring(path, ring)
    return ring


def rotate(
    path: Path, *, reinstate: str | None = None, stage: bool = False, promote: str | None = None
) -> Keyring:
    """Add a new primary key (fresh, or a copy of an old one under a new generation).

    ``stage``: add it as a staged key instead (unwraps, never wraps); ``promote``: make a
    staged key the primary.
    """
    ring = load_keyring(path)
    if promote is not None:
        key = ring.find(promote)
        if key is None or key.state != "staged":
            raise KeyringError(f"keyring {path} has no staged key {promote}")
        newest_staged = max(k.generation for k in ring.keys if k.state == "staged")
        if key.generation != newest_staged:
            raise KeyringError(f"promote the newest staged key (g{newest_staged}) instead")
        rest = tuple(k for k in ring.keys if k.version != promote)
        updated = Keyring(ring.name, ring.next_generation,
                          (RingKey(key.generation, key.key, key.created), *rest))
        parse_keyring(updated.to_json(), f"keyring {path}")
        write_keyring(path, updated)
        return updated
    if reinstate is not None:
        old = ring.find(reinstate)
        if old is None:
            raise KeyringError(f"keyring {path} has no key {reinstate}")
        material = old.key
    else:
        material = AESGCM.generate_key(bit_length=256)
    if stage:
        new = RingKey(ring.next_generation, material, _now(), "staged")
        keys = (ring.keys[0], new, *ring.keys[1:])
    else:
        keys = (RingKey(ring.next_generation, material, _now()), *ring.keys)
    updated = Keyring(ring.name, ring.next_generation + 1, keys)
    parse_keyring(updated.to_json(), f"keyring {path}")
    write_keyring(path, updated)
    return updated


def set_state(path: Path, version: str, state: str) -> Keyring:
    """Enable or disable one key of the ring (revocation drill, recovery)."""
    ring = load_keyring(path)
    if ring.find(version) is None:
        raise KeyringError(f"keyring {path} has no key {version}")
    keys = tuple(
        RingKey(k.generation, k.key, k.created, state) if k.version == version else k
        for k in ring.keys
    )
    updated = Keyring(ring.name, ring.next_generation, keys)
    write_keyring(path, updated)
    return updated



class LocalBackend(KeyBackend):
    name: ClassVar[str] = "local"
    OPTIONS: ClassVar[frozenset[str]] = frozenset({"keyring"})

    def __init__(self, keyring_path: Path) -> None:
        self.path = keyring_path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int, int] | None = None
        self._ring: Keyring | None = None
        try:
            self._reload(force=True)
        except KeyringError as exc:
            raise BackendConfigError(str(exc)) from None

    @classmethod
    def from_options(cls, options: Mapping[str, object]) -> LocalBackend:
        unknown = set(options) - cls.OPTIONS
        if unknown:
            raise BackendConfigError(f"local backend: unknown options {sorted(unknown)}")
        path = options.get("keyring")
        if not path:
            raise BackendConfigError("local backend: option 'keyring' (file path) is required")
        return cls(Path(str(path)))

    def _reload(self, force: bool = False) -> Keyring:
        """Return the keyring, re-reading the file when it changed on disk."""
        with self._lock:
            try:
                st = self.path.stat()
            except OSError as exc:
                if self._ring is not None and not force:
                    raise BackendUnavailable(
                        f"keyring {self.path} unreadable: {exc.strerror}"
                    ) from None
                raise KeyringError(f"keyring {self.path}: {exc.strerror or exc}") from None
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_mode)
            if force or self._ring is None or stamp != self._stamp:
                try:
                    ring = load_keyring(self.path)
                except KeyringError as exc:
                    if self._ring is None or force:
                        raise
                    # a broken or unsafe file on a running plugin: keep serving, say why
                    raise BackendUnavailable(str(exc)) from None
                if self._ring is not None and ring.name != self._ring.name:
                    raise BackendUnavailable(f"keyring {self.path} changed its name; refused")
                self._ring, self._stamp = ring, stamp
            assert self._ring is not None
            return self._ring

    def current_key(self, *, deadline: float | None = None) -> RootKeyVersion:
        ring = self._reload()
        return RootKeyVersion(ring.name, ring.primary.root_version)

    def wrap(
        self, plaintext: bytes, context: Mapping[str, str], *, deadline: float | None = None
    ) -> WrapResult:
        ring = self._reload()
        key = ring.primary
        if key.state == "disabled":
            raise KeyDisabled(f"root key {ring.name} {key.version} is disabled")
        nonce = os.urandom(_NONCE)
        root = RootKeyVersion(ring.name, key.root_version)
        sealed = AESGCM(key.key).encrypt(nonce, plaintext, wrap_aad(_AAD_DOMAIN, root, context))
        return WrapResult(bytes([_BLOB_V1]) + nonce + sealed, root)

    def unwrap(
        self,
        ciphertext: bytes,
        key: RootKeyVersion,
        context: Mapping[str, str],
        *,
        deadline: float | None = None,
    ) -> bytes:
        ring = self._reload()
        if key.key_ref != ring.name:
            raise KeyNotFound(f"root key {key.key_ref!r} is not in this keyring")
        found = ring.find(key.version)
        if found is None or found.root_version != key.version:
            raise KeyNotFound(f"root key {key.key_ref} {key.version} is not in the keyring")
        if found.state == "disabled":
            raise KeyDisabled(f"root key {key.key_ref} {key.version} is disabled")
        if len(ciphertext) < 1 + _NONCE + 16 or ciphertext[0] != _BLOB_V1:
            raise InvalidCiphertext("wrapped key is malformed")
        nonce, sealed = ciphertext[1 : 1 + _NONCE], ciphertext[1 + _NONCE :]
        try:
            return AESGCM(found.key).decrypt(nonce, sealed, wrap_aad(_AAD_DOMAIN, key, context))
        except InvalidTag:
            raise InvalidCiphertext("wrapped key failed authentication") from None


__all__ = [
    "Keyring",
    "KeyringError",
    "LocalBackend",
    "RingKey",
    "check_permissions",
    "keygen",
    "load_keyring",
    "rotate",
    "set_state",
]
