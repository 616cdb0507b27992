"""Where reconcile results go: a Sink receives the status summary and the events.

Events are deduplicated: the same (reason, message) is emitted once, then again only after
``repeat_after`` seconds, so a device refused on every resync does not flood the API server.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

log = logging.getLogger(__name__)

# Event reasons (stable: operators alert on them).
VOLUME_GROUP_CREATED = "VolumeGroupCreated"
VOLUME_GROUP_EXTENDED = "VolumeGroupExtended"
THIN_POOL_CREATED = "ThinPoolCreated"
THIN_POOL_EXTENDED = "ThinPoolExtended"
THIN_POOL_SETTINGS_CHANGED = "ThinPoolSettingsChanged"
DEVICE_REJECTED = "DeviceRejected"
CONFIG_INVALID = "ConfigInvalid"
LVM_FAILED = "LvmCommandFailed"


class Sink(Protocol):
    def status(self, summary: dict[str, Any]) -> None: ...

    def event(self, reason: str, message: str, *, warning: bool) -> None: ...


class Deduper:
    def __init__(self, repeat_after: float = 3600.0, clock: Callable[[], float] = time.monotonic,
                 max_entries: int = 1024) -> None:
        self.repeat_after = repeat_after
        self._clock = clock
        self._max = max_entries
        self._last: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()

    def admit(self, reason: str, message: str) -> bool:
        now = self._clock()
        key = (reason, message)
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.repeat_after:
                return False
            if len(self._last) >= self._max:
                oldest = min(self._last, key=lambda k: self._last[k])
                del self._last[oldest]
            self._last[key] = now
            return True


class LogSink:
    """Offline mode: events go to the log; the status to the log and optionally a file."""

    def __init__(self, status_file: str | None = None, deduper: Deduper | None = None) -> None:
        self.status_file = status_file
        self.deduper = deduper or Deduper()
        self.last_status: dict[str, Any] | None = None
        self.events: list[tuple[str, str, bool]] = []

    def status(self, summary: dict[str, Any]) -> None:
        self.last_status = summary
        if self.status_file:
            tmp = f"{self.status_file}.tmp"
            with open(tmp, "w") as fh:
                json.dump(summary, fh, indent=2, sort_keys=True)
                fh.write("\n")
            os.replace(tmp, self.status_file)

    def event(self, reason: str, message: str, *, warning: bool) -> None:
        if not self.deduper.admit(reason, message):
            return
        self.events.append((reason, message, warning))
        level = logging.WARNING if warning else logging.INFO
        log.log(level, message, extra={"event_reason": reason})
