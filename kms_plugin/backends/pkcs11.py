"""The ``pkcs11`` backend: an AES-256 root key inside an HSM, through python-pkcs11.

Options: ``module`` (PKCS#11 library path), ``token_label``, ``key_label``, ``pin_file`` (the
user PIN, first line; refused if group or others may read it).

**Key versions.**  The root key is the set of AES-256 secret-key objects on the token that
carry ``key_label`` *and were generated inside the token and never left it*: ``CKA_LOCAL``,
``CKA_NEVER_EXTRACTABLE`` and ``CKA_ALWAYS_SENSITIVE`` all true.  Any other object with the
label (imported, once extractable, another length) is ignored, logged and counted
(``rejected_keys``): whoever knows the PIN cannot make the plugin adopt a key they know.
An object's version is ``<CKA_ID hex>.<fingerprint>``; the fingerprint is the token's
``CKA_CHECK_VALUE`` (computed inside the token from the material), so two tokens or two
concurrent rotations that both create ID N never report the same key_id for different
material.  The current key is the one with the highest ID (ties: the highest fingerprint, so
every plugin picks the same).  ``kms-plugin rotate`` creates a new object with ID = highest + 1
inside the HSM with exactly the usages the plugin needs (encrypt, decrypt; no wrap, unwrap,
sign, verify or derive).  Records written before fingerprints existed name a bare ID; they
unwrap with the one genuine key of that ID.  A key whose ``CKA_ENCRYPT`` (``CKA_DECRYPT``)
is false is *disabled* for wrapping (unwrapping): KeyDisabled.

**Wrapping** is CKM_AES_GCM inside the HSM with a random 96-bit nonce; the associated data
binds key_ref, version and the caller's context.  Blob: ``0x01 | nonce[12] | ct+tag``.

**Threads.**  python-pkcs11 initialises the module with ``C_Initialize(NULL)``, which tells it
that the application never calls it from two threads at once (SoftHSM2 then runs without
locks).  So every call into a module goes through one process-wide lock per module path,
shared by all backends of the process.  The lock is taken with the caller's deadline (else
``DEFAULT_TIMEOUT``): a caller that cannot get it in time gets BackendUnavailable instead of
waiting past the apiserver's timeout.

**PIN.**  A refused, locked or expired PIN is CredentialsRefused (outcome
``credentials_refused``, an alert).  The login is not retried on every call: the PIN file is
re-read first; the same PIN is tried again only after a backoff (``PIN_BACKOFF_MIN`` doubling
to ``PIN_BACKOFF_MAX``), a changed PIN at once.  Real HSMs lock the PIN after a few failures.

**Lost sessions.**  One session per backend.  When a call fails because
the session, the login, an object handle or the device went away, the backend re-opens the
session (logging in again), looks the key up again and retries the call once; if that fails
too the error is BackendUnavailable.  PKCS#11 calls are local and not cancellable: a deadline
bounds the wait for the lock, not a call already inside the module.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11 import exceptions as p11e
from pkcs11.mechanisms import GCMParams

from kms_plugin.backends.base import KeyBackend, RootKeyVersion, WrapResult, wrap_aad
from kms_plugin.backends.errors import (
    BackendConfigError,
    BackendError,
    BackendUnavailable,
    CredentialsRefused,
    InvalidCiphertext,
    KeyDisabled,
    KeyNotFound,
)

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 5.0  # seconds to wait for the module lock when the caller has no deadline
PIN_BACKOFF_MIN = 5.0
PIN_BACKOFF_MAX = 300.0
# a root key must have been generated in the token and never have been readable outside it
_GENUINE = (Attribute.LOCAL, Attribute.NEVER_EXTRACTABLE, Attribute.ALWAYS_SENSITIVE)
# usages a root key must not have: the plugin only encrypts and decrypts with it
_FORBIDDEN_USAGES = (Attribute.WRAP, Attribute.UNWRAP, Attribute.SIGN, Attribute.VERIFY,
                     Attribute.DERIVE)
_FINGERPRINT_NONCE = b"kms-fp-nonce"  # 12 bytes; only for tokens without CKA_CHECK_VALUE
_FINGERPRINT_DATA = b"kms-plugin pkcs11 key fingerprint v1"

_BLOB_V1 = 0x01
_NONCE = 12
_AAD_DOMAIN = b"kms-plugin.edge.io/pkcs11-backend-wrap\x00"
_ID_BYTES = 4

# the session, the login or a handle is gone: re-open and retry once
_SESSION_ERRORS: tuple[type[BaseException], ...] = tuple(
    getattr(p11e, name)
    for name in (
        "SessionClosed", "SessionHandleInvalid", "DeviceRemoved", "DeviceError",
        "TokenNotPresent", "UserNotLoggedIn", "ObjectHandleInvalid", "KeyHandleInvalid",
        "CryptokiNotInitialised", "DeviceMemory", "OperationActive",
    )
    if hasattr(p11e, name)
)  # fmt: skip
# the ciphertext (or its associated data) is wrong
_DATA_ERRORS: tuple[type[BaseException], ...] = tuple(
    getattr(p11e, name)
    for name in (
        "EncryptedDataInvalid", "EncryptedDataLenRange", "DataInvalid", "DataLenRange",
        "GeneralError", "FunctionFailed", "SignatureInvalid",
    )
    if hasattr(p11e, name)
)  # fmt: skip

_PIN_ERRORS: tuple[type[BaseException], ...] = tuple(
    getattr(p11e, name)
    for name in ("PinIncorrect", "PinLocked", "PinExpired", "PinInvalid", "PinLenRange")
    if hasattr(p11e, name)
)  # fmt: skip

T = TypeVar("T")

_MODULE_LOCKS: dict[str, threading.RLock] = {}
_MODULE_LOCKS_GUARD = threading.Lock()


def module_lock(module: str) -> threading.RLock:
    """The one lock serialising every call into the PKCS#11 module at this path."""
    key = os.path.realpath(module)
    with _MODULE_LOCKS_GUARD:
        lock = _MODULE_LOCKS.get(key)
        if lock is None:
            lock = _MODULE_LOCKS[key] = threading.RLock()
        return lock


