"""Encrypted volumes: LUKS2 on the LV, its key wrapped by a node key backend (volume_keys).

    enc = VolumeEncryption(KeyBackends(spec), Cryptsetup())
    key = enc.prepare(backend_name)          # CreateVolume, before lvcreate: wrap first
    enc.format(device, key)                  # after lvcreate: LUKS2 header + key token
    path = enc.open(volume_id, device)       # NodePublish: unwrap, cryptsetup open
    enc.close_if_unused(volume_id)           # NodeUnpublish
    enc.crypto_erase(volume_id, device)      # DeleteVolume: header gone, data is noise

The unwrapped secret only lives in this process's memory for the length of one cryptsetup
call (stdin); it is never logged, cached or written. The dm-crypt mapping of volume <vg>/<lv>
is /dev/mapper/csi-crypt-<vg>-<lv> (dashes doubled as LVM does, so it never collides with an
LV's own mapping); kubelet's targets bind or mount that device.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter

from csi_lvm import blockdev
from csi_lvm.cryptsetup import CryptError, Cryptsetup, mapper_path, mapping_backing_device
from csi_lvm.stats import block_device_size
from csi_lvm.volume_keys import (
    TOKEN_TYPE,
    InvalidToken,
    KeyBackends,
    WrappedKey,
    new_volume_secret,
    parse_token,
)
from edge_common.devmapper import has_device_mapper
from edge_common.errors import (
    Aborted,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    ServiceError,
    Unavailable,
)
from kms_plugin.backends.base import RootKeyVersion

log = logging.getLogger(__name__)

#: volume_context keys (also StorageClass parameter names; Ceph-CSI's spelling).
CTX_ENCRYPTED = "encrypted"
CTX_KEY_BACKEND = "encryptionKeyBackend"
MAPPER_PREFIX = "csi-crypt-"
MAX_DM_NAME = 127
#: Zeroed on delete when a header cannot be read: LUKS2's default header + key slot area.
DEFAULT_HEADER_BYTES = 16 << 20
_CHECK_FAILED = "the volume key cannot be checked"
Guard = Callable[[str], AbstractContextManager[object]]


def _no_guard(_volume_id: str) -> AbstractContextManager[object]:
    return contextlib.nullcontext()



def is_encrypted(context: Mapping[str, str]) -> bool:
    return context.get(CTX_ENCRYPTED) == "true"


def encryption_context(context: Mapping[str, str]) -> dict[str, str]:
    """Just the encryption keys of a volume context (what a snapshot carries on)."""
    return {k: context[k] for k in (CTX_ENCRYPTED, CTX_KEY_BACKEND) if k in context}


def mapper_name(volume_id: str) -> str:
    vg, _, lv = volume_id.partition("/")
    name = f"{MAPPER_PREFIX}{vg.replace('-', '--')}-{lv.replace('-', '--')}"
    if len(name) <= MAX_DM_NAME:
        return name
    return f"{MAPPER_PREFIX}{hashlib.sha256(volume_id.encode()).hexdigest()[:32]}"


def dm_crypt_problem(proc_misc: Path = Path("/proc/misc"),
                     sys_module: Path = Path("/sys/module"),
                     modules_root: Path = Path("/lib/modules")) -> str | None:
    """Why this kernel cannot run dm-crypt, or None when it can."""
    if not has_device_mapper(proc_misc):
        return "this node's kernel has no device-mapper (dm-crypt needs it)"
    if (sys_module / "dm_crypt").exists():
        return None
    release = modules_root / platform.release()
    if any(release.glob("kernel/drivers/md/dm-crypt.ko*")):
        return None  # loaded on first use
    try:
        if "dm-crypt" in (release / "modules.builtin").read_text():
            return None
    except OSError:
        pass
    return "this node's kernel has no dm-crypt module (load dm_crypt, or install it)"


@dataclass(frozen=True)
class NewKey:
    """A volume key made for CreateVolume: the secret (memory only) and its wrapped form."""

    secret: bytes
    luks_uuid: str
    wrapped: WrappedKey

    def __repr__(self) -> str:  # never print the secret
        return f"NewKey(luks_uuid={self.luks_uuid!r}, backend={self.wrapped.backend!r})"


OPERATIONS = ("wrap", "unwrap", "rewrap", "erase")


class KeyMetrics:
    """Counts of volume key operations (never keys): what an operator audits."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.operations = Counter(
            "csi_lvm_volume_key_operations", "Key operations on encrypted volumes: "
            "operation=wrap (CreateVolume), unwrap (open, resize, re-wrap), rewrap (a token "
            "moved to the current root key), erase (crypto-erase at DeleteVolume); "
            "result=ok|error", ["operation", "result"], registry=registry)
        for operation in OPERATIONS:
            for result in ("ok", "error"):
                self.operations.labels(operation=operation, result=result)


