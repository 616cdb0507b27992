"""The local key hierarchy: root key (backend) -> local KEK (memory) -> seeds/DEKs.

The plugin generates a local key-encryption key (AES-256), has the backend wrap it once and
keeps it in memory; every Encrypt seals with it, with no backend call.  The wrapped local KEK
travels in the annotation (:class:`~kms_plugin.envelope.KekRecord`), so any plugin process can
read the ciphertext later by unwrapping it once through the backend; unwrapped KEKs stay in a
bounded LRU cache whose misses are single-flight.

The *current key* is one immutable :class:`LocalKek` object swapped atomically (one reference
assignment), so the key_id answered by Status and the key_id returned with a ciphertext always
come from the same snapshot.  The local KEK rotates by age and by use count (configurable, far
below AES-GCM's 2^32 random-nonce limit); that changes neither key_id nor anything the
apiserver sees except the annotation.  key_id changes only when the backend's root key version
changes (:meth:`KeyManager.refresh_root`).
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kms_plugin.backends.base import KeyBackend, RootKeyVersion
from kms_plugin.backends.errors import (
    BackendError,
    BackendUnavailable,
    InvalidCiphertext,
)
from kms_plugin.cache import SingleFlightLRU, WaitTimeout
from kms_plugin.envelope import (
    ANNOTATION_KEY,
    KEY_SIZE,
    MAX_SEALED_PLAINTEXT,
    NONCE_SIZE,
    EnvelopeError,
    KekRecord,
    LegacyBlob,
    SealedSeed,
    derive_key_id,
    key_id_hash,
    legacy_header,
    local_kek_context,
    parse_decrypt_request,
    parse_legacy_blob,
    seed_header,
    split_legacy,
    split_seed,
)

# a deadline (time.monotonic()), none, or a function giving it: the requests pass a function,
# so the deadline is worked out only when the backend is needed (a cache miss)
Deadline = float | None | Callable[[], float | None]

log = logging.getLogger("kms_plugin.keys")

# AES-GCM with random 96-bit nonces: stay far below 2^32 messages per key.  The soft limit
# (policy.max_uses) triggers a background rotation; the hard limit refuses to encrypt.
HARD_MAX_USES = 2**30
UNUSABLE_SUFFIX = ":root-key-unusable"
MAX_POLICY_USES = 2**28


@dataclass(frozen=True)
class KekPolicy:
    max_age_seconds: float = 24 * 3600.0
    max_uses: int = 1_000_000
    verify_wrap: bool = True  # unwrap a freshly wrapped local KEK once before using it

    def __post_init__(self) -> None:
        if self.max_age_seconds <= 0:
            raise ValueError("local KEK max age must be > 0")
        if not 1 <= self.max_uses <= MAX_POLICY_USES:
            raise ValueError(f"local KEK max uses must be within 1..{MAX_POLICY_USES}")


class KeyEvents:
    """Hooks the key manager calls; the defaults do nothing (metrics override them)."""

    def cache_event(self, kind: str) -> None:  # "hit" | "miss" | "coalesced"
        pass

    def kek_created(self, reason: str, kek: LocalKek) -> None:
        pass


@dataclass(eq=False)
class LocalKek:
    """One local KEK and the record that names it.  Immutable except the use counter."""

    record: KekRecord
    record_bytes: bytes
    key_id: str
    aead: AESGCM
    created_at: float  # time.monotonic()
    created_wall: float  # time.time()
    _uses: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _used: int = 0
    # fixed parts of every ciphertext sealed with this KEK, built once
    seed_header: bytes = field(init=False, repr=False)
    seed_aad: bytes = field(init=False, repr=False)
    legacy_header: bytes = field(init=False, repr=False)
    legacy_aad: bytes = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.seed_header = seed_header(self.record.kek_id)
        self.legacy_header = legacy_header(self.key_id, self.record_bytes)
        self.seed_aad = SealedSeed.aad(self.record.kek_id, self.key_id)
        self.legacy_aad = LegacyBlob.aad(self.record.kek_id, self.key_id)

    @property
    def kek_id(self) -> bytes:
        return self.record.kek_id

    @property
    def root(self) -> RootKeyVersion:
        return self.record.root

    @property
    def annotations(self) -> dict[str, bytes]:
        return {ANNOTATION_KEY: self.record_bytes}

    def take_use(self) -> int:
        # next() on itertools.count is atomic under the GIL: no lock on the hot path
        n = next(self._uses)
        self._used = n
        return n

    @property
    def uses(self) -> int:
        return self._used

    def age(self, now: float | None = None) -> float:
        return (time.monotonic() if now is None else now) - self.created_at


class OpenKek:
    """An unwrapped local KEK as the cache holds it, under the exact bytes of its record.

    Only a record that passed the strict parse (or one this process made) gets here, with the
    key_id derived from it, so a Decrypt whose annotation is these bytes needs no parsing: it
    compares the ciphertext's local KEK id and the request's key_id with these.
    """

    __slots__ = ("aead", "kek_id", "key_id", "key_id_bytes", "seed_aad", "legacy_aad")

    def __init__(self, aead: AESGCM, record: KekRecord) -> None:
        self.aead = aead
        self.kek_id = record.kek_id
        self.key_id = record.key_id
        self.key_id_bytes = record.key_id.encode()
        self.seed_aad = SealedSeed.aad(record.kek_id, record.key_id)
        self.legacy_aad = LegacyBlob.aad(record.kek_id, record.key_id)

    def __repr__(self) -> str:  # never the key
        return f"OpenKek(key_id={self.key_id!r})"


def _cache_key(record_bytes: bytes) -> bytes:
    # the record itself (at most a few hundred bytes): hashing it costs less than a digest
    return record_bytes


class KeyManager:
    def __init__(
        self,
        backend: KeyBackend,
        backend_name: str,
        *,
        policy: KekPolicy | None = None,
        cache_size: int = 4096,
        events: KeyEvents | None = None,
        on_rotation_due: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        backend_slots: int | None = None,
    ) -> None:
        """``backend_slots``: how many requests may wait for the backend at once (None: no
        limit); more are refused at once with BackendUnavailable."""
        self.backend = backend
        self.backend_name = backend_name
        self.policy = policy or KekPolicy()
        self._events = events or KeyEvents()
        self._cache: SingleFlightLRU[bytes, OpenKek] = SingleFlightLRU(
            cache_size, on_event=self._events.cache_event
        )
        self._current: LocalKek | None = None
        self._encrypt_block: BackendError | None = None
        self._swap_lock = threading.Lock()  # serialises creation of new local KEKs
        self._on_rotation_due = on_rotation_due
        self._clock = clock
        self._backend_slots = (
            threading.BoundedSemaphore(backend_slots) if backend_slots is not None else None
        )

    # --- the snapshot --------------------------------------------------------------------

    @property
    def current(self) -> LocalKek | None:
        return self._current

    def status_key_id(self) -> str:
        """The key_id Status reports.  While Encrypt is blocked (root key disabled or gone) it
        is the current key_id with UNUSABLE_SUFFIX: kube-apiserver extends its cached seed
        for as long as Status keeps the key_id it has, so an unchanged key_id would let it
        write on under a revoked key; a changed one makes it ask Encrypt (refused) and its
        seed expires (docs/kms-plugin.md, "Revocation")."""
        cur = self._current
        if cur is None:
            return ""
        return cur.key_id if self._encrypt_block is None else cur.key_id + UNUSABLE_SUFFIX

    def block_encrypt(self, reason: BackendError | None) -> None:
        """Refuse (or allow again) Encrypt, e.g. while the root key is disabled."""
        self._encrypt_block = reason

    @property
    def encrypt_blocked(self) -> BackendError | None:
        return self._encrypt_block

    @property
    def cache_len(self) -> int:
        return len(self._cache)

    # --- creating local KEKs (background: start-up, refresh, rotation) --------------------

    def _new_kek(self, deadline: float | None) -> LocalKek:
        key = AESGCM.generate_key(bit_length=256)
        kek_id = os.urandom(16)
        context = local_kek_context(kek_id)
        result = self.backend.wrap(key, context, deadline=deadline)
        try:
            record = KekRecord(kek_id, self.backend_name, result.key, result.ciphertext)
        except EnvelopeError as exc:
            raise BackendError(f"backend returned an unusable wrap result: {exc.reason}") from exc
        if self.policy.verify_wrap:
            check = self.backend.unwrap(result.ciphertext, result.key, context, deadline=deadline)
            if check != key:
                raise InvalidCiphertext("backend failed to unwrap a freshly wrapped local KEK")
        record_bytes = record.encode()
        aead = AESGCM(key)
        self._cache.put(_cache_key(record_bytes), OpenKek(aead, record))
        return LocalKek(
            record=record,
            record_bytes=record_bytes,
            key_id=derive_key_id(self.backend_name, result.key),
            aead=aead,
            created_at=self._clock(),
            created_wall=time.time(),
        )

    def _install(self, kek: LocalKek, reason: str) -> None:
        old = self._current
        self._current = kek  # the one atomic swap
        self._events.kek_created(reason, kek)
        if old is None or old.key_id != kek.key_id:
            log.info(
                "key_id is now %s (root key %s version %s, reason %s)",
                key_id_hash(kek.key_id),
                kek.root.key_ref,
                kek.root.version,
                reason,
                extra={"key_id_hash": key_id_hash(kek.key_id), "reason": reason},
            )
        else:
            log.info(
                "local KEK rotated (reason %s), key_id unchanged",
                reason,
                extra={"key_id_hash": key_id_hash(kek.key_id), "reason": reason},
            )

    def refresh_root(self, *, deadline: float | None = None) -> bool:
        """Ask the backend for its current root key version; new version -> new key_id.

        Returns True when a new local KEK (and key_id) was installed.
        """
        root = self.backend.current_key(deadline=deadline)
        with self._swap_lock:
            cur = self._current
            if cur is not None and cur.root == root:
                return False
            kek = self._new_kek(deadline)
            self._install(kek, "startup" if cur is None else "root-key-changed")
            return True

    def rotation_due(self, now: float | None = None) -> str | None:
        """Why the local KEK should rotate now ("age" / "uses"), or None."""
        cur = self._current
        if cur is None:
            return None
        if cur.uses >= self.policy.max_uses:
            return "uses"
        if cur.age(self._clock() if now is None else now) >= self.policy.max_age_seconds:
            return "age"
        return None

    def rotate_local_kek(self, reason: str, *, deadline: float | None = None) -> None:
        """Wrap a fresh local KEK under the current root key and install it."""
        with self._swap_lock:
            self._install(self._new_kek(deadline), reason)

    # --- the hot paths -------------------------------------------------------------------

    def _kek_for_encrypt(self) -> LocalKek:
        blocked = self._encrypt_block
        if blocked is not None:
            raise type(blocked)(str(blocked))
        kek = self._current
        if kek is None:
            raise BackendUnavailable("no root key is available yet")
        uses = kek.take_use()
        if uses >= HARD_MAX_USES:
            raise BackendUnavailable(
                "local KEK reached its use limit and the backend could not wrap a new one"
            )
        if uses == self.policy.max_uses and self._on_rotation_due is not None:
            self._on_rotation_due()
        return kek

    def encrypt_seed(self, plaintext: bytes) -> tuple[bytes, str, dict[str, bytes]]:
        """KMS v2 Encrypt: (ciphertext, key_id, annotations)."""
        if not 1 <= len(plaintext) <= MAX_SEALED_PLAINTEXT:
            raise EnvelopeError("plaintext length out of range")
        kek = self._kek_for_encrypt()
        nonce = os.urandom(NONCE_SIZE)
        sealed = kek.aead.encrypt(nonce, plaintext, kek.seed_aad)
        return kek.seed_header + nonce + sealed, kek.key_id, kek.annotations

    def encrypt_legacy(self, plaintext: bytes) -> tuple[bytes, str]:
        """KMS v1beta1 Encrypt: one self-contained blob (and the key_id inside it)."""
        if not plaintext:
            raise EnvelopeError("empty plaintext")
        kek = self._kek_for_encrypt()
        nonce = os.urandom(NONCE_SIZE)
        sealed = kek.aead.encrypt(nonce, plaintext, kek.legacy_aad)
        return kek.legacy_header + nonce + sealed, kek.key_id

    def _open(self, record: KekRecord, record_bytes: bytes, deadline: Deadline) -> OpenKek:
        """The local KEK of a strictly parsed record: from the cache, or unwrapped once."""
        if record.backend != self.backend_name:
            raise EnvelopeError("record names another backend")

        def load() -> OpenKek:
            key = self.backend.unwrap(
                record.wrapped, record.root, local_kek_context(record.kek_id), deadline=until
            )
            if len(key) != KEY_SIZE:
                raise InvalidCiphertext("backend returned a key of the wrong size")
            return OpenKek(AESGCM(key), record)

        until = deadline() if callable(deadline) else deadline
        cache_key = _cache_key(record_bytes)
        slots = self._backend_slots
        if slots is None:
            return self._load_kek(cache_key, load, until)
        entry = self._cache.get(cache_key)
        if entry is not None:  # answered from memory, no slot needed
            self._events.cache_event("hit")
            return entry
        # a request that waits for the backend holds a server thread: at most `slots` of them
        # wait at once, so Status and requests answered from memory always find a thread
        if not slots.acquire(blocking=False):
            raise BackendUnavailable(
                "plugin busy: too many requests already wait for the backend; try again"
            )
        try:
            return self._load_kek(cache_key, load, until)
        finally:
            slots.release()

    def _load_kek(
        self, cache_key: bytes, load: Callable[[], OpenKek], deadline: float | None
    ) -> OpenKek:
        try:
            return self._cache.get_or_load(cache_key, load, deadline=deadline)
        except WaitTimeout as exc:
            raise BackendUnavailable("backend did not answer within the request deadline") from exc

    def _cached(self, record_bytes: object) -> OpenKek | None:
        """The hot path's lookup: the cached local KEK of these exact record bytes, or None.
        Not counted: the caller counts a hit once the request matches the entry (otherwise
        the strict path counts its own lookup)."""
        if type(record_bytes) is not bytes:
            return None
        return self._cache.get(_cache_key(record_bytes))

    def decrypt_seed(
        self,
        ciphertext: bytes,
        key_id: str,
        annotations: Mapping[str, bytes],
        *,
        deadline: Deadline = None,
    ) -> bytes:
        """KMS v2 Decrypt.  Strict parsing first (any mismatch is an EnvelopeError), except
        for a record this process holds: then its checked parts are compared."""
        kek_id, nonce, sealed = split_seed(ciphertext)
        entry = self._cached(annotations.get(ANNOTATION_KEY)) if len(annotations) == 1 else None
        if entry is not None and entry.key_id == key_id and entry.kek_id == kek_id:
            self._events.cache_event("hit")
        else:
            inp = parse_decrypt_request(ciphertext, key_id, annotations)
            entry = self._open(inp.record, inp.record_bytes, deadline)
        try:
            return entry.aead.decrypt(nonce, sealed, entry.seed_aad)
        except InvalidTag as exc:
            raise EnvelopeError("authentication failed") from exc

    def decrypt_legacy(
        self, blob: bytes, *, deadline: Deadline = None
    ) -> tuple[bytes, str]:
        """KMS v1beta1 Decrypt: (plaintext, key_id of the blob)."""
        key_id, record_bytes, nonce, sealed = split_legacy(blob)
        entry = self._cached(record_bytes)
        if entry is not None and entry.key_id_bytes == key_id:
            self._events.cache_event("hit")
        else:
            legacy, record = parse_legacy_blob(blob)
            entry = self._open(record, legacy.record, deadline)
        try:
            return entry.aead.decrypt(nonce, sealed, entry.legacy_aad), entry.key_id
        except InvalidTag as exc:
            raise EnvelopeError("authentication failed") from exc

    def close(self) -> None:
        self._cache.clear()
        self.backend.close()


__all__ = [
    "HARD_MAX_USES",
    "UNUSABLE_SUFFIX",
    "Deadline",
    "KekPolicy",
    "KeyEvents",
    "KeyManager",
    "LocalKek",
    "OpenKek",
]
