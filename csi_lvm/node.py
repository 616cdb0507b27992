"""The csi.v1.Node service: put LVs where kubelet asks for them, grow them, report on them.

    node = NodeService(config, lvm, locks=in_flight, on_lvm_change=capacity.invalidate)
    node.register(grpc_server)

No staging (no STAGE_UNSTAGE_VOLUME): a local LV needs no attach step and no global mount, so
NodePublishVolume mounts the LV (or binds its device node) directly at the target path.
A second target of the same volume on this node (SINGLE_NODE_MULTI_WRITER) is a bind mount of
the first one, so one filesystem is mounted once however many pods use it.

Every RPC checks its arguments first (INVALID_ARGUMENT) and only then looks anything up.
Calls that change a volume (publish, unpublish, expand) hold the volume's in-flight key: a
second concurrent call for the same volume gets ABORTED (the CO retries). Only LVs carrying the
driver's ownership tag are ever found (csi_lvm.volume.resolve_volume), so nothing else is
activated, mounted or extended.

Spec choices (CSI v1.12), each deliberate:
- NodeUnpublishVolume of an unknown volume or an absent target succeeds: the work it must
  undo is done. The spec's error table still lists NOT_FOUND, but its own idempotency rule,
  csi-test (kubernetes-csi/csi-test#258 removed that check) and kubelet (which retries a
  NOT_FOUND forever, kubernetes/kubernetes#90752) all want OK; see spec issue #433.
- Multi-node access modes are INVALID_ARGUMENT: this driver never supports them, for any
  volume, so the request itself is wrong (nothing to wait for, as FAILED_PRECONDITION implies).
- A second target for a volume whose access mode is not SINGLE_NODE_MULTI_WRITER is
  FAILED_PRECONDITION (the spec's table for plugins with SINGLE_NODE_MULTI_WRITER).
- NodeGetVolumeStats: NOT_FOUND when volume_path does not exist or holds another device; a
  missing or inactive LV, or a publish directory with nothing mounted, is reported as an
  abnormal VolumeCondition (with usage when the path still answers).
- NodeExpandVolume: NOT_FOUND for an unknown volume or a volume_path where the volume is not
  published; OUT_OF_RANGE only when the rounded size exceeds limit_bytes (the request itself);
  RESOURCE_EXHAUSTED when the VG (or, for a thin volume, its pool's accounted room) cannot
  hold it, now or ever.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Protocol

import grpc

from csi_lvm import filesystem
from csi_lvm.blockdev import BlockDeviceError, DeviceBusy, wait_for_device
from csi_lvm.capabilities import DEFAULT_FS_TYPE, capability_error, is_block, mode_name
from csi_lvm.capacity import PoolThresholds, thin_refusal
from csi_lvm.config import CsiConfig
from csi_lvm.controller import lv_condition
from csi_lvm.cryptsetup import mapper_path
from csi_lvm.encryption import VolumeEncryption, is_encrypted, mapper_name
from csi_lvm.finish import Finisher
from csi_lvm.finish import finish as finish_volume
from csi_lvm.locks import InFlight, thin_pool_key
from csi_lvm.mounter import (
    InvalidMountOption,
    MountEntry,
    Mounter,
    MountError,
    canonical_path,
    check_mount_options,
    flags_satisfied,
)
from csi_lvm.stats import block_device_read_only, block_device_size, filesystem_usage
from csi_lvm.volume import (
    TAG_UNFINISHED,
    InvalidId,
    LvRef,
    VolumeContext,
    parse_id,
    resolve_volume,
    split_mount_options,
)
from csi_lvm.volume_keys import KeyBackends
from edge_common.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    OutOfRange,
    ResourceExhausted,
    ServiceError,
    Unavailable,
    Unimplemented,
)
from edge_common.log import log_context
from edge_common.lvm import LogicalVolume, Lvm, LvmError, LvmStillRunning, LvmTimeout
from edge_proto.csi.v1 import csi_pb2, csi_pb2_grpc

log = logging.getLogger(__name__)

Mode = csi_pb2.VolumeCapability.AccessMode
RPC = csi_pb2.NodeServiceCapability.RPC
Usage = csi_pb2.VolumeUsage

NODE_CAPABILITIES = (RPC.EXPAND_VOLUME, RPC.GET_VOLUME_STATS, RPC.VOLUME_CONDITION,
                     RPC.SINGLE_NODE_MULTI_WRITER)
#: Filesystems a publish mounts when it finds them on a device (never anything more exotic:
#: a volume's content is its user's, and a crafted image must not reach other kernel code).
MOUNTABLE_FS_TYPES = frozenset({"ext4", "ext3", "ext2", "xfs", "btrfs"})
MAX_PATH_BYTES = 4096
DEVICE_WAIT_SECONDS = 10.0


# ---------------------------------------------------------------------------- volumes


@dataclass(frozen=True)
class NodeVolume:
    """What the node service needs to know about one volume."""

    volume_id: str
    device_path: str
    size: int
    active: bool
    context: Mapping[str, str] = field(default_factory=dict)
    problem: str | None = None  # LVM reports it unhealthy (for VolumeCondition)
    stripes: int = 1  # an LV grows by whole extents on every stripe
    thin: bool = False  # a thin LV grows without taking VG space
    unfinished: bool = False  # never made safe yet: the first publish finishes it
    pool: str = ""  # the thin pool of a thin LV
    uuid: str = ""  # the LV UUID (a queued tag removal is found by it: csi_lvm/finish.py)


class VolumeBackend(Protocol):
    """Where volumes come from: LVM (LvmVolumes) in the driver."""

    def lookup(self, volume_id: str) -> NodeVolume | None:
        """The volume, or None when it does not exist (or is not this driver's)."""

    def activate(self, volume: NodeVolume) -> NodeVolume:
        """Make the device node exist; returns the volume as it is now."""

    def extend(self, volume: NodeVolume, required_bytes: int, limit_bytes: int) -> NodeVolume:
        """Grow to at least required_bytes (no-op when already there); returns it as it is now.
        Raises OutOfRange / ResourceExhausted (ServiceError) when it cannot."""

    def finish(self, volume: NodeVolume) -> NodeVolume:
        """Make an active, unfinished volume safe and mark it finished (csi_lvm/finish.py)."""


def lv_problem(lv: LogicalVolume, pool: LogicalVolume | None = None,
               thresholds: PoolThresholds | None = None) -> str | None:
    """A health problem LVM reports for the LV or its thin pool (the controller's wording)."""
    abnormal, message = lv_condition(lv, pool, thresholds)
    return message if abnormal else None


class LvmVolumes:
    """Volumes are the driver's LVs: found by id and ownership tag, activated, extended."""

    def __init__(self, lvm: Lvm, driver_name: str,
                 on_change: Callable[[], None] | None = None, *,
                 thresholds: PoolThresholds | None = None, default_ratio: float = 1.0,
                 locks: InFlight | None = None, finisher: Finisher | None = None) -> None:
        self.lvm = lvm
        self.driver_name = driver_name
        self.finisher = finisher  # the controller's, in one process (mode all)
        self.on_change = on_change
        self.thresholds = thresholds or PoolThresholds()
        self.default_ratio = default_ratio
        self.locks = locks or InFlight()

    def _logical_volume(self, volume_id: str) -> tuple[LogicalVolume, dict[str, str]] | None:
        try:
            resolved = resolve_volume(self.lvm, self.driver_name, volume_id)
        except InvalidId:
            return None
        if resolved is None:
            return None
        lv = resolved.lv
        if not isinstance(lv, LogicalVolume):  # pragma: no cover - resolve_volume's contract
            raise Internal(f"unexpected LV record for {volume_id}")
        return lv, resolved.context

    def lookup(self, volume_id: str) -> NodeVolume | None:
        found = self._logical_volume(volume_id)
        if found is None:
            return None
        lv, context = found
        ref = parse_id(volume_id)
        unfinished = TAG_UNFINISHED in lv.tags
        # A thin volume is as healthy as its pool: read the pool too (one more lvm call,
        # thin volumes only), so a pool past its threshold is never reported healthy.
        pool = self.lvm.get_lv(ref.vg, lv.pool_lv) if lv.is_thin and lv.pool_lv else None
        return NodeVolume(volume_id, ref.device_path, lv.size, lv.is_active, context,
                          lv_problem(lv, pool, self.thresholds), max(1, lv.stripes),
                          lv.is_thin, unfinished, lv.pool_lv or "", lv.uuid)

    def finish(self, volume: NodeVolume) -> NodeVolume:
        ref = parse_id(volume.volume_id)
        # Wiped by CreateVolume with its tag removal queued: drop the tag now, no second
        # wipe. Otherwise (no queue entry: another process life, or grown since) wipe again.
        if self.finisher is None or not self.finisher.settle(ref, volume.uuid, volume.size):
            finish_volume(self.lvm, ref, volume.size, thin=volume.thin)
        if self.on_change is not None:
            self.on_change()
        return replace(volume, unfinished=False)

    def activate(self, volume: NodeVolume) -> NodeVolume:
        ref = parse_id(volume.volume_id)
        # Thin snapshots (and volumes restored from them) carry LVM's skip-activation flag.
        self.lvm.activate(ref.vg, ref.lv, ignore_skip=True)
        now = self.lookup(volume.volume_id)
        if now is None:
            raise NotFound(f"volume {volume.volume_id} disappeared while being activated")
        return now

    def extend(self, volume: NodeVolume, required_bytes: int, limit_bytes: int) -> NodeVolume:
        """Two lvm calls (a report of the VG, lvextend): under emulation or on a busy node
        each one counts. A thin volume grows only within its pool's room (pool size x
        overprovision ratio - virtual sizes handed out), checked under the pool's mutex."""
        if not required_bytes or volume.size >= required_bytes:
            return volume  # idempotent: already big enough (or no size asked for)
        ref = parse_id(volume.volume_id)
        with contextlib.ExitStack() as stack:
            if volume.thin and volume.pool:
                stack.enter_context(self.locks.serial(thin_pool_key(ref.vg, volume.pool)))
            report = self.lvm.report([ref.vg])
            vg = report.vg(ref.vg)
            if vg is None:
                raise NotFound(f"volume group {ref.vg} of volume {volume.volume_id} not found")
            unit = (vg.extent_size or 1) * max(1, volume.stripes)
            size = -(-required_bytes // unit) * unit
            if limit_bytes and size > limit_bytes:
                raise OutOfRange(
                    f"{required_bytes} bytes rounded up to the allocation unit ({unit} bytes) "
                    f"is {size} bytes, above limit_bytes {limit_bytes}")
            if volume.thin and volume.pool:
                refusal = thin_refusal(report, ref.vg, volume.pool, size, ref.lv,
                                       self.default_ratio, self.thresholds)
                if refusal is not None:
                    raise ResourceExhausted(f"growing {volume.volume_id} to {size} bytes: "
                                            f"{refusal}")
            elif not volume.thin and size - volume.size > vg.size:
                raise ResourceExhausted(f"volume group {ref.vg} ({vg.size} bytes) can never "
                                        f"hold {size} bytes for {volume.volume_id}")
            return self._lvextend(ref, volume, vg.free, size)

    def _lvextend(self, ref: LvRef, volume: NodeVolume, vg_free: int, size: int) -> NodeVolume:
        try:
            self.lvm.lvextend(ref.vg, ref.lv, size)
        except LvmError as exc:
            if exc.is_no_space():
                raise ResourceExhausted(
                    f"volume group {ref.vg} has {vg_free} bytes free; growing "
                    f"{volume.volume_id} to {size} bytes needs {size - volume.size}") from None
            if not isinstance(exc, LvmTimeout) and not volume.thin:
                # LVM refuses to grow an active thick origin of copy-on-write snapshots.
                lv = self.lvm.get_lv(ref.vg, ref.lv)
                if lv is not None and lv.attr.origin:
                    raise FailedPrecondition(
                        f"volume {volume.volume_id} has copy-on-write snapshots and LVM "
                        f"refuses to grow it while they exist ({exc.message}); delete its "
                        "snapshots, then retry the expansion") from None
            raise
        finally:
            if self.on_change is not None:
                self.on_change()
        return replace(volume, size=size)


# ---------------------------------------------------------------------------- helpers


def _lock_key(volume_id: str) -> str:
    """The in-flight key of a volume, shared with the controller (DeleteVolume, expand, ...)."""
    return f"lv:{volume_id}"


def _require(value: str, name: str) -> str:
    if not value:
        raise InvalidArgument(f"{name} is required")
    return value


def _check_path(value: str, name: str) -> str:
    _require(value, name)
    if "\x00" in value or len(value.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
        raise InvalidArgument(f"{name} is not a usable path")
    if not os.path.isabs(value):
        raise InvalidArgument(f"{name} must be an absolute path: {value!r}")
    return canonical_path(value)


def _existing_path(value: str) -> tuple[str, os.stat_result]:
    """An absolute path that exists (NOT_FOUND otherwise, relative paths included)."""
    if "\x00" in value or not os.path.isabs(value):
        raise NotFound(f"path {value!r} does not exist (not an absolute path)")
    path = canonical_path(value)
    try:
        return path, os.stat(path)
    except FileNotFoundError:
        raise NotFound(f"path {value} does not exist") from None
    except OSError as exc:
        raise Internal(f"cannot stat {value}: {exc.strerror}") from None


def _check_capability(cap: csi_pb2.VolumeCapability) -> None:
    problem = capability_error(cap)
    if problem is not None:
        raise InvalidArgument(problem)
    if cap.WhichOneof("access_type") == "mount" and cap.mount.volume_mount_group:
        raise InvalidArgument("volume_mount_group is not supported (no VOLUME_MOUNT_GROUP "
                              "capability): use the pod's fsGroup")


def _check_range(required: int, limit: int) -> None:
    if required < 0 or limit < 0:
        raise InvalidArgument("capacity_range: required_bytes and limit_bytes must not be negative")
    if required and limit and limit < required:
        raise InvalidArgument(
            f"capacity_range: limit_bytes {limit} is below required_bytes {required}")


def _lvm_error(exc: LvmError) -> ServiceError:
    if isinstance(exc, LvmStillRunning):
        return Aborted(f"LVM is still working on it in the background: {exc}; retry")
    if isinstance(exc, LvmTimeout):
        return Unavailable(f"LVM did not answer in time: {exc}")
    return Internal(f"LVM failed: {exc}")


def _rdev(path: str) -> int | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_rdev if stat.S_ISBLK(st.st_mode) else None


def _holds_device(entry: MountEntry, device: str) -> bool:
    """Is this mount the filesystem of device (by device number, or source for btrfs)?"""
    rdev = _rdev(device)
    if rdev is not None and entry.devno == rdev:
        return True
    return entry.source.startswith("/") and os.path.realpath(entry.source) == \
        os.path.realpath(device)


@contextmanager
def _cleanup_on_error(path: str, created: bool) -> Iterator[None]:
    """Remove a target this call created when the call then fails."""
    try:
        yield
    except BaseException:
        if created:
            try:
                if os.path.isdir(path) and not os.path.islink(path):
                    os.rmdir(path)
                else:
                    os.unlink(path)
            except OSError:
                log.warning("could not remove the target after a failed publish",
                            extra={"target": path})
        raise


# ---------------------------------------------------------------------------- the service


class NodeService(csi_pb2_grpc.NodeServicer):
    """csi.v1.Node for LVM volumes on this node."""

    def __init__(
        self,
        config: CsiConfig,
        lvm: Lvm | None,
        *,
        locks: InFlight | None = None,
        volumes: VolumeBackend | None = None,
        mounter: Mounter | None = None,
        on_lvm_change: Callable[[], None] | None = None,
        encryption: VolumeEncryption | None = None,
        finisher: Finisher | None = None,
    ) -> None:
        if volumes is None:
            if lvm is None:
                raise ValueError("NodeService needs an Lvm or a volume backend")
            locks = locks or InFlight()
            volumes = LvmVolumes(
                lvm, config.driver_name, on_lvm_change, locks=locks, finisher=finisher,
                default_ratio=config.thin_overprovision_ratio,
                thresholds=PoolThresholds.of(config))
        self.config = config
        self.volumes = volumes
        self.locks = locks or InFlight()
        self.mounter = mounter or Mounter()
        self.encryption = encryption or VolumeEncryption(KeyBackends(None))

    def register(self, server: grpc.Server) -> None:
        csi_pb2_grpc.add_NodeServicer_to_server(self, server)

    # ------------------------------------------------------------------ lookups

    def _lookup(self, volume_id: str) -> NodeVolume | None:
        try:
            return self.volumes.lookup(volume_id)
        except LvmError as exc:
            raise _lvm_error(exc) from None

    def _volume(self, volume_id: str) -> NodeVolume:
        vol = self._lookup(volume_id)
        if vol is None:
            raise NotFound(f"volume {volume_id} does not exist")
        return vol

    def _active(self, vol: NodeVolume) -> NodeVolume:
        """The volume with its device node present (activating the LV when needed)."""
        if not vol.active:
            log.info("activating volume", extra={"device": vol.device_path})
            try:
                vol = self.volumes.activate(vol)
            except LvmError as exc:
                raise _lvm_error(exc) from None
        if _rdev(vol.device_path) is None:
            try:
                wait_for_device(vol.device_path, DEVICE_WAIT_SECONDS)
            except BlockDeviceError as exc:
                raise Internal(f"volume {vol.volume_id} is active but {exc}") from None
            if _rdev(vol.device_path) is None:
                raise Internal(f"{vol.device_path} is not a block device")
        return vol

    @staticmethod
    def _crypt_view(vol: NodeVolume) -> NodeVolume:
        """An encrypted volume as its users see it: the dm-crypt mapping, not the LV."""
        if not is_encrypted(vol.context):
            return vol
        return replace(vol, device_path=mapper_path(mapper_name(vol.volume_id)))

    def _in_use(self, device: str) -> bool:
        return bool(self.mounter.filesystem_mounts(device) or self.mounter.device_binds(device))

    def _finish(self, vol: NodeVolume) -> NodeVolume:
        """Its first use: wipe what an interrupted creation may have left, then mark it done."""
        log.info("first use of a new volume: finishing it", extra={"device": vol.device_path})
        try:
            return self.volumes.finish(vol)
        except LvmError as exc:
            raise _lvm_error(exc) from None
        except DeviceBusy as exc:
            raise FailedPrecondition(f"volume {vol.volume_id} was never finished and is in "
                                     f"use: {exc}") from None
        except BlockDeviceError as exc:
            raise Internal(f"finishing volume {vol.volume_id}: {exc}") from None

    # ------------------------------------------------------------------ publish

    def NodePublishVolume(
        self, request: csi_pb2.NodePublishVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodePublishVolumeResponse:
        volume_id = _require(request.volume_id, "volume_id")
        target = _check_path(request.target_path, "target_path")
        if not request.HasField("volume_capability"):
            raise InvalidArgument("volume_capability is required")
        cap = request.volume_capability
        _check_capability(cap)
        mode = cap.access_mode.mode
        read_only = request.readonly or mode == Mode.SINGLE_NODE_READER_ONLY
        options: list[str] = []
        if not is_block(cap):
            try:
                options = check_mount_options(cap.mount.mount_flags)
            except InvalidMountOption as exc:
                raise InvalidArgument(str(exc)) from None

        with log_context(volume_id=volume_id, target=target), self.locks.hold(_lock_key(volume_id)):
            vol = self._active(self._volume(volume_id))
            if vol.unfinished:
                vol = self._finish(vol)
            encrypted = is_encrypted(vol.context)
            if encrypted:
                vol = replace(vol, device_path=self.encryption.open(volume_id, vol.device_path))
            try:
                if is_block(cap):
                    self._publish_block(vol, target, mode, read_only)
                else:
                    self._publish_mount(vol, target, cap, mode, read_only, options)
            except BaseException:
                if encrypted:
                    self.encryption.close_if_unused(volume_id, self._in_use)
                raise
        return csi_pb2.NodePublishVolumeResponse()

    def _one_target_only(self, mode: int, target: str, others: list[MountEntry]) -> None:
        others = [m for m in others if m.mount_point != target]
        if others and mode != Mode.SINGLE_NODE_MULTI_WRITER:
            where = ", ".join(sorted({m.mount_point for m in others}))
            raise FailedPrecondition(
                f"the volume is already published on this node at {where}; access mode "
                f"{mode_name(mode)} allows one target (SINGLE_NODE_MULTI_WRITER allows several)")

    def _publish_block(self, vol: NodeVolume, target: str, mode: int, read_only: bool) -> None:
        device = vol.device_path
        existing = self.mounter.find(target)
        if existing is not None:
            if _rdev(target) == _rdev(device):
                if existing.read_only == read_only:
                    log.info("block volume already published", extra={"read_only": read_only})
                    return
                raise AlreadyExists(
                    f"volume {vol.volume_id} is already published at {target} with "
                    f"readonly={existing.read_only}")
            raise AlreadyExists(f"{target} is already a mount point of something else "
                                "(another volume, or this volume as a filesystem)")
        self._one_target_only(mode, target, self.mounter.device_binds(device))
        if read_only is False and self._device_read_only(device):
            raise FailedPrecondition(f"volume {vol.volume_id} is read-only")
        created = self._make_target_file(target)
        with _cleanup_on_error(target, created):
            try:
                self.mounter.bind(device, target, read_only=read_only)
            except MountError as exc:
                raise Internal(str(exc)) from None
        log.info("published block volume", extra={"device": device, "read_only": read_only})

    @staticmethod
    def _device_read_only(device: str) -> bool:
        try:
            return block_device_read_only(device)
        except OSError:
            return False

    @staticmethod
    def _make_target_file(target: str) -> bool:
        """An empty file to bind the device node onto; True when this call created it."""
        try:
            st = os.lstat(target)
        except FileNotFoundError:
            st = None
        if st is not None:
            if stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode):
                return False
            if stat.S_ISDIR(st.st_mode):
                try:
                    os.rmdir(target)  # an empty directory made by someone for us
                except OSError:
                    raise FailedPrecondition(
                        f"{target} is a non-empty directory; a block volume needs a file"
                    ) from None
            else:
                raise FailedPrecondition(f"{target} exists and is not a regular file")
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
        except FileNotFoundError:
            raise FailedPrecondition(f"the parent directory of {target} does not exist") from None
        os.close(fd)
        return True

    def _publish_mount(self, vol: NodeVolume, target: str, cap: csi_pb2.VolumeCapability,
                       mode: int, read_only: bool, flags: list[str]) -> None:
        device = vol.device_path
        try:
            options = check_mount_options(
                [*flags, *split_mount_options(vol.context.get(VolumeContext.MOUNT_OPTIONS, ""))])
        except InvalidMountOption as exc:
            raise InvalidArgument(f"mountOptions of the StorageClass: {exc}") from None
        asked_fs = cap.mount.fs_type

        existing = self.mounter.find(target)
        if existing is not None:
            if existing.root == "/" and _holds_device(existing, device):
                if existing.read_only != read_only:
                    raise AlreadyExists(
                        f"volume {vol.volume_id} is already published at {target} with "
                        f"readonly={existing.read_only}")
                if asked_fs and existing.fs_type != asked_fs:
                    raise AlreadyExists(f"volume {vol.volume_id} is already published at "
                                        f"{target} as {existing.fs_type}, not {asked_fs}")
                if not flags_satisfied(existing, options):
                    raise AlreadyExists(f"volume {vol.volume_id} is already published at "
                                        f"{target} with other mount flags")
                log.info("volume already published", extra={"read_only": read_only})
                return
            raise AlreadyExists(f"{target} is already a mount point of something else")

        others = [m for m in self.mounter.filesystem_mounts(device) if m.mount_point != target]
        self._one_target_only(mode, target, others)
        created = self._make_target_dir(target)
        with _cleanup_on_error(target, created):
            if others:
                self._bind_existing(vol, others, target, asked_fs, read_only, options)
            else:
                self._format_and_mount(vol, target, asked_fs, read_only, options)

    @staticmethod
    def _make_target_dir(target: str) -> bool:
        try:
            st = os.stat(target)
        except FileNotFoundError:
            try:
                os.makedirs(target, mode=0o750)
            except OSError as exc:
                raise FailedPrecondition(f"cannot create {target}: {exc.strerror}") from None
            return True
        if not stat.S_ISDIR(st.st_mode):
            raise FailedPrecondition(f"{target} exists and is not a directory")
        return False

    def _bind_existing(self, vol: NodeVolume, others: list[MountEntry], target: str,
                       asked_fs: str, read_only: bool, options: list[str]) -> None:
        """A further target of a volume already mounted on this node: bind the first mount."""
        source = next((m for m in others if m.root == "/"), None)
        if source is None:
            raise FailedPrecondition(f"volume {vol.volume_id} is mounted on this node only "
                                     "partially (a sub-directory bind); unpublish it first")
        if asked_fs and source.fs_type != asked_fs:
            raise FailedPrecondition(f"volume {vol.volume_id} is mounted as {source.fs_type} "
                                     f"on this node, not {asked_fs}")
        if not read_only and source.super_read_only:
            raise FailedPrecondition(
                f"volume {vol.volume_id} is mounted read-only on this node at "
                f"{source.mount_point}; a read-write publish needs it unpublished first")
        try:
            self.mounter.bind(source.mount_point, target, read_only=read_only, flags=options)
        except MountError as exc:
            raise Internal(str(exc)) from None
        log.info("published volume as a bind of its existing mount",
                 extra={"source": source.mount_point, "read_only": read_only})

    def _format_and_mount(self, vol: NodeVolume, target: str, asked_fs: str, read_only: bool,
                          options: list[str]) -> None:
        device = vol.device_path
        context_fs = vol.context.get(VolumeContext.FS_TYPE, "")
        wanted = asked_fs or context_fs or DEFAULT_FS_TYPE
        try:
            found = filesystem.probe(device)
            fs_type = found.fs_type
            existing = fs_type is not None
            if fs_type is None:
                problem = filesystem.blank_problem(device)
                if problem is not None:
                    raise FailedPrecondition(f"refusing to format volume {vol.volume_id}: "
                                             f"{problem}")
                mkfs_options = vol.context.get(VolumeContext.MKFS_OPTIONS, "") \
                    if wanted == context_fs or not context_fs else ""
                try:
                    filesystem.parse_mkfs_options(wanted, mkfs_options)
                except filesystem.UnsafeMkfsOptions as exc:
                    raise InvalidArgument(str(exc)) from None
                log.info("formatting blank volume", extra={"fs_type": wanted,
                                                           "mkfs_options": mkfs_options})
                filesystem.make_filesystem(wanted, device, mkfs_options)
                fs_type = wanted
            elif asked_fs and fs_type != asked_fs:
                raise FailedPrecondition(f"volume {vol.volume_id} holds a {fs_type} filesystem, "
                                         f"not the requested {asked_fs}")
            elif fs_type not in MOUNTABLE_FS_TYPES:
                raise FailedPrecondition(f"volume {vol.volume_id} holds a {fs_type} filesystem, "
                                         "which this driver does not mount")
        except filesystem.FilesystemError as exc:
            raise Internal(str(exc)) from None

        mount_options = [o for o in options if o not in ("ro", "rw")]
        if fs_type == "xfs" and "nouuid" not in mount_options:
            # Restored and cloned volumes share their source's XFS UUID; both may be mounted here.
            mount_options.append("nouuid")
        if read_only:
            if self._device_read_only(device):
                mount_options.append("noload" if fs_type.startswith("ext") else
                                     "norecovery" if fs_type == "xfs" else "")
            mount_options.append("ro")  # last, so that nothing before it can turn it off
        elif self._device_read_only(device):
            raise FailedPrecondition(f"volume {vol.volume_id} is read-only")
        mount_options = [o for o in mount_options if o]
        try:
            self.mounter.mount(device, target, fs_type, mount_options)
        except MountError as exc:
            raise Internal(str(exc)) from None
        if existing and not read_only:
            self._fill_device(vol, target, fs_type)
        log.info("published volume", extra={"fs_type": fs_type, "options": mount_options})

    def _fill_device(self, vol: NodeVolume, target: str, fs_type: str) -> None:
        """A filesystem found on the device (a restore or clone into a larger claim, or an LV
        grown while unpublished) is grown to the device at its first mount, as mount-utils
        does: the pod sees the capacity its claim says. A no-op when it already fills it."""
        try:
            filesystem.grow(fs_type, vol.device_path, target)
        except filesystem.FilesystemError as exc:
            with contextlib.suppress(MountError):
                self.mounter.unmount_all(target)
            raise Internal(f"volume {vol.volume_id}: its filesystem could not be grown to its "
                           f"device: {exc}") from None

    # ------------------------------------------------------------------ unpublish

    def NodeUnpublishVolume(
        self, request: csi_pb2.NodeUnpublishVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeUnpublishVolumeResponse:
        volume_id = _require(request.volume_id, "volume_id")
        target = _check_path(request.target_path, "target_path")
        with log_context(volume_id=volume_id, target=target), self.locks.hold(_lock_key(volume_id)):
            try:
                removed = self.mounter.unmount_all(target)
            except MountError as exc:
                raise Internal(str(exc)) from None
            self._remove_target(target)
            self.encryption.close_if_unused(volume_id, self._in_use)
            log.info("unpublished volume", extra={"unmounted": removed})
        return csi_pb2.NodeUnpublishVolumeResponse()

    @staticmethod
    def _remove_target(target: str) -> None:
        """Delete the file or directory publish created (never anything recursive)."""
        try:
            st = os.lstat(target)
        except FileNotFoundError:
            return
        try:
            if stat.S_ISDIR(st.st_mode):
                os.rmdir(target)
            else:
                os.unlink(target)
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno == errno.ENOTEMPTY:
                raise FailedPrecondition(
                    f"{target} is not a mount point but holds files; left in place") from None
            raise Internal(f"cannot remove {target}: {exc.strerror}") from None

    # ------------------------------------------------------------------ stats

    def NodeGetVolumeStats(
        self, request: csi_pb2.NodeGetVolumeStatsRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeGetVolumeStatsResponse:
        volume_id = _require(request.volume_id, "volume_id")
        _require(request.volume_path, "volume_path")
        with log_context(volume_id=volume_id):
            path, st = _existing_path(request.volume_path)
            vol = self._lookup(volume_id)
            vol = self._crypt_view(vol) if vol is not None else None
            entry = self.mounter.find(path)
            block = stat.S_ISBLK(st.st_mode)
            if vol is None:
                if entry is None:
                    raise NotFound(f"volume {volume_id} does not exist")
                return self._stats_response(path, block, entry is not None,
                                            f"the LV of volume {volume_id} no longer exists")
            problem: str | None = None
            if not vol.active:
                problem = f"the LV of volume {volume_id} is not active"
            elif vol.problem:
                problem = vol.problem
            key_problem = self.encryption.problem(volume_id)
            if key_problem:
                problem = f"{problem}; {key_problem}" if problem else key_problem
            rdev = _rdev(vol.device_path)
            if block:
                # The device node itself is the proof (the path may be a symlink to the bind).
                if rdev is not None and st.st_rdev != rdev:
                    raise NotFound(f"{path} holds another device, not volume {volume_id}")
                if rdev is None and entry is None:
                    raise NotFound(f"volume {volume_id} is not published at {path}")
            elif entry is None:
                if not stat.S_ISDIR(st.st_mode):
                    raise NotFound(f"volume {volume_id} is not published at {path}")
                return self._stats_response(path, False, False, problem or
                                            f"volume {volume_id} is not mounted at {path}")
            elif vol.active and not _holds_device(entry, vol.device_path):
                raise NotFound(f"{path} holds another filesystem, not volume {volume_id}")
            elif problem is None and not entry.read_only and (
                    entry.super_read_only or "emergency_ro" in entry.super_options):
                # Published read-write, yet the kernel made the filesystem read-only: it met a
                # write error (e.g. its thin pool ran out of space). Kernels since 6.12 say
                # "emergency_ro" instead of turning the superblock "ro".
                problem = (f"the filesystem of volume {volume_id} turned read-only after a "
                           "write error")
            return self._stats_response(path, block, True, problem)

    @staticmethod
    def _stats_response(path: str, block: bool, mounted: bool,
                        problem: str | None) -> csi_pb2.NodeGetVolumeStatsResponse:
        usage: list[csi_pb2.VolumeUsage] = []
        try:
            if block:
                usage.append(Usage(total=block_device_size(path), unit=Usage.BYTES))
            elif mounted:
                fs = filesystem_usage(path)
                usage.append(Usage(total=fs.total_bytes, available=fs.available_bytes,
                                   used=fs.used_bytes, unit=Usage.BYTES))
                if fs.total_inodes:
                    usage.append(Usage(total=fs.total_inodes, available=fs.free_inodes,
                                       used=fs.used_inodes, unit=Usage.INODES))
        except OSError as exc:
            problem = problem or f"cannot read usage of {path}: {exc.strerror or exc}"
        condition = csi_pb2.VolumeCondition(abnormal=problem is not None,
                                            message=problem or "volume is healthy")
        return csi_pb2.NodeGetVolumeStatsResponse(usage=usage, volume_condition=condition)

    # ------------------------------------------------------------------ expand

    def NodeExpandVolume(
        self, request: csi_pb2.NodeExpandVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeExpandVolumeResponse:
        volume_id = _require(request.volume_id, "volume_id")
        _require(request.volume_path, "volume_path")
        required = request.capacity_range.required_bytes
        limit = request.capacity_range.limit_bytes
        _check_range(required, limit)
        cap = request.volume_capability if request.HasField("volume_capability") else None
        if cap is not None:
            _check_capability(cap)

        with log_context(volume_id=volume_id), self.locks.hold(_lock_key(volume_id)):
            vol = self._volume(volume_id)
            lv_device = vol.device_path
            vol = self._crypt_view(vol)
            path, st = _existing_path(request.volume_path)
            block = stat.S_ISBLK(st.st_mode)
            if cap is not None and is_block(cap) != block:
                raise InvalidArgument(
                    f"volume_capability says {'block' if is_block(cap) else 'mount'} but "
                    f"{path} is {'a block device' if block else 'not a block device'}")
            if not vol.active:
                raise FailedPrecondition(f"the LV of volume {volume_id} is not active")
            entry = self.mounter.find(path)
            rdev = _rdev(vol.device_path)
            if block:
                if st.st_rdev != rdev:
                    raise NotFound(f"volume {volume_id} is not published at {path}")
            elif entry is None or not _holds_device(entry, vol.device_path):
                raise NotFound(f"volume {volume_id} is not mounted at {path}")

            try:
                vol = self.volumes.extend(vol, required, limit)
            except LvmError as exc:
                raise _lvm_error(exc) from None
            if is_encrypted(vol.context):
                self.encryption.resize(volume_id, lv_device)
            if not block:
                assert entry is not None
                if entry.read_only or entry.super_read_only:
                    raise FailedPrecondition(
                        f"volume {volume_id} is mounted read-only at {path}: its filesystem "
                        "cannot grow")
                try:
                    filesystem.grow(entry.fs_type, vol.device_path, path)
                except filesystem.FilesystemError as exc:
                    raise Internal(str(exc)) from None
            try:
                # The LV's size, as the controller reports it (an encrypted volume's mapping
                # is its LUKS2 header smaller).
                capacity = block_device_size(lv_device)
            except OSError as exc:
                raise Internal(f"cannot read the size of {lv_device}: {exc}") from None
            log.info("expanded volume", extra={"capacity_bytes": capacity, "block": block})
        return csi_pb2.NodeExpandVolumeResponse(capacity_bytes=capacity)

    # ------------------------------------------------------------------ info

    def NodeGetCapabilities(
        self, request: csi_pb2.NodeGetCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeGetCapabilitiesResponse:
        return csi_pb2.NodeGetCapabilitiesResponse(capabilities=[
            csi_pb2.NodeServiceCapability(rpc=RPC(type=kind)) for kind in NODE_CAPABILITIES
        ])

    def NodeGetInfo(
        self, request: csi_pb2.NodeGetInfoRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeGetInfoResponse:
        topology = csi_pb2.Topology(segments={self.config.topology_key: self.config.node_id})
        return csi_pb2.NodeGetInfoResponse(
            node_id=self.config.node_id,
            max_volumes_per_node=self.config.max_volumes_per_node,
            accessible_topology=topology,
        )

    def NodeStageVolume(
        self, request: csi_pb2.NodeStageVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeStageVolumeResponse:
        raise Unimplemented("NodeStageVolume: this driver has no STAGE_UNSTAGE_VOLUME capability")

    def NodeUnstageVolume(
        self, request: csi_pb2.NodeUnstageVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeUnstageVolumeResponse:
        raise Unimplemented(
            "NodeUnstageVolume: this driver has no STAGE_UNSTAGE_VOLUME capability")


__all__ = ["LvmVolumes", "NODE_CAPABILITIES", "NodeService", "NodeVolume", "VolumeBackend",
           "lv_problem"]
