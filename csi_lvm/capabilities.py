"""Which volume capabilities this driver supports (shared by the controller and node services).

Local LVs live on one node: every single-node access mode is supported (ReadWriteOnce,
ReadWriteOncePod = SINGLE_NODE_SINGLE_WRITER, SINGLE_NODE_MULTI_WRITER, read-only); every
multi-node mode is refused. Access types: mount (ext4, xfs, btrfs when mkfs.btrfs exists) and
raw block.
"""

from __future__ import annotations

import shutil
from functools import lru_cache

from edge_proto.csi.v1 import csi_pb2

Mode = csi_pb2.VolumeCapability.AccessMode

SUPPORTED_MODES = frozenset({
    Mode.SINGLE_NODE_WRITER,
    Mode.SINGLE_NODE_READER_ONLY,
    Mode.SINGLE_NODE_SINGLE_WRITER,
    Mode.SINGLE_NODE_MULTI_WRITER,
})
DEFAULT_FS_TYPE = "ext4"


@lru_cache(maxsize=1)
def supported_fs_types() -> tuple[str, ...]:
    """ext4 and xfs always; btrfs only when its mkfs exists on this host."""
    out = ["ext4", "xfs"]
    if shutil.which("mkfs.btrfs"):
        out.append("btrfs")
    return tuple(out)


def mode_name(mode: int) -> str:
    try:
        return str(Mode.Mode.Name(mode))
    except ValueError:
        return str(mode)


def capability_error(cap: csi_pb2.VolumeCapability) -> str | None:
    """Why this capability is not supported (None when it is)."""
    access = cap.WhichOneof("access_type")
    if access is None:
        return "volume capability has neither mount nor block access type"
    if not cap.HasField("access_mode") or cap.access_mode.mode == Mode.UNKNOWN:
        return "volume capability has no access mode"
    if cap.access_mode.mode not in SUPPORTED_MODES:
        return (f"access mode {mode_name(cap.access_mode.mode)} is not supported: "
                "local LVM volumes are single-node only")
    if access == "mount":
        fs_type = cap.mount.fs_type
        if fs_type and fs_type not in supported_fs_types():
            return (f"fs_type {fs_type!r} is not supported "
                    f"(supported: {', '.join(supported_fs_types())})")
    return None


def is_block(cap: csi_pb2.VolumeCapability) -> bool:
    return cap.WhichOneof("access_type") == "block"
