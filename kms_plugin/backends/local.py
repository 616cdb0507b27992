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
does not have.  Only one key is staged at a time: a second ``--stage`` is refused and names the
way out (``--promote gN`` or ``--unstage gN``, which drops a staged key: it never wrapped
anything).

**No rollback.**  A running backend remembers the highest ``next_generation`` and every
non-staged key (generation and fingerprint) it has loaded.  A re-read file whose
``next_generation`` went down, or that lacks or changed such a key (an old backup copied back,
a hand edit), is refused with KeyringRollback: the backend keeps the keys it had, every call
fails loudly and health is unhealthy, until the file is fixed or the plugin is restarted with
``allow_rollback`` (``--local-allow-rollback``: a restore is intended).  The check covers one
process's lifetime; a file replaced while no plugin runs is only caught by the primary rule.

**Writers.**  ``keygen``, ``rotate`` and ``set_state`` hold an exclusive ``flock`` on
``<keyring>.lock`` from reading the file to the atomic rename and re-check that the file did
not change before renaming, so concurrent rotations never lose one.

The file is refused if group or others have any permission on it.  It is re-read when its
inode, size or mtime changes, so ``kms-plugin rotate`` takes effect without a restart.
Wrapping is AES-256-GCM with a random 96-bit nonce; the associated data binds the key_ref,
the version and the caller's context.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import stat
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kms_plugin.backends.base import KeyBackend, RootKeyVersion, WrapResult, wrap_aad
from kms_plugin.backends.errors import (
    BackendConfigError,
    BackendError,
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


class KeyringUnusable(BackendError):
    """The keyring file of a running backend became unreadable, unsafe or malformed: an
    operator must fix it (unhealthy, not the "degraded" of a passing network fault)."""


class KeyringRollback(BackendError):
    """The keyring file went back: a lower next_generation, or a key seen before is gone."""


@dataclass(frozen=True)
class RingKey:
    generation: int
    key: bytes = field(repr=False)  # key material: never in a repr or a log line
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
    except UnicodeDecodeError as exc:
        raise KeyringError(f"keyring {path}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise KeyringError(f"keyring {path}: {exc.strerror or exc}") from None
    return parse_keyring(data, f"keyring {path}")


def _file_stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


@contextlib.contextmanager
def exclusive(path: Path) -> Iterator[tuple[int, int, int] | None]:
    """Hold the keyring's writer lock; yields the file's stamp as read under the lock."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(str(path.with_name(path.name + ".lock")), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield _file_stamp(path)
    finally:
        os.close(fd)  # releases the lock


def write_keyring(
    path: Path, ring: Keyring, *, expect: tuple[int, int, int] | None | bool = False
) -> None:
    """Atomically replace the keyring file (0600, fsync, rename).

    ``expect``: the stamp the file had when it was read (under :func:`exclusive`); the write
    is refused if the file changed since (a writer that did not take the lock).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".keyring-", dir=str(path.parent))
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(ring.to_json(), fh, indent=2)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        if expect is not False and _file_stamp(path) != expect:
            raise KeyringError(
                f"keyring {path} changed while it was being updated; nothing written, run the "
                "command again"
            )
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
    with exclusive(path) as stamp:
        if stamp is not None and not force:
            raise KeyringError(
                f"{path} exists; refusing to overwrite a keyring (keys would be lost)"
            )
        ring = Keyring(name, 2, (RingKey(1, AESGCM.generate_key(bit_length=256), _now()),))
        parse_keyring(ring.to_json(), "new keyring")
        write_keyring(path, ring, expect=stamp)
        return ring


def rotate(
    path: Path,
    *,
    reinstate: str | None = None,
    stage: bool = False,
    promote: str | None = None,
    unstage: str | None = None,
) -> Keyring:
    """Add a new primary key (fresh, or a copy of an old one under a new generation).

    ``stage``: add it as a staged key instead (unwraps, never wraps); ``promote``: make the
    staged key the primary; ``unstage``: drop a staged key.  The whole read-modify-write runs
    under the keyring's writer lock.
    """
    with exclusive(path) as stamp:
        ring = load_keyring(path)
        updated = _rotated(ring, path, reinstate=reinstate, stage=stage, promote=promote,
                           unstage=unstage)
        parse_keyring(updated.to_json(), f"keyring {path}")
        write_keyring(path, updated, expect=stamp)
        return updated


def _rotated(
    ring: Keyring,
    path: Path,
    *,
    reinstate: str | None,
    stage: bool,
    promote: str | None,
    unstage: str | None,
) -> Keyring:
    staged = [k for k in ring.keys if k.state == "staged"]
    if promote is not None or unstage is not None:
        name = promote if promote is not None else unstage
        key = ring.find(name or "")
        if key is None or key.state != "staged":
            raise KeyringError(f"keyring {path} has no staged key {name}")
        if unstage is not None:
            return Keyring(ring.name, ring.next_generation,
                           tuple(k for k in ring.keys if k.generation != key.generation))
        newest = max(k.generation for k in staged)
        if key.generation != newest:
            raise KeyringError(f"promote the newest staged key (g{newest}) instead")
        # older staged keys (from before a second stage was refused) never wrapped: drop them
        rest = tuple(k for k in ring.keys if k.state != "staged")
        return Keyring(ring.name, ring.next_generation,
                       (RingKey(key.generation, key.key, key.created), *rest))
    if stage and staged:
        g = max(k.generation for k in staged)
        raise KeyringError(
            f"keyring {path} already has a staged key g{g}: promote it (kms-plugin rotate "
            f"--promote g{g}) or drop it (kms-plugin rotate --unstage g{g}) first"
        )
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
        # a new primary supersedes a staged key: it never wrapped anything, drop it
        keys = (RingKey(ring.next_generation, material, _now()),
                *(k for k in ring.keys if k.state != "staged"))
    return Keyring(ring.name, ring.next_generation + 1, keys)


def set_state(path: Path, version: str, state: str) -> Keyring:
    """Enable or disable one key of the ring (revocation drill, recovery)."""
    with exclusive(path) as stamp:
        ring = load_keyring(path)
        if ring.find(version) is None:
            raise KeyringError(f"keyring {path} has no key {version}")
        keys = tuple(
            RingKey(k.generation, k.key, k.created, state) if k.version == version else k
            for k in ring.keys
        )
        updated = Keyring(ring.name, ring.next_generation, keys)
        write_keyring(path, updated, expect=stamp)
        return updated


class LocalBackend(KeyBackend):
    name: ClassVar[str] = "local"
    OPTIONS: ClassVar[frozenset[str]] = frozenset({"keyring", "allow_rollback"})

    def __init__(self, keyring_path: Path, *, allow_rollback: bool = False) -> None:
        self.path = keyring_path
        self.allow_rollback = allow_rollback
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int, int] | None = None
        self._ring: Keyring | None = None
        self._high_next = 0  # the highest next_generation loaded
        self._seen: dict[int, str] = {}  # generation -> root_version of non-staged keys
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
        allow = options.get("allow_rollback", False)
        if isinstance(allow, str):
            allow = allow.strip().lower() in ("1", "true", "yes", "on")
        return cls(Path(str(path)), allow_rollback=bool(allow))

    def _check_rollback(self, ring: Keyring) -> None:
        """Refuse a file that went back (see the module doc); remember what it holds."""
        if not self.allow_rollback and self._ring is not None:
            problems = []
            if ring.next_generation < self._high_next:
                problems.append(
                    f"next_generation went down from {self._high_next} to {ring.next_generation}"
                )
            present = {k.generation: k.root_version for k in ring.keys if k.state != "staged"}
            lost = sorted(g for g, v in self._seen.items() if present.get(g) != v)
            if lost:
                problems.append(
                    "keys seen before are missing or changed: "
                    + ", ".join(f"g{g}" for g in lost)
                )
            if problems:
                raise KeyringRollback(
                    f"KEYRING ROLLBACK REFUSED: keyring {self.path}: {'; '.join(problems)}. "
                    "Still using the keys loaded before. Restore the newest keyring, or restart "
                    "with --local-allow-rollback if a restore from backup is intended"
                )
        self._high_next = max(self._high_next, ring.next_generation)
        for k in ring.keys:
            if k.state != "staged":
                self._seen[k.generation] = k.root_version

    def _reload(self, force: bool = False) -> Keyring:
        """Return the keyring, re-reading the file when it changed on disk."""
        with self._lock:
            try:
                st = self.path.stat()
            except OSError as exc:
                if self._ring is not None and not force:
                    raise KeyringUnusable(
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
                    raise KeyringUnusable(str(exc)) from None
                if self._ring is not None and ring.name != self._ring.name:
                    raise KeyringUnusable(f"keyring {self.path} changed its name; refused")
                self._check_rollback(ring)
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
    "KeyringRollback",
    "KeyringUnusable",
    "LocalBackend",
    "RingKey",
    "check_permissions",
    "keygen",
    "load_keyring",
    "rotate",
    "set_state",
]
