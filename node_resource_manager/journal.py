"""A small on-disk journal of physical volumes this agent is about to create.

pvcreate and vgcreate/vgextend are two commands; the agent can die between them. The device is
then an LVM physical volume in no volume group, which the safety checks refuse unless this
journal shows that the agent itself created it for that volume group.

An entry is keyed by the PV UUID the agent chooses and hands to ``pvcreate --uuid`` (so it is
on disk BEFORE the PV exists) and records the medium's identity (identity.MediumIdentity). An
orphan PV is ours only when BOTH match: a device number or a name proves nothing (they are
reused after a hot-swap or a reboot), and a UUID alone would adopt a copy of our PV on another
medium. Entries are dropped once the device is in its volume group.
"""

from __future__ import annotations

import json
import os
import secrets
import string
import threading
import time
from pathlib import Path

from node_resource_manager.identity import MediumIdentity

_UUID_CHARS = string.ascii_letters + string.digits


def new_pv_uuid() -> str:
    """A random LVM UUID (32 characters, grouped 6-4-4-4-4-4-6 as LVM prints them)."""
    raw = "".join(secrets.choice(_UUID_CHARS) for _ in range(32))
    cut = (6, 10, 14, 18, 22, 26)
    return "-".join(raw[a:b] for a, b in zip((0, *cut), (*cut, 32), strict=True))


class Journal:
    FILE = "pending-pvs.json"
    VERSION = 2  # 1 was keyed by major:minor; its entries claim nothing (fail closed)

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
        if not isinstance(doc, dict) or doc.get("version") != self.VERSION:
            return {}
        entries = doc.get("pending")
        if not isinstance(entries, dict):
            return {}
        return {str(k): v for k, v in entries.items()
                if isinstance(v, dict) and isinstance(v.get("identity"), dict)}

    def claims(self, pv_uuid: str, identity: MediumIdentity, vg: str) -> bool:
        """Did this agent create PV ``pv_uuid`` on THIS medium for ``vg``?"""
        with self._lock:
            entry = self._entries.get(pv_uuid)
        if entry is None or entry.get("vg") != vg:
            return False
        recorded = entry.get("identity")
        return isinstance(recorded, dict) and identity.same_medium_as(recorded)

    def pending(self) -> dict[str, dict[str, object]]:
        with self._lock:
            return dict(self._entries)

    def add(self, vg: str, pv_uuid: str, identity: MediumIdentity, lvm_path: str) -> None:
        """Record the intent BEFORE ``pvcreate --uuid pv_uuid`` (raises OSError when the
        journal cannot be written: then pvcreate must not run)."""
        with self._lock:
            self._entries[pv_uuid] = {"vg": vg, "path": lvm_path, "since": time.time(),
                                      "identity": identity.to_dict()}
            self._save()

    def done(self, pv_uuids: list[str]) -> None:
        with self._lock:
            changed = False
            for pv_uuid in pv_uuids:
                changed |= self._entries.pop(pv_uuid, None) is not None
            if changed:
                self._save()

    def _save(self) -> None:
        if self._path is None:
            return
        self._path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._path.with_suffix(".tmp")
        data = json.dumps({"version": self.VERSION, "pending": self._entries}, indent=1,
                          sort_keys=True).encode()
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