def version_of(key_id: bytes, fingerprint: str = "") -> str:
    """The version string of a key object: CKA_ID in hex, then its fingerprint."""
    ident = key_id.hex() if key_id else "00"
    return f"{ident}.{fingerprint}" if fingerprint else ident


def _order(version: str) -> int:
    return int(version.split(".", 1)[0], 16)


def _sort_key(version: str) -> tuple[int, str]:
    return _order(version), version


@dataclass
class _PinState:
    """What the last refused login tried, and when to try the same PIN again."""

    refused_pin_digest: bytes
    retry_at: float
    backoff: float
    failures: int


def read_pin(path: Path) -> str:
    try:
        st = path.stat()
    except OSError as exc:
        raise BackendConfigError(f"pkcs11: PIN file {path}: {exc.strerror or exc}") from None
    if st.st_mode & 0o044:
        raise BackendConfigError(
            f"pkcs11: PIN file {path} has mode {stat.S_IMODE(st.st_mode):04o}: group and "
            f"others must not read it (chmod 600 {path})"
        )
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise BackendConfigError(
            f"pkcs11: PIN file {path} unreadable ({type(exc).__name__})"
        ) from None
    pin = lines[0].strip() if lines else ""
    if not pin:
        raise BackendConfigError(f"pkcs11: PIN file {path} is empty")
    return pin


def _digest(pin: str) -> bytes:
    return hashlib.sha256(pin.encode()).digest()


