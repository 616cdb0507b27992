"""Hot-plug: block device uevents trigger a reconcile.

With a udev daemon on the host (``/run/udev/control``) the agent listens to udev's processed
events; without one (a container without udev, like our CI) to the kernel's raw uevents. If
neither netlink socket can be opened the agent logs it and relies on the periodic resync.
Device-mapper devices are ignored: our own (and the CSI driver's) LVs come and go all the time
and never change the topology.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

ACTIONS = frozenset({"add", "change", "remove"})


class UdevWatcher:
    def __init__(self, trigger: Callable[[str], None], udev_control: str = "/run/udev/control"):
        self.trigger = trigger
        self.udev_control = udev_control
        self.source: str | None = None  # "udev" or "kernel" once started
        self._observer: Any = None

    def start(self) -> bool:
        try:
            import pyudev
        except ImportError:
            log.warning("pyudev is not installed: hot-plugged disks are seen at the next resync")
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
            log.warning("block device events unavailable: hot-plugged disks are seen at the "
                        "next resync", extra={"error": str(exc), "udev_source": source})
            return False
        self._observer = observer
        self.source = source
        log.info("listening for block device events", extra={"udev_source": source})
        return True

    def _on_device(self, device: Any) -> None:
        action = getattr(device, "action", None)
        name = str(getattr(device, "sys_name", "") or "")
        if action not in ACTIONS or name.startswith("dm-"):
            return
        self.trigger(f"udev {action} {name}")

    def stop(self) -> None:
        if self._observer is not None:
            try:
                self._observer.send_stop()
            except Exception:  # the monitor may already be gone
                pass
            self._observer = None
