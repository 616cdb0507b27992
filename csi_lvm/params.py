"""StorageClass / VolumeSnapshotClass parameters and capacity ranges: parsed and checked before
anything is looked up (every problem here is INVALID_ARGUMENT or OUT_OF_RANGE).

StorageClass parameters:
    vgName        volume group (default: the configured default VG)
    lvmType       linear (default) | striped | thin
    stripes       striped: number of stripes, >= 2 (default: the VG's PV count)
    stripeSize    striped: stripe size, a power of two >= 4Ki (e.g. 64Ki); default LVM's
    thinPool      thin: the thin pool LV in vgName (default: the configured default_thin_pool)
    fsType        ext4 | xfs | btrfs (csi.storage.k8s.io/fstype sets the capability instead)
    mkfsOptions   extra mkfs arguments, shell-quoted ("-E lazy_itable_init=0 -m 1")
    mountOptions  extra mount options, comma-separated ("noatime,discard")
    wipeOnDelete  none | discard | zero (default: the configured delete_wipe)
    encrypted     "true": a LUKS2 (dm-crypt) volume, its key wrapped by a node key backend;
                  "false" (default)
    encryptionKeyBackend  encrypted only: the name of a key backend configured on the node
                  (default: the node's default backend)
Keys under csi.storage.k8s.io/ (added by the sidecars) are accepted and ignored. Any other key
is refused, so a typo never silently falls back to a default.

VolumeSnapshotClass parameters:
    snapshotSize  thick volumes only: copy-on-write space, bytes ("2Gi") or percent of the
                  origin ("20%"); default: the configured thick_snapshot_percent
"""

from __future__ import annotations

import enum
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass

from csi_lvm.capabilities import DEFAULT_FS_TYPE, supported_fs_types
from csi_lvm.volume import VolumeContext as C
from csi_lvm.volume import is_lvm_name
from edge_common.errors import InvalidArgument, OutOfRange

K8S_PREFIX = "csi.storage.k8s.io/"
FSTYPE_KEY = "csi.storage.k8s.io/fstype"

P_VG = "vgName"
P_LVM_TYPE = "lvmType"
P_STRIPES = "stripes"
P_STRIPE_SIZE = "stripeSize"
P_THIN_POOL = "thinPool"
P_FS_TYPE = "fsType"
P_MKFS = "mkfsOptions"
P_MOUNT = "mountOptions"
P_WIPE = "wipeOnDelete"
P_SNAPSHOT_SIZE = "snapshotSize"
P_ENCRYPTED = "encrypted"
P_KEY_BACKEND = "encryptionKeyBackend"

VOLUME_KEYS = frozenset({P_VG, P_LVM_TYPE, P_STRIPES, P_STRIPE_SIZE, P_THIN_POOL, P_FS_TYPE,
                         P_MKFS, P_MOUNT, P_WIPE, P_ENCRYPTED, P_KEY_BACKEND})
SNAPSHOT_KEYS = frozenset({P_SNAPSHOT_SIZE})
MAX_OPTIONS_LEN = 512


class LvmType(enum.Enum):
    LINEAR = "linear"
    STRIPED = "striped"
    THIN = "thin"


WIPE_CHOICES = ("none", "discard", "zero")

_UNITS = {
    None: 1, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "Pi": 1 << 50,
    "Ei": 1 << 60, "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15,
    "E": 10**18,
}


def parse_quantity(text: str, what: str) -> int:
    """Bytes from "4096", "64Ki", "1Gi", "500M" (Kubernetes quantity suffixes)."""
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti|Pi|Ei|k|K|M|G|T|P|E)?", text.strip())
    if not m:
        raise InvalidArgument(f"{what}: {text!r} is not a size (e.g. 4096, 64Ki, 1Gi)")
    return int(m.group(1)) * _UNITS[m.group(2)]