class VolumeEncryption:
    def __init__(self, backends: KeyBackends, crypt: Cryptsetup | None = None, *,
                 kernel_problem: Callable[[], str | None] = dm_crypt_problem,
                 metrics: KeyMetrics | None = None) -> None:
        self.backends = backends
        self.crypt = crypt or Cryptsetup()
        self.metrics = metrics
        self._kernel_problem = kernel_problem
        self._problems: dict[str, str] = {}  # volume_id -> why its key cannot be unwrapped
        # volume_id -> (backend, root key version) of its token as last seen: the periodic
        # re-wrap check compares against it and touches no device unless a rotation happened.
        self._wrapped_under: dict[str, tuple[str, RootKeyVersion]] = {}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def _counted(self, operation: str) -> Iterator[None]:
        try:
            yield
        except BaseException:
            if self.metrics is not None:
                self.metrics.operations.labels(operation=operation, result="error").inc()
            raise
        if self.metrics is not None:
            self.metrics.operations.labels(operation=operation, result="ok").inc()

    # ------------------------------------------------------------------ checks

    def node_problem(self) -> str | None:
        """Why this node cannot make or open encrypted volumes (None: it can)."""
        if not self.crypt.installed():
            return f"{self.crypt.binary} is not installed on this node (Debian: cryptsetup-bin)"
        return self._kernel_problem()

    def check_backend(self, asked: str) -> str:
        """The backend name a StorageClass means; INVALID_ARGUMENT when not configured."""
        return self.backends.resolve_name(asked)

    def require_node_support(self) -> None:
        problem = self.node_problem()
        if problem is not None:
            raise FailedPrecondition(f"encrypted volumes cannot be served here: {problem}")

    # ------------------------------------------------------------------ create

    def prepare(self, backend: str) -> NewKey:
        """A fresh secret wrapped by the backend: before lvcreate, so an unreachable backend
        costs no LV (UNAVAILABLE, nothing created)."""
        self.require_node_support()
        luks_uuid = str(uuid.uuid4())
        secret = new_volume_secret()
        with self._counted("wrap"):
            return NewKey(secret, luks_uuid, self.backends.wrap(backend, secret, luks_uuid))

    def format(self, volume_id: str, device: str, key: NewKey) -> None:
        """A new encrypted volume: its header, then its decrypted view made blank."""
        self.write_header(device, key)
        self.blank(volume_id, device, key)
        self._remember(volume_id, key.wrapped)

    def write_header(self, device: str, key: NewKey) -> None:
        """The LUKS2 header (key slot 0 under the secret) and the wrapped-key token."""
        try:
            self.crypt.format(device, key.secret, key.luks_uuid)
            self.crypt.import_token(device, key.wrapped.token_json())
        except CryptError as exc:
            raise crypt_failure(exc) from None
        log.info("LUKS2 header written", extra={"luks_uuid": key.luks_uuid,
                                                "key_backend": key.wrapped.backend})

    def blank(self, volume_id: str, device: str, key: NewKey) -> None:
        """Zero the first and last MiB of the *decrypted* view: a new volume must look blank
        to the publish that makes its filesystem. The rest stays noise under the new key (no
        previous tenant's data, and no full zeroing)."""
        name = mapper_name(volume_id)
        try:
            self.crypt.open(device, name, key.secret)
            try:
                path = mapper_path(name)
                blockdev.wait_for_device(path)
                blockdev.zero_head_and_tail(path, block_device_size(path))
            finally:
                self.crypt.close(name)
        except CryptError as exc:
            raise crypt_failure(exc) from None

    # ------------------------------------------------------------------ open / close

    def _read_key(self, volume_id: str, device: str) -> tuple[WrappedKey, str]:
        """The token and LUKS UUID of the volume's header; FAILED_PRECONDITION when bad."""
        try:
            header = self.crypt.header(device)
        except CryptError as exc:
            raise crypt_failure(exc) from None
        if header is None:
            raise FailedPrecondition(f"volume {volume_id} is marked encrypted but holds no "
                                     "LUKS2 header; refusing to use it")
        ours = [t for t in header.tokens.values()
                if isinstance(t, dict) and t.get("type") == TOKEN_TYPE]
        if len(ours) != 1:
            raise FailedPrecondition(f"volume {volume_id}: the LUKS2 header holds "
                                     f"{len(ours)} key tokens of this driver, not one")
        try:
            token = parse_token(json.dumps(ours[0]))
        except InvalidToken as exc:
            raise FailedPrecondition(f"volume {volume_id}: {exc}; refusing to open") from None
        self._remember(volume_id, token)
        return token, header.uuid

    def _remember(self, volume_id: str, token: WrappedKey) -> None:
        with self._lock:
            self._wrapped_under[volume_id] = (token.backend, token.key)

    def _unwrap(self, volume_id: str, device: str) -> bytes:
        token, luks_uuid = self._read_key(volume_id, device)
        try:
            with self._counted("unwrap"):
                secret = self.backends.unwrap(token, luks_uuid)
        except ServiceError as exc:
            self._note(volume_id, f"the volume key cannot be unwrapped: {exc.message}")
            raise
        self._note(volume_id, None)
        return secret

    def open(self, volume_id: str, device: str) -> str:
        """Open the volume's mapping (idempotent); returns /dev/mapper/<name>."""
        name = mapper_name(volume_id)
        path = mapper_path(name)
        backing = mapping_backing_device(name)
        if backing is not None:
            if backing != _rdev(device):
                raise Internal(f"{path} is open on another device than volume {volume_id}")
            return path
        self.require_node_support()
        secret = self._unwrap(volume_id, device)
        try:
            self.crypt.open(device, name, secret)
        except CryptError as exc:
            if not exc.busy or mapping_backing_device(name) != _rdev(device):
                raise crypt_failure(exc) from None
        finally:
            del secret
        blockdev.wait_for_device(path)
        log.info("encrypted volume opened", extra={"mapping": name})
        return path

    def is_open(self, volume_id: str) -> bool:
        return mapping_backing_device(mapper_name(volume_id)) is not None

    def close_if_unused(self, volume_id: str, in_use: Callable[[str], bool]) -> bool:
        """Close the mapping when nothing on this node uses it; True when it is closed."""
        name = mapper_name(volume_id)
        if mapping_backing_device(name) is None:
            return True
        if in_use(mapper_path(name)):
            return False
        try:
            self.crypt.close(name)
        except CryptError as exc:
            if exc.busy:
                return False
            raise crypt_failure(exc) from None
        log.info("encrypted volume closed", extra={"mapping": name})
        return True

    def close_idle(self, volume_id: str) -> None:
        """Close the mapping when nothing holds it open (cryptsetup refuses otherwise)."""
        if not self.is_open(volume_id):
            return
        try:
            self.crypt.close(mapper_name(volume_id))
        except CryptError as exc:
            if not exc.busy:
                raise crypt_failure(exc) from None

    def resize(self, volume_id: str, device: str) -> None:
        """Grow the open mapping to the LV's new size (LUKS2 segments are dynamic)."""
        if not self.is_open(volume_id):
            return
        secret = self._unwrap(volume_id, device)
        try:
            self.crypt.resize(mapper_name(volume_id), secret)
        except CryptError as exc:
            raise crypt_failure(exc) from None
        finally:
            del secret

    # ------------------------------------------------------------------ delete

    def crypto_erase(self, volume_id: str, device: str, size: int) -> None:
        """Destroy the key slots and the key token, then zero the whole header area: what
        is left on the extents cannot be decrypted by anyone, with any key."""
        with self._counted("erase"):
            self._crypto_erase(volume_id, device, size)

    def _crypto_erase(self, volume_id: str, device: str, size: int) -> None:
        if self.is_open(volume_id):
            try:
                self.crypt.close(mapper_name(volume_id))  # refused while anything uses it
            except CryptError as exc:
                if exc.busy:
                    raise FailedPrecondition(f"volume {volume_id} is in use on this node "
                                             "(published); unpublish it first") from None
                raise crypt_failure(exc) from None
        try:
            header = self.crypt.header(device)
            if header is not None:
                self.crypt.erase(device)
        except CryptError as exc:
            raise crypt_failure(exc) from None
        span = header.data_offset if header is not None else DEFAULT_HEADER_BYTES
        blockdev.zero_range(device, 0, min(span, size))
        self._note(volume_id, None)
        with self._lock:
            self._wrapped_under.pop(volume_id, None)
        log.info("encrypted volume crypto-erased", extra={"header_bytes": min(span, size)})

    # ------------------------------------------------------------------ rotation

    def rewrap(self, volume_id: str, device: str, guard: Guard = _no_guard,
               current_key: Callable[[str], RootKeyVersion] | None = None) -> bool:
        """Re-wrap the volume's key under its backend's current root key (the volume may be
        open and mounted: only the token in the header changes). True when it changed.

        The check compares with the token as last seen (at create, publish or the previous
        round) and touches no device; the header is read and rewritten only after a rotation
        (or once after a restart), holding ``guard(volume_id)`` (the volume's in-flight key).
        """
        current_of = current_key or self.backends.current_key
        with self._lock:
            known = self._wrapped_under.get(volume_id)
        if known is not None and current_of(known[0]) == known[1]:
            if (self.problem(volume_id) or "").startswith(_CHECK_FAILED):
                self._note(volume_id, None)  # the backend answers again
            return False
        with guard(volume_id):
            token, luks_uuid = self._read_key(volume_id, device)  # as it is now
            current = current_of(token.backend)
            if token.key == current:
                if (self.problem(volume_id) or "").startswith(_CHECK_FAILED):
                    self._note(volume_id, None)
                return False
            secret = self._unwrap(volume_id, device)
            try:
                with self._counted("rewrap"):
                    self.crypt.test_secret(device, secret)  # only a token that opens is stored
                    fresh = self.backends.wrap(token.backend, secret, luks_uuid)
                    self.crypt.import_token(device, fresh.token_json(), replace=True)
            except CryptError as exc:
                raise crypt_failure(exc) from None
            finally:
                del secret
            self._remember(volume_id, fresh)
        log.info("volume key re-wrapped", extra={"volume_id": volume_id,
                                                 "key_backend": token.backend,
                                                 "key_version": fresh.key.version})
        return True

    def rewrap_all(self, volumes: Iterable[tuple[str, str]], guard: Guard = _no_guard,
                   exists: Callable[[str], bool] = lambda _volume_id: True) -> dict[str, str]:
        """rewrap() every (volume_id, device); returns {volume_id: outcome}. A failure is
        noted for VolumeCondition when the volume still ``exists`` (it may have just been
        deleted under the check)."""
        outcome: dict[str, str] = {}
        currents: dict[str, RootKeyVersion] = {}

        def current_key(backend: str) -> RootKeyVersion:  # one backend call per round
            if backend not in currents:
                currents[backend] = self.backends.current_key(backend)
            return currents[backend]

        for volume_id, device in volumes:
            try:
                changed = self.rewrap(volume_id, device, guard, current_key)
                outcome[volume_id] = "rewrapped" if changed else "current"
            except Aborted:
                outcome[volume_id] = "busy"  # an RPC holds it: the next round
            except ServiceError as exc:
                outcome[volume_id] = f"failed: {exc.message}"
                if not exists(volume_id):
                    outcome[volume_id] = "gone"
                    continue
                log.warning("re-wrapping a volume key failed; retried next round",
                            extra={"volume_id": volume_id, "error": exc.message})
                # A disabled or deleted root key shows in VolumeCondition before any publish.
                if self.problem(volume_id) is None:
                    self._note(volume_id, f"{_CHECK_FAILED}: {exc.message}")
        return outcome

    # ------------------------------------------------------------------ condition

    def _note(self, volume_id: str, problem: str | None) -> None:
        with self._lock:
            if problem is None:
                self._problems.pop(volume_id, None)
            else:
                self._problems[volume_id] = problem

    def problem(self, volume_id: str) -> str | None:
        """The last key problem seen for this volume (for VolumeCondition), or None."""
        with self._lock:
            return self._problems.get(volume_id)


