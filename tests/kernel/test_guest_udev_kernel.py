"""LVM in the guest synchronises with udev, and a pod's LVM must enter the host's IPC namespace
(issue 11, point 5).

The guest runs kernel_guest/udevd.py (a udev stand-in completing device-mapper cookies, as
95-dm-notify.rules does) and lvm.conf has ``udev_sync = 1``: every activation waits for its
uevent to be handled. A pod that enters only the host's mount namespace makes its cookie
semaphore in its own IPC namespace, where udev can never release it: the activation hangs
with the VG lock held. deploy/ runs LVM through ``nsenter --mount --ipc``: that one works.
In the guest the "host" is this test process (pid 1 is the initramfs' init, chrooted away from
the real root, so the prefix adds --root/--wd to land where this process lives).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_common.commands import CommandTimeout, run
from edge_common.devmapper import dm_info, dm_name
from edge_common.lvm import Lvm
from tests.kernel.faults import host_namespaces
from tests.rigs.lvm import unique_vg_name

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(600)]

MiB = 1 << 20
CONTROL = Path("/run/udev/control")


POD = ["unshare", "--ipc", "--"]  # a container: its own IPC namespace


@pytest.fixture
def vg_with_lv(kernel_disks: list[str], lvm: Lvm) -> Iterator[tuple[str, str]]:
    vg = unique_vg_name("udev")
    lvm.vgcreate(vg, kernel_disks[:1])
    lvm.lvcreate(vg, "lv0", 8 * MiB, activate=False)
    yield vg, "lv0"
    lvm.command("vgremove", "--yes", "--force", "--", vg)
    lvm.command("pvremove", "--yes", "--", kernel_disks[0])


def test_the_guest_lvm_synchronises_with_a_running_udev(lvm: Lvm) -> None:
    assert CONTROL.exists(), "the udev stand-in is not running"
    shown = lvm.command("config", "--typeconfig", "current", "activation/udev_sync")
    assert shown.stdout_text.strip() == "udev_sync=1"


def test_lvm_in_a_pod_needs_the_hosts_ipc_namespace_as_well_as_its_mount_namespace(
    vg_with_lv: tuple[str, str], lvm: Lvm,
) -> None:
    vg, lv = vg_with_lv
    target = f"{vg}/{lv}"
    deploy_prefix = [*POD, *host_namespaces("mount", "ipc"), "lvm"]
    run([*deploy_prefix, "lvchange", "--activate", "y", "--", target], timeout=240)
    info = dm_info(dm_name(vg, lv))
    assert info is not None and info.live_table and not info.suspended
    run([*deploy_prefix, "lvchange", "--activate", "n", "--", target], timeout=240)
    assert dm_info(dm_name(vg, lv)) is None

    # The bug class: only the mount namespace. The cookie lives where udev cannot see it.
    mount_only = [*POD, *host_namespaces("mount"), "lvm"]
    with pytest.raises(CommandTimeout):
        run([*mount_only, "lvchange", "--activate", "y", "--", target], timeout=60)
    # (killed here; the LV is left active, the namespace and its semaphore are gone)
    lvm.deactivate(vg, lv)
