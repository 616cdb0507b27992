"""Background re-wrap of encrypted volumes' keys after a root-key rotation.

Every `encryption_rewrap_seconds` the loop lists this driver's active encrypted volumes (one
`lvs` call), asks each volume's backend for its current root key once per round (cached by
the backends themselves where they can), and re-wraps the tokens still under an older root key
(VolumeEncryption.rewrap). Open volumes stay open and mounted: only the token in the LUKS2
header changes. Inactive volumes are left alone (activating them would change their state);
they are re-wrapped the next round after they are published. The check only reads; the
rewrite holds the volume's in-flight key, and a volume busy with an RPC waits for the next
round.
"""

from __future__ import annotations

import logging
import threading
from contextlib import AbstractContextManager

from csi_lvm.encryption import VolumeEncryption, is_encrypted
from csi_lvm.locks import InFlight
from csi_lvm.volume import KIND_VOLUME, owner_tag, read_tags
from edge_common.lvm import Lvm, LvmError

log = logging.getLogger(__name__)


def encrypted_volumes(lvm: Lvm, driver_name: str) -> list[tuple[str, str]]:
    """(volume_id, LV device path) of every active, finished encrypted volume of the driver."""
    out = []
    for lv in lvm.lvs(tag=owner_tag(driver_name)):
        own = read_tags(lv.tags, driver_name)
        if own.kind == KIND_VOLUME and not own.pending and lv.is_active \
                and is_encrypted(own.context):
            out.append((f"{lv.vg_name}/{lv.name}", f"/dev/{lv.vg_name}/{lv.name}"))
    return out


class RewrapLoop:
    def __init__(self, encryption: VolumeEncryption, lvm: Lvm, driver_name: str,
                 interval: float, locks: InFlight) -> None:
        self.encryption = encryption
        self.locks = locks
        self.lvm = lvm
        self.driver_name = driver_name
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> dict[str, str]:
        try:
            volumes = encrypted_volumes(self.lvm, self.driver_name)
        except LvmError as exc:
            log.warning("listing encrypted volumes failed", extra={"error": exc.message})
            return {}
        outcome = self.encryption.rewrap_all(volumes, self._hold, self._exists)
        changed = sorted(v for v, what in outcome.items() if what == "rewrapped")
        if changed:
            log.info("re-wrapped volume keys", extra={"volumes": changed})
        return outcome

    def _hold(self, volume_id: str) -> AbstractContextManager[object]:
        """The volume's in-flight key, shared with every RPC (Aborted when one holds it)."""
        return self.locks.hold(f"lv:{volume_id}")

    def _exists(self, volume_id: str) -> bool:
        vg, _, lv = volume_id.partition("/")
        try:
            return self.lvm.get_lv(vg, lv) is not None
        except LvmError:
            return True  # unknown is not absent

    def start(self) -> None:
        if self.interval <= 0 or not self.encryption.backends.configured:
            return
        self._thread = threading.Thread(target=self._loop, name="csi-lvm-rewrap", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.run_once()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