def crypt_failure(exc: CryptError) -> ServiceError:
    if exc.missing:
        return FailedPrecondition(exc.message)
    if exc.timeout:
        return Unavailable(f"{exc.message}; the outcome is unknown, retry")
    return Internal(exc.message)


def check_encryption_request(enc: VolumeEncryption, encrypted: bool, backend: str,
                             source_context: Mapping[str, str] | None) -> str:
    """CreateVolume's checks: the backend name (INVALID_ARGUMENT), the node's support
    (FAILED_PRECONDITION), and the content source's own encryption. Returns the backend."""
    if source_context is not None and is_encrypted(source_context):
        if backend and backend != source_context.get(CTX_KEY_BACKEND, backend):
            raise InvalidArgument(
                f"the content source is encrypted with key backend "
                f"{source_context.get(CTX_KEY_BACKEND)!r}; a copy opens with its source's key, "
                f"so encryptionKeyBackend {backend!r} cannot apply")
        return source_context.get(CTX_KEY_BACKEND, "")
    if not encrypted:
        return ""
    if source_context is not None:
        raise InvalidArgument("the content source is not encrypted: an encrypted volume "
                              "cannot be made from a plain one (copy the data in instead)")
    name = enc.check_backend(backend)
    enc.require_node_support()
    return name


def _rdev(path: str) -> int | None:
    with contextlib.suppress(OSError):
        return os.stat(path).st_rdev
    return None


__all__ = ["CTX_ENCRYPTED", "CTX_KEY_BACKEND", "NewKey", "VolumeEncryption",
           "check_encryption_request", "crypt_failure", "dm_crypt_problem", "encryption_context",
           "is_encrypted", "mapper_name"]
