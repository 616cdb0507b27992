"""Start-up sweep: remove what interrupted operations left behind.

Only LVs carrying our ownership tag AND either the `pending` tag (a CreateVolume that never
answered: the caller retries and gets a fresh LV) or kind=temporary (a clone's read-side
snapshot) are removed. Both were never handed out, so removing them loses nothing. The sweep
runs before the socket opens, so no request of this process can be in flight.
"""

from __future__ import annotations

import logging

from csi_lvm.volume import KIND_TEMPORARY, owner_tag, read_tags
from edge_common.log import log_context
from edge_common.lvm import Lvm, LvmError

log = logging.getLogger(__name__)


def sweep(lvm: Lvm, driver_name: str) -> list[str]:
    """Remove leftovers; returns their ids. LVM failures are logged, never fatal."""
    try:
        lvs = lvm.lvs(tag=owner_tag(driver_name))
    except LvmError as exc:
        log.warning("start-up sweep skipped: cannot list LVs", extra={"error": exc.message})
        return []
    leftovers = []
    for lv in lvs:
        own = read_tags(lv.tags, driver_name)
        if own.owned and (own.pending or own.kind == KIND_TEMPORARY):
            leftovers.append((own.kind != KIND_TEMPORARY, lv))  # temporaries first
    removed = []
    for _, lv in sorted(leftovers, key=lambda item: item[0]):
        with log_context(volume_id=lv.full_name):
            try:
                lvm.lvremove(lv.vg_name, lv.name)
            except LvmError as exc:
                if not exc.is_not_found():
                    log.warning("could not remove a leftover LV", extra={"error": exc.message})
                    continue
            log.info("removed a leftover of an interrupted operation")
            removed.append(lv.full_name)
    return removed
