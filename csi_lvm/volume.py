"""Volume and snapshot identity: ids, LV names, ownership tags and the volume context.

This module is the contract between the controller (which creates LVs) and the node service
(which finds them again). It is stable: changing anything here orphans existing volumes.

Ids
    volume_id = snapshot_id = "<vg>/<lv>". A VG name never contains "/", so the split is
    unambiguous; both parts are checked against LVM's name rules before any lookup.

LV names (deterministic, at most 48 characters, valid for any CSI name)
    volume:   the CSI name itself when it is "simple" (lower-case letters, digits, ".", "+",
              "-"; starts with a letter or digit; at most 48 characters; not starting with
              "snap"/"pvmove"), e.g. "pvc-0b5c...". Otherwise
              "<sanitised prefix, <= 30 chars>_<first 16 hex of sha256(name)>".
    snapshot: "snap-<sanitised prefix, <= 24 chars>_<first 16 hex of sha256("snapshot:" + name)>"
              (a leading "snapshot-" is dropped from the prefix: LVM reserves names starting
              with "snapshot").
    temporary: "snaptmp-<target LV name>" (kind=temporary: the read side of a clone).
    Volume names never start with "snap" (such names are hashed and get a "v" in front), simple
    names have no "_" and hashed ones end in "_<16 hex>": the forms never collide, and "_"
    is only ever followed by hex digits, so no LVM-reserved suffix ("_tdata", "_cmeta"...) can
    appear. The full CSI name is also kept in a tag and checked on every lookup.

Tags (LVM charset [A-Za-z0-9_+.-/=!:&#], at most 1024 characters each)
    csi-lvm.edge.io/owner=<driver name>     every LV the driver made; nothing else is ever
                                            listed, changed or removed
    csi-lvm.edge.io/kind=volume|snapshot
    csi-lvm.edge.io/name=<base64url(CSI name)>
    csi-lvm.edge.io/created=<unix seconds>  creation time (snapshots report it)
    csi-lvm.edge.io/size=<bytes>            requested size (snapshots: the origin's size)
    csi-lvm.edge.io/source=<kind>:<id>      content source: "snapshot:<vg>/<lv>", "volume:<vg>/<lv>"
                                            (on snapshots: "volume:<source volume id>")
    csi-lvm.edge.io/ctx=<base64url(JSON)>   the volume context returned by CreateVolume
    csi-lvm.edge.io/plain-delete            a volume whose deletion is nothing but lvremove (no
                                            wipe, nothing else in its context): DeleteVolume
                                            removes it with one `lvremove --select` carrying the
                                            ownership tags; volumes without it take the lookup
    csi-lvm.edge.io/pending                 set while CreateVolume fills the LV (copy, restore,
                                            full zeroing); such an LV was never handed out: a
                                            retry (or the start-up sweep) removes and redoes it
    csi-lvm.edge.io/unfinished              born with EVERY LV (in its own lvcreate): not yet
                                            made safe, never given to a workload; the first use
                                            wipes it and removes the tag (csi_lvm/finish.py)
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from edge_common.lvm.pool_tags import OVERPROVISION_TAG

TAG_PREFIX = "csi-lvm.edge.io/"
TAG_OWNER = TAG_PREFIX + "owner="
TAG_KIND = TAG_PREFIX + "kind="
TAG_NAME = TAG_PREFIX + "name="
TAG_CREATED = TAG_PREFIX + "created="
TAG_SIZE = TAG_PREFIX + "size="
TAG_SOURCE = TAG_PREFIX + "source="
TAG_CONTEXT = TAG_PREFIX + "ctx="
TAG_PENDING = TAG_PREFIX + "pending"
TAG_PLAIN_DELETE = TAG_PREFIX + "plain-delete"
TAG_UNFINISHED = TAG_PREFIX + "unfinished"
TAG_OVERPROVISION = OVERPROVISION_TAG  # on a thin pool (set by the operator/NRM)
MAX_TAG_LEN = 1024

KIND_VOLUME = "volume"
KIND_SNAPSHOT = "snapshot"
KIND_TEMPORARY = "temporary"  # a COW/thin snapshot used while cloning: always removable

_HASH_HEX = 16
_SIMPLE = re.compile(r"[a-z0-9][a-z0-9.+-]{0,47}")
_LVM_NAME = re.compile(r"[A-Za-z0-9+_.][A-Za-z0-9+_.-]{0,126}")
_TAG_CHARS = re.compile(r"[A-Za-z0-9_+./=!:&#-]+")
_SANITISE = re.compile(r"[^a-z0-9.+-]+")
_RESERVED_PREFIXES = ("snapshot", "pvmove", "snap")


class VolumeContext:
    """Keys of the volume_context CreateVolume returns and the node service consumes."""

    VG = "vgName"
    LV = "lvName"
    LVM_TYPE = "lvmType"  # linear | striped | thin
    FS_TYPE = "fsType"  # ext4 | xfs | btrfs ("" for raw block volumes)
    MKFS_OPTIONS = "mkfsOptions"  # shell-quoted extra mkfs arguments: split_options()
    MOUNT_OPTIONS = "mountOptions"  # comma- or space-separated: split_mount_options()


#: Context keys of a volume whose deletion needs nothing but lvremove (see TAG_PLAIN_DELETE).
PLAIN_CONTEXT_KEYS = frozenset({VolumeContext.VG, VolumeContext.LV, VolumeContext.LVM_TYPE,
                                VolumeContext.FS_TYPE, VolumeContext.MKFS_OPTIONS,
                                VolumeContext.MOUNT_OPTIONS})


class InvalidId(ValueError):
    """A volume or snapshot id that cannot be ours (malformed)."""


@dataclass(frozen=True, order=True)
class LvRef:
    vg: str
    lv: str

    @property
    def id(self) -> str:
        return f"{self.vg}/{self.lv}"

    @property
    def device_path(self) -> str:
        return f"/dev/{self.vg}/{self.lv}"

    def __str__(self) -> str:
        return self.id


def is_lvm_name(name: str) -> bool:
    return bool(_LVM_NAME.fullmatch(name)) and name not in (".", "..")


def parse_id(object_id: str) -> LvRef:
    """'<vg>/<lv>' -> LvRef; InvalidId when malformed."""
    vg, sep, lv = object_id.partition("/")
    if not sep or not is_lvm_name(vg) or not is_lvm_name(lv):
        raise InvalidId(f"{object_id!r} is not a volume id of this driver (expected <vg>/<lv>)")
    return LvRef(vg, lv)


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:_HASH_HEX]


def _sanitise(name: str, limit: int) -> str:
    text = _SANITISE.sub("-", name.lower()).strip("-.+")
    return text[:limit].rstrip("-.+")


def volume_lv_name(csi_name: str) -> str:
    """The LV name of the volume with this CSI name (deterministic, collision-free by design)."""
    if _SIMPLE.fullmatch(csi_name) and not csi_name.startswith(_RESERVED_PREFIXES):
        return csi_name
    prefix = _sanitise(csi_name, 30) or "vol"
    if prefix.startswith(_RESERVED_PREFIXES):
        prefix = "v" + prefix[:29]
    return f"{prefix}_{_hash(csi_name)}"


def snapshot_lv_name(csi_name: str) -> str:
    """The LV name of the snapshot with this CSI name."""
    stem = csi_name[len("snapshot-"):] if csi_name.startswith("snapshot-") else csi_name
    prefix = _sanitise(stem, 24) or "s"
    return f"snap-{prefix}_{_hash('snapshot:' + csi_name)}"


def temporary_lv_name(target_lv: str) -> str:
    return f"snaptmp-{target_lv}"


def encode_name(csi_name: str) -> str:
    return base64.urlsafe_b64encode(csi_name.encode("utf-8", "surrogatepass")).decode().rstrip("=")


def decode_name(text: str) -> str | None:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None


def owner_tag(driver_name: str) -> str:
    return TAG_OWNER + driver_name


def is_valid_tag(tag: str) -> bool:
    return len(tag) <= MAX_TAG_LEN and bool(_TAG_CHARS.fullmatch(tag)) and not tag.startswith("-")


def encode_context(context: Mapping[str, str]) -> str:
    data = json.dumps(dict(sorted(context.items())), separators=(",", ":"))
    return base64.urlsafe_b64encode(data.encode()).decode().rstrip("=")


def decode_context(text: str) -> dict[str, str] | None:
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        data = json.loads(raw)
    except (binascii.Error, ValueError):
        return None
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in data.items()
    ):
        return None
    return data


@dataclass(frozen=True)
class Ownership:
    """What the tags of one LV say (only meaningful when `owned`)."""

    owned: bool
    kind: str = ""
    name: str | None = None
    created: int | None = None
    size: int | None = None
    source: str = ""  # "<kind>:<id>" or ""
    context: dict[str, str] = field(default_factory=dict)
    pending: bool = False
    unfinished: bool = False

    @property
    def source_kind(self) -> str:
        return self.source.partition(":")[0]

    @property
    def source_id(self) -> str:
        return self.source.partition(":")[2]


def read_tags(tags: Iterable[str], driver_name: str) -> Ownership:
    tags = list(tags)
    if owner_tag(driver_name) not in tags:
        return Ownership(owned=False)
    kind = ""
    name: str | None = None
    created: int | None = None
    size: int | None = None
    source = ""
    context: dict[str, str] = {}
    pending = False
    unfinished = False
    for tag in tags:
        if tag.startswith(TAG_KIND):
            kind = tag[len(TAG_KIND):]
        elif tag.startswith(TAG_NAME):
            name = decode_name(tag[len(TAG_NAME):])
        elif tag.startswith(TAG_CREATED):
            created = _int_or_none(tag[len(TAG_CREATED):])
        elif tag.startswith(TAG_SIZE):
            size = _int_or_none(tag[len(TAG_SIZE):])
        elif tag.startswith(TAG_SOURCE):
            source = tag[len(TAG_SOURCE):]
        elif tag.startswith(TAG_CONTEXT):
            context = decode_context(tag[len(TAG_CONTEXT):]) or {}
        elif tag == TAG_PENDING:
            pending = True
        elif tag == TAG_UNFINISHED:
            unfinished = True
    return Ownership(True, kind, name, created, size, source, context, pending, unfinished)


def _int_or_none(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def build_tags(
    driver_name: str,
    *,
    kind: str,
    csi_name: str,
    created: int,
    size: int | None = None,
    source: str = "",
    context: Mapping[str, str] | None = None,
    pending: bool = False,
    unfinished: bool = True,
) -> list[str]:
    """The tags of a new LV; ``unfinished`` is on by default: every LV is born with it."""
    tags = [owner_tag(driver_name), TAG_KIND + kind, TAG_NAME + encode_name(csi_name),
            TAG_CREATED + str(created)]
    if size is not None:
        tags.append(TAG_SIZE + str(size))
    if source:
        tags.append(TAG_SOURCE + source)
    if context:
        tags.append(TAG_CONTEXT + encode_context(context))
    if pending:
        tags.append(TAG_PENDING)
    if unfinished:
        tags.append(TAG_UNFINISHED)
    for tag in tags:
        if not is_valid_tag(tag):
            raise ValueError(f"tag too long or with characters LVM refuses: {tag[:80]}...")
    return tags


def split_options(text: str) -> list[str]:
    """mkfsOptions -> argv words (shell quoting rules, never run through a shell)."""
    return shlex.split(text)


def split_mount_options(text: str) -> list[str]:
    """mountOptions "noatime,discard" or "noatime discard" -> ["noatime", "discard"]."""
    return [opt for part in text.replace(",", " ").split() if (opt := part.strip())]


# --- resolving an id on the node --------------------------------------------------------------


class _LvLookup(Protocol):
    def get_lv(self, vg: str, name: str) -> object | None: ...


@dataclass(frozen=True)
class ResolvedVolume:
    ref: LvRef
    lv: object  # edge_common.lvm.LogicalVolume
    ownership: Ownership

    @property
    def volume_id(self) -> str:
        return self.ref.id

    @property
    def device_path(self) -> str:
        """/dev/<vg>/<lv> (LVM creates it when the LV is active)."""
        return self.ref.device_path

    @property
    def context(self) -> dict[str, str]:
        return dict(self.ownership.context)


def resolve_volume(lvm: _LvLookup, driver_name: str, volume_id: str,
                   *, kind: str = KIND_VOLUME) -> ResolvedVolume | None:
    """The LV behind a volume id, or None when it does not exist or is not ours / not ready.

    Raises InvalidId for a malformed id and edge_common.lvm.LvmError when LVM fails (never read
    a failure as "absent").
    """
    ref = parse_id(volume_id)
    lv = lvm.get_lv(ref.vg, ref.lv)
    if lv is None:
        return None
    own = read_tags(getattr(lv, "tags", ()), driver_name)
    if not own.owned or own.pending or own.kind != kind:
        return None
    return ResolvedVolume(ref, lv, own)
