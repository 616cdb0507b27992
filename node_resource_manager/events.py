"""Where reconcile results go: a Sink receives the status summary and the events.

Events are deduplicated (edge_common.events), so a device refused on every resync does not
flood the API server.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Protocol

from edge_common.events import Deduper, LogEvents

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


class LogSink(LogEvents):
    """Offline mode: events go to the log; the status to the log and optionally a file."""

    def __init__(self, status_file: str | None = None, deduper: Deduper | None = None) -> None:
        super().__init__(deduper)
        self.status_file = status_file
        self.last_status: dict[str, Any] | None = None

    def status(self, summary: dict[str, Any]) -> None:
        self.last_status = summary
        if self.status_file:
            tmp = f"{self.status_file}.tmp"
            with open(tmp, "w") as fh:
                json.dump(summary, fh, indent=2, sort_keys=True)
                fh.write("\n")
            os.replace(tmp, self.status_file)
