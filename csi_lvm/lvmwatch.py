"""Notice LVM changes made outside the driver without running LVM: GetCapacity then publishes
a VG or thin pool the node agent just built (or grew) within seconds, not at the next periodic
refresh.

Two cheap signals, each marking the capacity cache stale (the next GetCapacity re-reads LVM;
while nobody reads, nothing runs):

* LVM's metadata backup directory (`lvm_change_paths`, default /etc/lvm/backup). Every
  metadata change (vgcreate, vgextend, lvcreate, lvresize, tags, ...) rewrites the VG's backup
  file by a rename, which changes the directory's mtime. One stat() per path every
  `lvm_change_check_seconds`. Where LVM runs on the host through nsenter the host's directory is
  /proc/1/root/etc/lvm/backup (deploy/storage sets it). A path that does not exist (backups
  off, directory not mounted) is logged once and stays checked (it may appear).
* Block device uevents (edge_common.blockevents: udev's, or the kernel's where no udev daemon
  runs, device-mapper included): a disk that appears, grows or goes, an LV activated. Such an
  event comes before the PV/VG work that follows it (where no udev daemon turns LVM's writes
  into change events), so after one the cache counts as stale, at most once a second, for
  EVENT_WINDOW seconds.

Either signal alone suffices for a VG built on a new disk; the backup directory also covers
changes without any device event (an LV created or a pool tagged by someone else).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence

from csi_lvm.capacity import CapacityCache
from edge_common.blockevents import UdevWatcher

log = logging.getLogger(__name__)

#: After a block device event, how long GetCapacity keeps re-reading LVM (at most once a
#: second): long enough for the node agent's debounce and its pvcreate/vgcreate/vgextend.
EVENT_WINDOW = 15.0

Signature = tuple[tuple[int, int, int] | None, ...]


def signature(paths: Sequence[str]) -> Signature:
    """(mtime, inode, size) of each path; None for one that is missing or unreadable."""
    out: list[tuple[int, int, int] | None] = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            out.append(None)
        else:
            out.append((st.st_mtime_ns, st.st_ino, st.st_size))
    return tuple(out)


class ChangeWatch:
    """Marks `cache` stale when LVM changed outside the driver (see the module docstring)."""

    def __init__(self, cache: CapacityCache, paths: Sequence[str], interval: float,
                 block_events: bool = True) -> None:
        self.cache = cache
        self.paths = list(paths)
        self.interval = interval
        self.block_events = block_events
        self.noticed = 0  # changes noticed (tests, logs)
        self._udev: UdevWatcher | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last: Signature = ()

    def start(self) -> None:
        if self.paths and self.interval > 0:
            self._last = signature(self.paths)
            missing = [p for p, s in zip(self.paths, self._last, strict=True) if s is None]
            if missing:
                log.warning("LVM change check: path missing (LVM metadata backups off or not "
                            "mounted?); changes made outside the driver show at block device "
                            "events or the periodic refresh", extra={"paths": missing})
            self._thread = threading.Thread(target=self._loop, name="lvm-change-check",
                                            daemon=True)
            self._thread.start()
        if self.block_events:
            watcher = UdevWatcher(self._on_event, device_mapper=True,
                                  what="changes made outside the driver show at the LVM change "
                                  "check or the periodic refresh")
            if watcher.start():
                self._udev = watcher

    def stop(self) -> None:
        self._stop.set()
        if self._udev is not None:
            self._udev.stop()
            self._udev = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    @property
    def event_source(self) -> str | None:
        """"udev" or "kernel" while listening to block device events, else None."""
        return self._udev.source if self._udev is not None else None

    def check(self) -> bool:
        """One cheap check (a stat per path): True, and the cache marked stale, on a change."""
        now = signature(self.paths)
        if now == self._last:
            return False
        self._last = now
        self.noticed += 1
        self.cache.changed()
        log.debug("LVM metadata changed outside the driver: capacity will be re-read")
        return True

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.check()

    def _on_event(self, why: str) -> None:
        self.noticed += 1
        self.cache.changed(EVENT_WINDOW)
        log.debug("block device event: capacity will be re-read", extra={"event": why})
