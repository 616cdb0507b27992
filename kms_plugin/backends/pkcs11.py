"""The ``pkcs11`` backend: an AES-256 root key inside an HSM, through python-pkcs11.

Options: ``module`` (PKCS#11 library path), ``token_label``, ``key_label``, ``pin_file`` (the
user PIN, first line; refused if group or others may read it).

**Key versions.**  The root key is the set of AES secret-key objects on the token that carry
``key_label``; each object's ``CKA_ID`` (big-endian unsigned integer, e.g. ``00000003``) is
its version, and the object with the highest ID is the current one.  ``kms-plugin rotate``
creates a new object with ID = highest + 1 inside the HSM (sensitive, not extractable), so
versions only grow and a key_id is never repeated; operators who create key objects with
their own tools must keep IDs increasing too and must never reuse an ID.  Objects with other
lengths than 256 bits are ignored.  A key whose ``CKA_ENCRYPT`` (``CKA_DECRYPT``) is false
is *disabled* for wrapping (unwrapping): KeyDisabled.

**Wrapping** is CKM_AES_GCM inside the HSM with a random 96-bit nonce; the associated data
binds key_ref, version and the caller's context.  Blob: ``0x01 | nonce[12] | ct+tag``.

**Threads.**  python-pkcs11 initialises the module with ``C_Initialize(NULL)``, which tells it
that the application never calls it from two threads at once (SoftHSM2 then runs without
locks).  So every call into a module goes through one process-wide lock per module path,
shared by all backends of the process; HSM calls are short and the plugin makes few of them.

**Lost sessions.**  One session per backend.  When a call fails because
the session, the login, an object handle or the device went away, the backend re-opens the
session (logging in again), looks the key up again and retries the call once; if that fails
too the error is BackendUnavailable.  PKCS#11 calls are local and not cancellable, so
deadlines are not enforced inside a call.
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Callable, Mapping
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
    InvalidCiphertext,
    KeyDisabled,
    KeyNotFound,
)

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


def version_of(key_id: bytes) -> str:
    return key_id.hex() if key_id else "00"


def _order(version: str) -> int:
    return int(version, 16)


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
    lines = path.read_text().splitlines()
    pin = lines[0].strip() if lines else ""
    if not pin:
        raise BackendConfigError(f"pkcs11: PIN file {path} is empty")
    return pin



class Pkcs11Backend(KeyBackend):
    name: ClassVar[str] = "pkcs11"
    OPTIONS: ClassVar[frozenset[str]] = frozenset({"module", "token_label", "key_label",
                                                   "pin_file"})

    def __init__(self, module: str, token_label: str, key_label: str, pin: str) -> None:
        self.module = module
        self.token_label = token_label
        self.key_label = key_label
        self._pin = pin
        self._lock = module_lock(module)
        self._session: Any = None
        self._keys: dict[str, Any] = {}  # version -> key object of the open session
        self._current: str | None = None
        self.reopens = 0  # sessions re-opened after a loss (tests, metrics)
        try:
            with self._lock:
                self._lib = pkcs11.lib(module)
        except Exception as exc:  # OSError-like failures of dlopen come as PKCS11Error
            raise BackendConfigError(f"pkcs11: cannot load module {module}: {exc}") from None
        try:
            with self._lock:
                self._open()
        except BackendUnavailable as exc:
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
        try:
            self._session = token.open(rw=True, user_pin=self._pin)
        except p11e.UserAlreadyLoggedIn:
            # another session of this process is logged in: sessions share the login state
            self._session = token.open(rw=True)
        except p11e.PinIncorrect:
            raise BackendUnavailable("pkcs11: the PIN was refused") from None
        except p11e.PKCS11Error as exc:
            raise BackendUnavailable(
                f"pkcs11: cannot open a session ({type(exc).__name__})"
            ) from None

    def _with_session(self, fn: Callable[[], T]) -> T:
        with self._lock:
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

    def _scan(self) -> dict[str, Any]:
        """Every usable version of the root key: version -> key object."""
        found: dict[str, Any] = {}
        for obj in self._session.get_objects(
            {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: self.key_label}
        ):
            try:
                if obj.key_type != KeyType.AES or obj[Attribute.VALUE_LEN] != 32:
                    continue
                version = version_of(bytes(obj[Attribute.ID] or b""))
            except _SESSION_ERRORS:
                raise
            except p11e.PKCS11Error:
                continue  # an object another session is still creating: next scan
            found[version] = obj
        self._keys = found
        self._current = max(found, key=_order) if found else None
        return found

    def _key(self, version: str) -> Any:
        key = self._keys.get(version)
        if key is None:
            self._scan()
            key = self._keys.get(version)
        if key is None:
            raise KeyNotFound(f"HSM key {self.key_label!r} version {version} does not exist")
        return key

    # --- KeyBackend ----------------------------------------------------------------------

    def current_key(self, *, deadline: float | None = None) -> RootKeyVersion:
        def op() -> RootKeyVersion:
            self._scan()
            if self._current is None:
                raise KeyNotFound(
                    f"no AES-256 key labelled {self.key_label!r} on token {self.token_label!r}"
                )
            return RootKeyVersion(self.key_label, self._current)

        return self._with_session(op)

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

        return self._with_session(op)

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

        return self._with_session(op)

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
            self._session.generate_key(
                KeyType.AES, 256, id=new_id, label=self.key_label, store=True,
                template={
                    Attribute.TOKEN: True, Attribute.PRIVATE: True, Attribute.SENSITIVE: True,
                    Attribute.EXTRACTABLE: False, Attribute.ENCRYPT: True,
                    Attribute.DECRYPT: True, Attribute.MODIFIABLE: True,
                },
            )
            self._scan()
            return RootKeyVersion(self.key_label, version_of(new_id))

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
