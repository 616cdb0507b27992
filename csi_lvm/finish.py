"""Finishing a new volume: what makes an LV safe to hand to a workload.

Every LV the driver creates is born with the ``unfinished`` tag, set by the very lvcreate that
creates it (no extra LVM process). LVM commits its metadata BEFORE it wipes the new LV's first
bytes, so a kill inside lvcreate (the driver's own timeout, a container kill, power loss) can
leave an LV whose blocks still hold an earlier tenant's data; the tag says so.

The invariant: an LV that carries ``unfinished`` has never been given to a workload, so wiping
it again always loses nothing. It holds because everything that exposes an LV's content
finishes it first, under the volume's in-flight key: NodePublishVolume before the first mount
or bind (there is no NodeStage), CreateSnapshot and clones before they read it, and a
CreateVolume retry that meets it. Finishing = the driver itself zeroes the head and the tail
(signatures: partition tables, superblocks, LUKS/RAID headers; through an O_EXCL descriptor, so
never a device in use; a thin volume needs nothing), and only then removes the tag.

Where CreateVolume spends no extra LVM process on it (with device-mapper, a plain volume: no
copy, no full wipe, no LUKS header): it wipes synchronously (no LVM process, ~2 MiB written)
and answers; the tag removal is queued with the Finisher below, which drops the tag of every
queued LV in ONE ``lvchange --deltag --select`` per batch, off the critical path (50
concurrent creates cost a few lvchange processes, not 50). Until that ran, the LV is "wiped,
tag removal queued": a first use that finds it queued only drops the tag itself (one lvchange,
no second wipe), when its size is still the wiped size. A crash in between (the answer given,
the lvchange not yet run) loses nothing: the LV keeps ``unfinished``, so its first publish (or
snapshot, clone, CreateVolume retry) wipes it again - harmless, it was never used - and drops
the tag. The queue names LVs by LV UUID (read from device-mapper after the wipe, no LVM
process): an LV deleted and recreated under the same name meanwhile is another LV, never
"finished" by an older entry.

Volumes CreateVolume fills itself (copies, restores, fully zeroed block volumes, LUKS headers)
are also ``pending``, and drop both tags in the one lvchange that ends the fill, before the
answer: a pending LV was never answered, so the retry or the start-up sweep removes it; its
tag removal cannot be deferred past the answer.

Rule for any code that writes into a new LV before its first publish (a copy, a LUKS header):
drop ``unfinished`` in the lvchange that ends that work (as ``pending`` is), or the first use
will wipe what it wrote.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge

from csi_lvm import blockdev
from csi_lvm.volume import TAG_UNFINISHED, LvRef
from edge_common.devmapper import DmError, dm_info, dm_name
from edge_common.lvm import Lvm, LvmError, still_running

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
    log.info("finished a new volume (" + ("thin: nothing to wipe" if thin else
                                          "head and tail wiped") + ", unfinished tag removed)",
             extra={"volume_id": ref.id})


def wiped_lv_uuid(ref: LvRef) -> str:
    """The LV UUID of the mapped device of ref (one device-mapper ioctl, no LVM process); ""
    when the kernel cannot tell."""
    try:
        info = dm_info(dm_name(ref.vg, ref.lv))
    except DmError:
        return ""
    return info.lv_uuid if info is not None else ""


@dataclass(frozen=True)
class Wiped:
    """A plain new LV made safe by CreateVolume whose ``unfinished`` tag is still to go."""

    ref: LvRef
    uuid: str
    size: int  # what was wiped: a volume grown since needs its new tail wiped


class FinisherMetrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.batches = Counter(
            "csi_lvm_finisher_batches", "Background lvchange runs dropping the unfinished tag "
            "of wiped new volumes, by result (ok, failed: retried later)", ["result"],
            registry=registry)
        for result in ("ok", "failed"):
            self.batches.labels(result=result)
        self.volumes = Counter(
            "csi_lvm_finisher_volumes", "New volumes whose unfinished tag the background "
            "finisher dropped (or found gone)", registry=registry)
        self.queued = Gauge(
            "csi_lvm_finisher_queued", "Wiped new volumes whose unfinished tag removal is "
            "queued", registry=registry)


class Finisher:
    """Drops the ``unfinished`` tag of wiped new volumes in the background, batched.

    A batch is ONE lvchange for every queued LV (all VGs at once). A failed batch is logged,
    counted and retried after retry_seconds with whatever is queued then; nothing leaves the
    queue before an lvchange that covered it succeeded (or a caller settled it). The lvchange
    is never killed (the runner's rule); stop() lets the running one end, tries a last batch
    and returns."""

    def __init__(self, lvm: Lvm, *, delay_seconds: float = 0.2, retry_seconds: float = 5.0,
                 registry: CollectorRegistry | None = None) -> None:
        self.lvm = lvm
        self.delay = delay_seconds  # gather the creates of a burst into one batch
        self.retry = retry_seconds
        self.metrics = FinisherMetrics(registry)
        self._queue: dict[str, Wiped] = {}  # by LV UUID
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def queue(self, ref: LvRef, uuid: str, size: int) -> None:
        with self._cond:
            self._queue[uuid] = Wiped(ref, uuid, size)
            self.metrics.queued.set(len(self._queue))
            self._cond.notify_all()

    def queued(self, uuid: str, size: int | None = None) -> bool:
        """Is this LV wiped with its tag removal queued (and, given size, wiped at that size)?"""
        with self._cond:
            entry = self._queue.get(uuid) if uuid else None
        return entry is not None and (size is None or entry.size == size)

    def settle(self, ref: LvRef, uuid: str, size: int) -> bool:
        """For a first use, under the volume's in-flight key: when ref is queued as wiped at
        this size, drop its tag now (one lvchange) and True; False when the caller must finish
        it itself (not queued: e.g. a crash lost the queue; or grown since the wipe)."""
        if not self.queued(uuid, size):
            return False
        self.lvm.deltag(ref.vg, ref.lv, [TAG_UNFINISHED])
        self._done([uuid])
        log.info("finished a new volume (its queued tag removal done now)",
                 extra={"volume_id": ref.id})
        return True

    def _done(self, uuids: list[str]) -> None:
        with self._cond:
            for uuid in uuids:
                self._queue.pop(uuid, None)
            self.metrics.queued.set(len(self._queue))

    # ------------------------------------------------------------------ background

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="csi-finisher", daemon=True)
            self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def run_once(self) -> bool:
        """One batch of everything queued now; True when it succeeded (or nothing was
        queued)."""
        with self._cond:
            batch = list(self._queue.values())
        if not batch:
            return True
        uuids = [w.uuid for w in batch]
        try:
            self.lvm.deltag_by_uuid([w.ref.vg for w in batch], TAG_UNFINISHED, uuids)
        except LvmError as exc:
            running = still_running(exc)
            if running is not None:  # never killed: wait for it to end, then retry
                concurrent.futures.wait([running.finished])
            self.metrics.batches.labels(result="failed").inc()
            log.warning("dropping the unfinished tag of new volumes failed; retrying later "
                        "(they stay safe: a first use finishes them itself)",
                        extra={"volumes": [w.ref.id for w in batch], "error": exc.message})
            return False
        self._done(uuids)
        self.metrics.batches.labels(result="ok").inc()
        self.metrics.volumes.inc(len(batch))
        log.info("finished new volumes (unfinished tag removed)",
                 extra={"volumes": [w.ref.id for w in batch]})
        return True

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if self._stopping and not self._queue:
                    return
                stopping = self._stopping
            if not stopping:
                with self._cond:  # a burst of creates becomes one batch
                    self._cond.wait_for(lambda: self._stopping, self.delay)
            if not self.run_once():
                with self._cond:
                    if self._stopping:
                        return  # the last try failed: the LVs stay unfinished (safe)
                    self._cond.wait_for(lambda: self._stopping, self.retry)
            elif stopping:
                return