class Pkcs11Backend(KeyBackend):
    name: ClassVar[str] = "pkcs11"
    OPTIONS: ClassVar[frozenset[str]] = frozenset({"module", "token_label", "key_label",
                                                   "pin_file"})

    def __init__(
        self, module: str, token_label: str, key_label: str, pin: str,
        *, pin_file: Path | None = None,
    ) -> None:
        self.module = module
        self.token_label = token_label
        self.key_label = key_label
        self._pin = pin
        self._pin_file = pin_file
        self._pin_state: _PinState | None = None
        self._lock = module_lock(module)
        self._session: Any = None
        self._keys: dict[str, Any] = {}  # version -> key object of the open session
        self._current: str | None = None
        self._warned: set[tuple[str, str]] = set()  # (object id, reason) already logged
        self.reopens = 0  # sessions re-opened after a loss (tests, metrics)
        self.rejected_keys = 0  # objects with our label refused as root keys, last scan
        self.login_attempts = 0  # C_Login calls with the user PIN (tests)
        try:
            with self._lock:
                self._lib = pkcs11.lib(module)
        except Exception as exc:  # OSError-like failures of dlopen come as PKCS11Error
            raise BackendConfigError(f"pkcs11: cannot load module {module}: {exc}") from None
        try:
            with self._locked(None):
                self._open()
        except BackendUnavailable as exc:  # incl. a refused PIN: at start-up, a config error
            raise BackendConfigError(str(exc)) from None

    @classmethod
    def from_options(cls, options: Mapping[str, object]) -> Pkcs11Backend:
        unknown = set(options) - cls.OPTIONS
        if unknown:
            raise BackendConfigError(f"pkcs11 backend: unknown options {sorted(unknown)}")
        missing = [k for k in ("module", "token_label", "key_label", "pin_file")
                   if not options.get(k)]
        if missing:
            raise BackendConfigError(f"pkcs11 backend: missing options {missing}")
        return cls(
            str(options["module"]),
            str(options["token_label"]),
            str(options["key_label"]),
            read_pin(Path(str(options["pin_file"]))),
            pin_file=Path(str(options["pin_file"])),
        )

    # --- session handling ----------------------------------------------------------------

    def _open(self) -> None:
        """(Re-)open the session and log in; forget every handle of the old session."""
        self._keys.clear()
        old, self._session = self._session, None
        if old is not None:
            try:
                old.close()
            except Exception:  # already gone: that's why we are here
                pass
        try:
            token = self._lib.get_token(token_label=self.token_label)
        except p11e.NoSuchToken:
            raise BackendUnavailable(f"pkcs11: no token labelled {self.token_label!r}") from None
        except p11e.PKCS11Error as exc:
            raise BackendUnavailable(
                f"pkcs11: token lookup failed ({type(exc).__name__})"
            ) from None
        self._check_pin_backoff()
        try:
            self.login_attempts += 1
            self._session = token.open(rw=True, user_pin=self._pin)
            self._pin_state = None
        except p11e.UserAlreadyLoggedIn:
            # another session of this process is logged in: sessions share the login state
            self._session = token.open(rw=True)
        except _PIN_ERRORS as exc:
            raise self._pin_refused(type(exc).__name__) from None
        except p11e.PKCS11Error as exc:
            raise BackendUnavailable(
                f"pkcs11: cannot open a session ({type(exc).__name__})"
            ) from None

    def _check_pin_backoff(self) -> None:
        """Before a login: re-read the PIN file; refuse to retry a refused PIN too soon."""
        state = self._pin_state
        if state is None:
            return
        if self._pin_file is not None:
            with contextlib.suppress(BackendConfigError):
                self._pin = read_pin(self._pin_file)
        if _digest(self._pin) != state.refused_pin_digest:
            return  # the operator changed the PIN: try it now
        now = time.monotonic()
        if now < state.retry_at:
            raise CredentialsRefused(
                f"pkcs11: the PIN was refused {state.failures} time(s); not trying it again "
                f"for {state.retry_at - now:.0f} s (fix {self._pin_file or 'the PIN'} or the "
                "token; HSMs lock a PIN after a few failures)"
            )

    def _pin_refused(self, why: str) -> CredentialsRefused:
        old = self._pin_state
        digest = _digest(self._pin)
        same = old is not None and old.refused_pin_digest == digest
        backoff = min(PIN_BACKOFF_MAX, old.backoff * 2) if same and old else PIN_BACKOFF_MIN
        failures = (old.failures + 1) if old is not None else 1
        self._pin_state = _PinState(digest, time.monotonic() + backoff, backoff, failures)
        log.error(
            "pkcs11: the token refused the user PIN (%s); next try in %.0f s or when the PIN "
            "file changes", why, backoff,
            extra={"token": self.token_label, "failures": failures},
        )
        return CredentialsRefused(f"pkcs11: the PIN was refused ({why})")

    @contextlib.contextmanager
    def _locked(self, deadline: float | None) -> Iterator[None]:
        """Hold the module lock, waiting at most until ``deadline`` for it."""
        timeout = DEFAULT_TIMEOUT if deadline is None else deadline - time.monotonic()
        if not self._lock.acquire(timeout=max(0.0, timeout)):
            raise BackendUnavailable(
                "pkcs11: the HSM is busy (module lock not free before the deadline)"
            )
        try:
            yield
        finally:
            self._lock.release()

    def _with_session(self, fn: Callable[[], T], deadline: float | None = None) -> T:
        with self._locked(deadline):
            if self._session is None:
                self._open()
            try:
                return fn()
            except _SESSION_ERRORS:
                pass
            self.reopens += 1
            self._open()
            try:
                return fn()
            except _SESSION_ERRORS as exc:
                raise BackendUnavailable(
                    f"pkcs11: session lost again after re-opening ({type(exc).__name__})"
                ) from None

    def _reject(self, obj_id: str, reason: str) -> None:
        self.rejected_keys += 1
        if (obj_id, reason) not in self._warned:
            self._warned.add((obj_id, reason))
            log.warning(
                "pkcs11: object %s labelled %r is not used as a root key: %s",
                obj_id, self.key_label, reason,
                extra={"token": self.token_label, "object_id": obj_id, "reason": reason},
            )

    def _fingerprint(self, obj: Any) -> str:
        """A fingerprint of the key material computed inside the token."""
        try:
            check = bytes(obj[Attribute.CHECK_VALUE] or b"")
        except (p11e.AttributeTypeInvalid, p11e.AttributeSensitive):
            check = b""
        if check:
            return check.hex()
        # no CKA_CHECK_VALUE on this token: a MAC over a constant, computed by the token
        sealed = obj.encrypt(
            _FINGERPRINT_DATA, mechanism=Mechanism.AES_GCM,
            mechanism_param=GCMParams(_FINGERPRINT_NONCE, b"", 128),
        )
        return hashlib.sha256(bytes(sealed)).hexdigest()[:12]

    def _scan(self) -> dict[str, Any]:
        """Every genuine version of the root key: version -> key object."""
        found: dict[str, Any] = {}
        rejected_before = self.rejected_keys
        self.rejected_keys = 0
        try:
            for obj in self._session.get_objects(
                {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: self.key_label}
            ):
                try:
                    raw_id = bytes(obj[Attribute.ID] or b"")
                    obj_id = raw_id.hex() or "00"
                    if obj.key_type != KeyType.AES or obj[Attribute.VALUE_LEN] != 32:
                        self._reject(obj_id, "not an AES-256 key")
                        continue
                    missing = [a.name for a in _GENUINE if not obj[a]]
                    if missing:
                        self._reject(obj_id, "not generated inside the token or once "
                                     f"extractable ({', '.join(missing)} false)")
                        continue
                    version = version_of(raw_id, self._fingerprint(obj))
                except _SESSION_ERRORS:
                    raise
                except p11e.PKCS11Error:
                    continue  # an object another session is still creating: next scan
                found[version] = obj
        except BaseException:
            self.rejected_keys = rejected_before
            raise
        self._keys = found
        self._current = max(found, key=_sort_key) if found else None
        return found

    def _key(self, version: str) -> Any:
        key = self._lookup(version)
        if key is None:
            self._scan()
            key = self._lookup(version)
        if key is None:
            raise KeyNotFound(f"HSM key {self.key_label!r} version {version} does not exist")
        return key

    def _lookup(self, version: str) -> Any:
        key = self._keys.get(version)
        if key is not None or "." in version:
            return key
        # a record from before fingerprints: the one genuine key with that ID
        same_id = [v for v in self._keys if v.split(".", 1)[0] == version]
        if len(same_id) > 1:
            raise KeyNotFound(
                f"HSM key {self.key_label!r} ID {version} names {len(same_id)} keys; refused"
            )
        return self._keys[same_id[0]] if same_id else None

    # --- KeyBackend ----------------------------------------------------------------------

    def current_key(self, *, deadline: float | None = None) -> RootKeyVersion:
        def op() -> RootKeyVersion:
            self._scan()
            if self._current is None:
                raise KeyNotFound(
                    f"no AES-256 key labelled {self.key_label!r} on token {self.token_label!r}"
                )
            return RootKeyVersion(self.key_label, self._current)

        return self._with_session(op, deadline)

    def wrap(
        self, plaintext: bytes, context: Mapping[str, str], *, deadline: float | None = None
    ) -> WrapResult:
        def op() -> WrapResult:
            if self._current is None:
                self._scan()
            if self._current is None:
                raise KeyNotFound(f"no AES-256 key labelled {self.key_label!r}")
            version = self._current
            key = self._key(version)
            if not key[Attribute.ENCRYPT]:
                raise KeyDisabled(f"HSM key {self.key_label!r} version {version} is disabled")
            nonce = os.urandom(_NONCE)
            aad = wrap_aad(_AAD_DOMAIN, RootKeyVersion(self.key_label, version), context)
            try:
                sealed = key.encrypt(
                    plaintext, mechanism=Mechanism.AES_GCM,
                    mechanism_param=GCMParams(nonce, aad, 128),
                )
            except _SESSION_ERRORS:
                raise
            except p11e.PKCS11Error as exc:
                # e.g. a key object seen while another session was still creating it: forget
                # the handles so that the next call looks the key up again
                self._keys.clear()
                self._current = None
                raise BackendUnavailable(
                    f"pkcs11: encrypt failed ({type(exc).__name__})"
                ) from None
            blob = bytes([_BLOB_V1]) + nonce + bytes(sealed)
            return WrapResult(blob, RootKeyVersion(self.key_label, version))

        return self._with_session(op, deadline)

    def unwrap(
        self,
        ciphertext: bytes,
        key: RootKeyVersion,
        context: Mapping[str, str],
        *,
        deadline: float | None = None,
    ) -> bytes:
        if key.key_ref != self.key_label:
            raise KeyNotFound(f"HSM key {key.key_ref!r} is not the configured key label")
        try:
            _order(key.version)
            if key.version.count(".") > 1 or not key.version.isascii():
                raise ValueError(key.version)
        except ValueError:
            raise KeyNotFound(f"HSM key version {key.version!r} is not an ID") from None
        if len(ciphertext) < 1 + _NONCE + 16 or ciphertext[0] != _BLOB_V1:
            raise InvalidCiphertext("wrapped key is malformed")
        nonce, sealed = ciphertext[1 : 1 + _NONCE], ciphertext[1 + _NONCE :]

        def op() -> bytes:
            obj = self._key(key.version)
            if not obj[Attribute.DECRYPT]:
                raise KeyDisabled(f"HSM key {key.key_ref!r} version {key.version} is disabled")
            try:
                return bytes(
                    obj.decrypt(
                        sealed, mechanism=Mechanism.AES_GCM,
                        mechanism_param=GCMParams(nonce, wrap_aad(_AAD_DOMAIN, key, context),
                                                  128),
                    )
                )
            except _SESSION_ERRORS:
                raise
            except _DATA_ERRORS:
                raise InvalidCiphertext("wrapped key failed authentication") from None
            except p11e.PKCS11Error as exc:
                raise BackendError(f"pkcs11: decrypt failed ({type(exc).__name__})") from None

        return self._with_session(op, deadline)

    def create_key_version(self, *, first: bool) -> RootKeyVersion:
        """Generate a new AES-256 key object inside the HSM with ID = highest + 1."""

        def op() -> RootKeyVersion:
            found = self._scan()
            if first and found:
                raise BackendConfigError(
                    f"token {self.token_label!r} already has a key labelled {self.key_label!r}; "
                    "use kms-plugin rotate"
                )
            highest = max((_order(v) for v in found), default=0)
            new_id = (highest + 1).to_bytes(max(_ID_BYTES, (highest + 1).bit_length() // 8 + 1),
                                            "big")
            template = {
                Attribute.TOKEN: True, Attribute.PRIVATE: True, Attribute.SENSITIVE: True,
                Attribute.EXTRACTABLE: False, Attribute.ENCRYPT: True,
                Attribute.DECRYPT: True, Attribute.MODIFIABLE: True,
            }
            template.update({usage: False for usage in _FORBIDDEN_USAGES})
            obj = self._session.generate_key(
                KeyType.AES, 256, id=new_id, label=self.key_label, store=True,
                template=template,
            )
            version = version_of(new_id, self._fingerprint(obj))
            self._scan()
            return RootKeyVersion(self.key_label, version)

        return self._with_session(op)

    def set_enabled(self, version: str, enabled: bool) -> None:
        """Allow or forbid wrapping and unwrapping with one key version (revocation drill)."""

        def op() -> None:
            obj = self._key(version)
            obj[Attribute.ENCRYPT] = enabled
            obj[Attribute.DECRYPT] = enabled

        self._with_session(op)

    def drop_session(self) -> None:
        """Close the session under the backend's feet (tests of the lost-session path)."""
        with self._lock:
            if self._session is not None:
                try:
                    self._session.close()
                except Exception:
                    pass

    def close(self) -> None:
        with self._lock:
            self._keys.clear()
            if self._session is not None:
                try:
                    self._session.close()
                except Exception:
                    pass
                self._session = None


__all__ = ["Pkcs11Backend", "read_pin", "version_of"]
