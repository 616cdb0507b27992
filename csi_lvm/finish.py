"""Finishing a new volume: what makes an LV safe to hand to a workload.

Every LV the driver creates is born with the ``unfinished`` tag, set by the very lvcreate that
creates it (no extra LVM process). LVM commits its metadata BEFORE it wipes the new LV's first
bytes, so a kill inside lvcreate (the driver's own timeout, a container kill, power loss) can
leave an LV whose blocks still hold an earlier tenant's data; the tag says so.

The invariant: an LV that carries ``unfinished`` has never been given to a workload, so wiping
it again always loses nothing. Whoever is about to expose its content finishes it first:
NodePublishVolume before the first mount or bind, CreateSnapshot and clones before reading it,
a CreateVolume retry that meets it. Finishing = the driver itself zeroes the head and the tail
(signatures: partition tables, superblocks, LUKS/RAID headers; through an O_EXCL descriptor, so
never a device in use), and only then removes the tag. Volumes whose creation must fill them
(copies, restores, fully zeroed block volumes) are finished by CreateVolume itself together
with ``pending`` in one lvchange. A plain CreateVolume answers without its own lvchange: the
first use pays it, which keeps CreateVolume at one LVM process.

Rule for any code that writes into a new LV before its first publish (a copy, a LUKS header):
drop ``unfinished`` in the lvchange that ends that work (as ``pending`` is), or the first use
will wipe what it wrote.
"""

from __future__ import annotations

import logging

from csi_lvm import blockdev
from csi_lvm.volume import TAG_UNFINISHED, LvRef
from edge_common.lvm import Lvm

log = logging.getLogger(__name__)


def make_safe(device: str, size: int) -> None:
    """No earlier signature at the head or the tail of the device (O_EXCL: never in use)."""
    blockdev.wait_for_device(device)
    blockdev.zero_head_and_tail(device, size)


def finish(lvm: Lvm, ref: LvRef, size: int, *, thin: bool = False) -> None:
    """Make the ACTIVE, unfinished LV ref safe, then drop its ``unfinished`` tag.

    A thin volume needs no wipe: its unprovisioned blocks read as zeros whatever the pool held
    before, and writing zeros would only allocate pool space."""
    if not thin:
        make_safe(ref.device_path, size)
    lvm.deltag(ref.vg, ref.lv, [TAG_UNFINISHED])
    log.info("finished a new volume (head and tail wiped, unfinished tag removed)",
             extra={"volume_id": ref.id})