@dataclass(frozen=True)
class VolumeParams:
    vg: str
    lvm_type: LvmType
    stripes: int | None
    stripe_size: int | None
    thin_pool: str | None
    fs_type: str  # for mount volumes ("" if every capability is block)
    mkfs_options: str
    mount_options: str
    wipe_on_delete: str
    encrypted: bool = False
    key_backend: str = ""  # as the StorageClass names it ("" = the node's default)

    def context(self, lv: str) -> dict[str, str]:
        """The volume_context handed to the node (only non-empty values)."""
        ctx = {C.VG: self.vg, C.LV: lv, C.LVM_TYPE: self.lvm_type.value}
        for key, value in ((C.FS_TYPE, self.fs_type), (C.MKFS_OPTIONS, self.mkfs_options),
                           (C.MOUNT_OPTIONS, self.mount_options)):
            if value:
                ctx[key] = value
        if self.wipe_on_delete != "none":
            ctx[P_WIPE] = self.wipe_on_delete
        return ctx


def parse_volume_params(
    parameters: Mapping[str, str],
    *,
    default_vg: str,
    default_thin_pool: str,
    default_wipe: str,
    capability_fs_types: list[str],
    has_mount: bool,
) -> VolumeParams:
    unknown = sorted(k for k in parameters if k not in VOLUME_KEYS and not k.startswith(K8S_PREFIX))
    if unknown:
        raise InvalidArgument(
            f"unknown StorageClass parameter(s) {', '.join(unknown)}; "
            f"known: {', '.join(sorted(VOLUME_KEYS))}")
    vg = parameters.get(P_VG, "") or default_vg
    if not is_lvm_name(vg):
        raise InvalidArgument(f"{P_VG}: {vg!r} is not a valid volume group name")
    type_text = parameters.get(P_LVM_TYPE, "") or LvmType.LINEAR.value
    try:
        lvm_type = LvmType(type_text)
    except ValueError:
        raise InvalidArgument(
            f"{P_LVM_TYPE}: {type_text!r} is not one of linear, striped, thin") from None

    stripes: int | None = None
    stripe_size: int | None = None
    thin_pool: str | None = None
    if lvm_type is LvmType.STRIPED:
        if parameters.get(P_STRIPES):
            text = parameters[P_STRIPES]
            if not text.isdigit() or int(text) < 2:
                raise InvalidArgument(f"{P_STRIPES}: {text!r} must be an integer >= 2")
            stripes = int(text)
        if parameters.get(P_STRIPE_SIZE):
            stripe_size = parse_quantity(parameters[P_STRIPE_SIZE], P_STRIPE_SIZE)
            if stripe_size < 4096 or stripe_size & (stripe_size - 1):
                raise InvalidArgument(f"{P_STRIPE_SIZE}: must be a power of two >= 4Ki")
    else:
        for key in (P_STRIPES, P_STRIPE_SIZE):
            if parameters.get(key):
                raise InvalidArgument(f"{key} applies to lvmType striped only")
    if lvm_type is LvmType.THIN:
        thin_pool = parameters.get(P_THIN_POOL, "") or default_thin_pool
        if not thin_pool:
            raise InvalidArgument(f"lvmType thin needs the parameter {P_THIN_POOL}")
        if not is_lvm_name(thin_pool):
            raise InvalidArgument(f"{P_THIN_POOL}: {thin_pool!r} is not a valid LV name")
    elif parameters.get(P_THIN_POOL):
        raise InvalidArgument(f"{P_THIN_POOL} applies to lvmType thin only")

    fs_type = ""
    if has_mount:
        wanted = {t for t in capability_fs_types if t}
        for key in (P_FS_TYPE, FSTYPE_KEY):
            if parameters.get(key):
                wanted.add(parameters[key])
        if len(wanted) > 1:
            raise InvalidArgument(f"conflicting filesystem types: {', '.join(sorted(wanted))}")
        fs_type = wanted.pop() if wanted else DEFAULT_FS_TYPE
        if fs_type not in supported_fs_types():
            raise InvalidArgument(
                f"fsType {fs_type!r} is not supported (supported: "
                f"{', '.join(supported_fs_types())})")
    mkfs = parameters.get(P_MKFS, "")
    mount = parameters.get(P_MOUNT, "")
    for key, value in ((P_MKFS, mkfs), (P_MOUNT, mount)):
        if len(value) > MAX_OPTIONS_LEN:
            raise InvalidArgument(f"{key}: longer than {MAX_OPTIONS_LEN} characters")
    if mkfs:
        try:
            shlex.split(mkfs)
        except ValueError as exc:
            raise InvalidArgument(f"{P_MKFS}: {exc}") from None
    wipe = parameters.get(P_WIPE, "") or default_wipe
    if wipe not in WIPE_CHOICES:
        raise InvalidArgument(f"{P_WIPE}: {wipe!r} is not one of {', '.join(WIPE_CHOICES)}")
    encrypted = parse_bool(parameters.get(P_ENCRYPTED, ""), P_ENCRYPTED)
    key_backend = parameters.get(P_KEY_BACKEND, "")
    if key_backend and not encrypted:
        raise InvalidArgument(f"{P_KEY_BACKEND} applies to {P_ENCRYPTED}: \"true\" only")
    if key_backend and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", key_backend):
        raise InvalidArgument(f"{P_KEY_BACKEND}: {key_backend!r} is not a backend name")
    return VolumeParams(vg, lvm_type, stripes, stripe_size, thin_pool, fs_type, mkfs, mount, wipe,
                        encrypted, key_backend)


