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

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_common.lvm import Lvm
from tests.csi import sanity_harness
from tests.csi.sanity_harness import Resources
from tests.csi.test_sanity_mirror import *  # noqa: F403  (the checks themselves)
from tests.csi.test_sanity_mirror import Endpoint, Suite
from tests.kernel.sanity_guest import RPC_TIMEOUT, sanity_config

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")  # type: ignore[no-redef]  # replaces the host module's
def suite(kernel_disk_paths: list[str], lvm: Lvm,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Suite]:
    with sanity_config(lvm, kernel_disk_paths, tmp_path_factory.mktemp("mirror-keys"),
                       encrypted=True) as (config, vg, other):
        s = Suite(Endpoint.start(config), lvm, vg, other, Path(config.endpoint[7:]).parent,
                  rpc_timeout=RPC_TIMEOUT)
        try:
            yield s
        finally:
            s.ep.stop()


@pytest.fixture(autouse=True)
def every_volume_is_encrypted(r: Resources) -> None:
    """A check that silently made plain volumes would prove nothing here."""
    create = r.create_volume

    def create_and_check(req: Any) -> Any:
        resp = create(req)
        if resp.volume.volume_id:
            assert resp.volume.volume_context.get("encrypted") == "true", resp
        return resp

    r.create_volume = create_and_check  # type: ignore[method-assign]


def test_the_suite_runs_with_encrypted_parameters(suite: Suite) -> None:
    assert sanity_harness.TEST_VOLUME_PARAMETERS == {"encrypted": "true"}
    assert suite.ep.config.encryption_backends_file
