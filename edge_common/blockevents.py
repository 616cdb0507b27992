"""Block device uevents (add/change/remove) as a trigger: the node agent reconciles on them,
the CSI driver re-reads LVM for GetCapacity.

With a udev daemon on the host (``/run/udev/control``) we listen to udev's processed events;
without one (a container without udev, like our CI) to the kernel's raw uevents. If neither
netlink socket can be opened the caller is told (start() is False) and relies on its periodic
work. Device-mapper devices are ignored unless asked for: the node agent never cares about
LVs, the CSI driver does (an LV activated by someone else changes what a VG holds).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

ACTIONS = frozenset({"add", "change", "remove"})


class UdevWatcher:
    def __init__(self, trigger: Callable[[str], None], udev_control: str = "/run/udev/control",
                 *, device_mapper: bool = False, what: str = "hot-plugged disks are seen at "
                 "the next resync"):
        self.trigger = trigger
        self.udev_control = udev_control
        self.device_mapper = device_mapper
        self.what = what  # what the log says happens without events
        self.source: str | None = None  # "udev" or "kernel" once started
        self._observer: Any = None

    def start(self) -> bool:
        try:
            import pyudev
        except ImportError:
            log.warning(f"pyudev is not installed: {self.what}")
            return False
        source = "udev" if os.path.exists(self.udev_control) else "kernel"
        try:
            context = pyudev.Context()
            monitor = pyudev.Monitor.from_netlink(context, source=source)
            monitor.filter_by("block")
            observer = pyudev.MonitorObserver(monitor, callback=self._on_device,
                                              name="udev-monitor")
            observer.daemon = True
            observer.start()
        except Exception as exc:
            log.warning(f"block device events unavailable: {self.what}",
                        extra={"error": str(exc), "udev_source": source})
            return False
        self._observer = observer
        self.source = source
        log.info("listening for block device events", extra={"udev_source": source})
        return True

    def _on_device(self, device: Any) -> None:
        action = getattr(device, "action", None)
        name = str(getattr(device, "sys_name", "") or "")
        if action not in ACTIONS or (name.startswith("dm-") and not self.device_mapper):
            return
        self.trigger(f"udev {action} {name}")

    def stop(self) -> None:
        if self._observer is not None:
            try:
                self._observer.send_stop()
            except Exception:  # the monitor may already be gone
                pass
            self._observer = None