def parse_bool(text: str, what: str) -> bool:
    """Kubernetes-style booleans: "true" / "false" (any case), empty = false."""
    value = text.strip().lower()
    if value in ("", "false"):
        return False
    if value == "true":
        return True
    raise InvalidArgument(f"{what}: {text!r} is not \"true\" or \"false\"")


def parse_snapshot_size(parameters: Mapping[str, str], origin_size: int, extent: int,
                        default_percent: int) -> int:
    """COW bytes for a thick snapshot (rounded up to extents, at least one extent)."""
    text = parameters.get(P_SNAPSHOT_SIZE, "").strip()
    if text.endswith("%"):
        number = text[:-1]
        if not number.isdigit() or not 1 <= int(number) <= 100:
            raise InvalidArgument(f"{P_SNAPSHOT_SIZE}: {text!r} must be 1% to 100%")
        size = origin_size * int(number) // 100
    elif text:
        size = parse_quantity(text, P_SNAPSHOT_SIZE)
        if size <= 0:
            raise InvalidArgument(f"{P_SNAPSHOT_SIZE} must be positive")
    else:
        size = origin_size * default_percent // 100
    return max(extent, round_up(size, extent))


def check_snapshot_params(parameters: Mapping[str, str]) -> None:
    unknown = sorted(k for k in parameters
                     if k not in SNAPSHOT_KEYS and not k.startswith(K8S_PREFIX))
    if unknown:
        raise InvalidArgument(
            f"unknown VolumeSnapshotClass parameter(s) {', '.join(unknown)}; "
            f"known: {', '.join(sorted(SNAPSHOT_KEYS))}")
    text = parameters.get(P_SNAPSHOT_SIZE, "").strip()
    if text and not text.endswith("%"):
        parse_quantity(text, P_SNAPSHOT_SIZE)


# ------------------------------------------------------------------ capacity


def round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


def round_down(value: int, unit: int) -> int:
    return value // unit * unit


def check_range(required: int, limit: int) -> None:
    if required < 0 or limit < 0:
        raise InvalidArgument("capacity_range: required_bytes and limit_bytes must not be negative")
    if required and limit and limit < required:
        raise InvalidArgument(
            f"capacity_range: limit_bytes {limit} is below required_bytes {required}")


def choose_size(required: int, limit: int, unit: int, default: int, minimum: int = 0) -> int:
    """The size to create: required rounded up to `unit`, within limit, at least `minimum`."""
    check_range(required, limit)
    if required or minimum:
        size = round_up(max(required, minimum, 1), unit)
    else:
        size = round_up(default, unit)
        if limit:
            size = min(size, round_down(limit, unit))
    if limit and size > limit:
        what = f"{required} bytes" if required >= minimum else f"the source's {minimum} bytes"
        raise OutOfRange(
            f"{what} rounded up to the allocation unit ({unit} bytes) is {size} bytes, "
            f"above limit_bytes {limit}")
    if size <= 0:
        raise OutOfRange(f"limit_bytes {limit} is below the allocation unit ({unit} bytes)")
    return size


def size_fits(size: int, required: int, limit: int) -> bool:
    return (not required or size >= required) and (not limit or size <= limit)
