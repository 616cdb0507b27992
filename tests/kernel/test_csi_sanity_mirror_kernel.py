"""The host mirror of csi-sanity (tests/csi/test_sanity_mirror.py: Identity, CreateVolume and
DeleteVolume idempotency, ListVolumes and its paging, GetCapacity, ValidateVolumeCapabilities,
ControllerGetVolume, ControllerExpandVolume, the Node service's argument checks), run in the
guest with `encrypted: "true"` in every CreateVolume's parameters, as csi-sanity runs with
--csi.testvolumeparameters. On the host an encrypted create cannot happen (no device-mapper:
FAILED_PRECONDITION), so these checks only see the encrypted path here; the checks that need
live LVs are in test_csi_sanity_kernel.py, which runs plain and encrypted too.

The checks are the host module's own functions (imported, not copied); only the `suite`
fixture differs: the guest's disks (one VG each, as test_csi_sanity_kernel.py), a local
keyring backend, and RPC timeouts for an emulated CPU.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_common.lvm import Lvm
from kms_plugin.backends import local
from tests.csi import sanity_harness
from tests.csi.conftest import make_config
from tests.csi.sanity_harness import TEST_VOLUME_SIZE, MountDir, Resources
from tests.csi.test_sanity_mirror import *  # noqa: F403  (the checks themselves)
from tests.csi.test_sanity_mirror import Endpoint, Suite
from tests.kernel.conftest import scrub_disks
from tests.rigs.lvm import unique_vg_name

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(900)]

RPC_TIMEOUT = 300.0


@pytest.fixture(scope="module")
def suite(kernel_disk_paths: list[str], lvm: Lvm,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Suite]:
    keys = tmp_path_factory.mktemp("mirror-keys")
    local.keygen(keys / "keyring.json", "sanity")
    (keys / "backends.yaml").write_text(
        f"backends:\n  node:\n    type: local\n    keyring: {keys / 'keyring.json'}\n")
    disks = kernel_disk_paths[:2]
    scrub_disks(lvm, disks)
    vg, other = unique_vg_name("mirror"), unique_vg_name("mirror")
    lvm.vgcreate(vg, disks[:1])
    lvm.vgcreate(other, disks[1:2])
    sock_dir = Path(f"/tmp/kmir-{secrets.token_hex(4)}")
    sock_dir.mkdir()
    config = make_config(vg, sock_dir, default_volume_size=TEST_VOLUME_SIZE,
                         lvm_timeout_seconds=RPC_TIMEOUT, allowed_vgs=[other],
                         data_job_wait_seconds=RPC_TIMEOUT,
                         encryption_backends_file=str(keys / "backends.yaml"))
    sanity_harness.TEST_VOLUME_PARAMETERS["encrypted"] = "true"
    s = Suite(Endpoint.start(config), lvm, vg, other, sock_dir)
    try:
        yield s
    finally:
        sanity_harness.TEST_VOLUME_PARAMETERS.clear()
        s.ep.stop()
        for p in sock_dir.iterdir():
            p.unlink()
        sock_dir.rmdir()
        with contextlib.suppress(Exception):
            lvm.command("vgremove", "--yes", "--force", "--", vg, other)
        scrub_disks(lvm, disks)


@pytest.fixture
def r(suite: Suite, mount_dir: MountDir) -> Iterator[Resources]:
    """The host module's `r`, with the guest's RPC timeout; and every volume it made was
    encrypted (a check that silently made plain volumes would prove nothing here)."""
    res = Resources(suite.ep.controller, suite.ep.node, mount_dir.target, timeout=RPC_TIMEOUT)
    create = res.create_volume

    def create_and_check(req: Any) -> Any:
        resp = create(req)
        if resp.volume.volume_id:
            assert resp.volume.volume_context.get("encrypted") == "true", resp
        return resp

    res.create_volume = create_and_check  # type: ignore[method-assign]
    yield res
    errors = res.cleanup()
    assert not errors, f"resource cleanup failed: {errors}"
    assert suite.our_lvs() == []


def test_the_suite_runs_with_encrypted_parameters(suite: Suite) -> None:
    assert sanity_harness.TEST_VOLUME_PARAMETERS == {"encrypted": "true"}
    assert suite.ep.config.encryption_backends_file
