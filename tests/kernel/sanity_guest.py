"""The driver csi-sanity would be pointed at in the guest, shared by the guest's csi-sanity
modules (test_csi_sanity_kernel.py, test_csi_sanity_mirror_kernel.py)."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from csi_lvm.config import CsiConfig
from edge_common.lvm import Lvm
from kms_plugin.backends import local
from tests.csi import sanity_harness
from tests.csi.conftest import make_config
from tests.csi.sanity_harness import TEST_VOLUME_SIZE
from tests.kernel.conftest import scrub_disks
from tests.rigs.lvm import unique_vg_name

RPC_TIMEOUT = 300.0


@contextlib.contextmanager
def sanity_config(lvm: Lvm, disks: list[str], keys: Path, *,
                  encrypted: bool) -> Iterator[tuple[CsiConfig, str, str]]:
    """What csi-sanity's driver runs on in the guest: one VG per disk (the default one and an
    allowed other), its config, and with ``encrypted`` a local keyring backend `node` and
    `encrypted: "true"` in every CreateVolume's parameters; all undone on exit (stop the
    driver first)."""
    extra: dict[str, Any] = {}
    if encrypted:
        local.keygen(keys / "keyring.json", "sanity")
        (keys / "backends.yaml").write_text(
            f"backends:\n  node:\n    type: local\n    keyring: {keys / 'keyring.json'}\n")
        extra["encryption_backends_file"] = str(keys / "backends.yaml")
        sanity_harness.TEST_VOLUME_PARAMETERS["encrypted"] = "true"
    disks = disks[:2]
    scrub_disks(lvm, disks)
    vg, other = unique_vg_name("sanity"), unique_vg_name("sanity")
    lvm.vgcreate(vg, disks[:1])
    lvm.vgcreate(other, disks[1:2])
    sock_dir = Path(f"/tmp/ksan-{secrets.token_hex(4)}")
    sock_dir.mkdir()
    try:
        yield make_config(vg, sock_dir, default_volume_size=TEST_VOLUME_SIZE,
                          lvm_timeout_seconds=RPC_TIMEOUT, allowed_vgs=[other],
                          # csi-sanity calls CreateVolume once: a clone's copy (seconds under
                          # emulation) must finish inside that call, not answer ABORTED. The
                          # driver waits until shortly before the call's deadline (RPC_TIMEOUT),
                          # whatever it waits for callers without one.
                          data_job_wait_seconds=0.0, **extra), vg, other
    finally:
        sanity_harness.TEST_VOLUME_PARAMETERS.clear()
        for p in sock_dir.iterdir():
            p.unlink()
        sock_dir.rmdir()
        with contextlib.suppress(Exception):
            lvm.command("vgremove", "--yes", "--force", "--", vg, other)
        scrub_disks(lvm, disks)
