"""Is a snapshot LV what its tags claim? Decided by LVM's own facts, never by tags alone.

A thick CreateSnapshot is two metadata commits inside one lvcreate: first a plain LV (the
copy-on-write area, already carrying every tag), then its conversion into a snapshot. A kill
between them leaves a plain LV tagged as a snapshot; restoring from it would copy whatever its
extents held before. So every lookup of a snapshot checks:

- thick: LVM reports a snapshot (lv_attr s/S) whose origin is the source volume's LV;
- thin:  a thin volume whose origin is the source volume's LV, or, once finished (verified
         when it was created), a thin volume whose origin is gone (the source volume was
         deleted: thin snapshots outlive their origin).

Anything else is an unfinished leftover: removed and redone, never served.
"""

from __future__ import annotations

from csi_lvm.volume import KIND_SNAPSHOT, InvalidId, Ownership, parse_id
from edge_common.lvm import LogicalVolume


def snapshot_is_real(lv: LogicalVolume, own: Ownership) -> bool:
    if not own.owned or own.kind != KIND_SNAPSHOT or own.pending:
        return False
    try:
        source = parse_id(own.source_id)
    except InvalidId:
        return False
    if source.vg != lv.vg_name:
        return False
    if lv.attr.snapshot:
        return lv.origin == source.lv
    if lv.is_thin:
        return lv.origin == source.lv or (not lv.origin and not own.unfinished)
    return False
