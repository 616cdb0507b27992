"""A small on-disk journal of physical volumes this agent is about to create.

pvcreate and vgcreate/vgextend are two commands; the agent can die between them. The device is
then an LVM physical volume in no volume group, which the safety checks refuse unless this
journal shows that the agent itself created it for that volume group. Entries are written
before pvcreate and dropped once the device is in its volume group.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from node_resource_manager.devices import BlockDevice, majmin


class Journal:
    FILE = "pending-pvs.json"

    def __init__(self, state_dir: str | os.PathLike[str] | None) -> None:
        """``state_dir`` None keeps the journal in memory only (dry runs, tests)."""
        self._path = Path(state_dir) / self.FILE if state_dir is not None else None
        self._lock = threading.Lock()
        self._entries: dict[str, dict[str, object]] = self._load()

    @property
    def path(self) -> Path | None:
        return self._path

    def _load(self) -> dict[str, dict[str, object]]:
        if self._path is None:
            return {}
        try:
            doc = json.loads(self._path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            # A damaged journal claims nothing: orphan PVs are then refused, never used.
            return {}
        entries = doc.get("pending") if isinstance(doc, dict) else None
        if not isinstance(entries, dict):
            return {}
        return {str(k): v for k, v in entries.items() if isinstance(v, dict)}

    def claims(self, rdev: int, vg: str) -> bool:
        with self._lock:
            entry = self._entries.get(majmin(rdev))
            return entry is not None and entry.get("vg") == vg

    def pending(self) -> dict[str, dict[str, object]]:
        with self._lock:
            return dict(self._entries)

    def add(self, vg: str, devices: Iterable[BlockDevice]) -> None:
        with self._lock:
            for dev in devices:
                self._entries[dev.majmin] = {"vg": vg, "path": dev.path, "since": time.time()}
            self._save()

    def done(self, devices: Iterable[BlockDevice]) -> None:
        with self._lock:
            changed = False
            for dev in devices:
                changed |= self._entries.pop(dev.majmin, None) is not None
            if changed:
                self._save()

    def _save(self) -> None:
        if self._path is None:
            return
        self._path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._path.with_suffix(".tmp")
        data = json.dumps({"pending": self._entries}, indent=1, sort_keys=True).encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self._path)
        dir_fd = os.open(self._path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
