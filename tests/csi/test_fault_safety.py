"""Fault safety on the host (issue 11): every LV born unfinished, LVM changes never killed,
snapshot facts, the sweep's repair decisions. The same points on live LVs, with faults inside
LVM commands, are pinned in tests/kernel/test_csi_faults_kernel.py."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from csi_lvm.facts import snapshot_is_real
from csi_lvm.recovery import needs_refresh
from csi_lvm.volume import (
    KIND_SNAPSHOT,
    TAG_UNFINISHED,
    build_tags,
    read_tags,
)
from edge_common.lvm import LogicalVolume, LvAttr
from edge_proto.csi.v1 import csi_pb2
from tests.csi.conftest import CsiRig, LvmGate, MiB, code_of, create_request

DRIVER = "t.csi.edge.io"


def test_every_volume_is_born_unfinished_by_its_own_lvcreate_and_stays_listed(
    csi: CsiRig,
) -> None:
    vol = csi.controller.CreateVolume(create_request("pvc-born")).volume
    (lv,) = csi.our_lvs()
    assert TAG_UNFINISHED in lv.tags  # this kernel cannot wipe it: its first use will
    own = read_tags(lv.tags, csi.config.driver_name)
    assert own.unfinished and not own.pending
    # Unfinished is not pending: it may be handed out, so it is listed, returned by a retry,
    # and kept by the start-up sweep.
    listed = csi.controller.ListVolumes(csi_pb2.ListVolumesRequest()).entries
    assert [e.volume.volume_id for e in listed] == [vol.volume_id]
    assert csi.controller.CreateVolume(create_request("pvc-born")).volume.volume_id == \
        vol.volume_id
    csi.restart()
    assert [lv.name for lv in csi.our_lvs()] == ["pvc-born"]


def test_a_change_outliving_the_lvm_timeout_answers_aborted_keeps_the_volume_locked_and_converges(
    csi_factory: Callable[..., CsiRig], gate: LvmGate,
) -> None:
    rig = csi_factory(lvm_command=gate.command, lvm_timeout_seconds=1.0)
    vol = rig.controller.CreateVolume(create_request("pvc-slow", required=8 * MiB)).volume
    grow = csi_pb2.ControllerExpandVolumeRequest(
        volume_id=vol.volume_id, capacity_range=csi_pb2.CapacityRange(required_bytes=24 * MiB))
    gate.arm("lvextend")
    errors: list[Any] = []

    def first() -> None:
        try:
            rig.controller.ControllerExpandVolume(grow, timeout=60)
        except grpc.RpcError as exc:
            errors.append(exc)

    thread = threading.Thread(target=first)
    thread.start()
    held = gate.wait_reached()
    thread.join(30)
    assert [e.code() for e in errors] == [grpc.StatusCode.ABORTED]
    assert "never killed" in errors[0].details()
    assert Path(f"/proc/{held}").exists(), "the runner killed the state-changing lvextend"
    # While it runs, the volume stays locked: the CO's retry is ABORTED, nothing races it.
    assert code_of(lambda: rig.controller.ControllerExpandVolume(grow, timeout=60)) == \
        grpc.StatusCode.ABORTED
    assert code_of(lambda: rig.controller.DeleteVolume(
        csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id), timeout=60)) == \
        grpc.StatusCode.ABORTED
    gate.release()
    deadline = time.monotonic() + 30
    while True:  # converges once the background lvextend ended
        try:
            reply = rig.controller.ControllerExpandVolume(grow, timeout=60)
            break
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.ABORTED and time.monotonic() < deadline
            time.sleep(0.2)
    assert reply.capacity_bytes == 24 * MiB
    lv = rig.lvm.get_lv(rig.vg.name, "pvc-slow")
    assert lv is not None and lv.size == 24 * MiB


# ---------------------------------------------------------------------------- snapshot facts


def record(attr: str, *, origin: str | None = None, tags: list[str] | None = None,
           name: str = "snap-x", vg: str = "vg0") -> LogicalVolume:
    return LogicalVolume(name=name, vg_name=vg, uuid="u", size=8 * MiB, attr=LvAttr.parse(attr),
                         tags=tuple(tags or ()), origin=origin)


def snapshot_tags(unfinished: bool = False, source: str = "volume:vg0/pvc-a") -> list[str]:
    return build_tags(DRIVER, kind=KIND_SNAPSHOT, csi_name="snap-x", created=1,
                      size=8 * MiB, source=source, unfinished=unfinished)


@pytest.mark.parametrize("attr,origin,unfinished,real", [
    ("swi-a-s---", "pvc-a", False, True),    # thick snapshot of the source
    ("swi-a-s---", "pvc-a", True, True),     # complete, only the finishing deltag missing
    ("-wi-a-----", None, True, False),       # thick lvcreate killed between its two commits
    ("-wi-a-----", None, False, False),      # a plain LV is never a snapshot
    ("swi-a-s---", "pvc-b", False, False),   # a snapshot of another volume
    ("Vwi---tz-k", "pvc-a", True, True),     # thin snapshot of the source
    ("Vwi---tz-k", None, False, True),       # thin snapshot whose source was deleted later
    ("Vwi---tz-k", None, True, False),       # ... but never verified: not served
    ("Vwi---tz-k", "pvc-b", False, False),
])
def test_a_snapshot_is_served_only_when_lvm_facts_agree_with_its_tags(
    attr: str, origin: str | None, unfinished: bool, real: bool,
) -> None:
    lv = record(attr, origin=origin, tags=snapshot_tags(unfinished))
    assert snapshot_is_real(lv, read_tags(lv.tags, DRIVER)) is real


def test_a_snapshot_in_another_vg_than_its_source_is_not_real() -> None:
    lv = record("swi-a-s---", origin="pvc-a", tags=snapshot_tags(), vg="vg1")
    assert not snapshot_is_real(lv, read_tags(lv.tags, DRIVER))


# ---------------------------------------------------------------------------- the sweep


@pytest.mark.parametrize("attr,why", [
    ("-wi-s-----", "suspended"),
    ("-wi-d-----", "without a table"),
    ("-wi-i-----", "inactive table"),
    ("-wi-a-----", None),
    ("-wi-------", None),
])
def test_the_sweep_refreshes_lvs_left_suspended_or_without_their_live_table(
    attr: str, why: str | None,
) -> None:
    found = needs_refresh(record(attr, name="pvc-a"))
    assert (found is None) if why is None else (found is not None and why in found)


def test_sweep_repairs_become_warning_events_on_the_node(fake_kube: Any, tmp_path: Path) -> None:
    from csi_lvm.config import CsiConfig
    from csi_lvm.server import Driver

    kubeconfig = fake_kube.write_kubeconfig(tmp_path / "kubeconfig")
    driver = Driver(CsiConfig(node_id="edge-node-9", kube_events=True,
                              kubeconfig=str(kubeconfig)))
    driver.events.event("VolumeRepaired", "volume vg0/pvc-a was left suspended; repaired at "
                        "start-up", warning=True)  # the sink the start-up sweep reports to
    (event,) = fake_kube.events(reason="VolumeRepaired", involved_name="edge-node-9")
    assert event["type"] == "Warning" and event["source"]["component"] == "csi-lvm"
    assert "left suspended" in event["message"]


@pytest.mark.parametrize("suspended,live,inactive,why", [
    (True, True, True, "suspended"),       # lvextend killed between suspend and resume
    (True, True, False, "suspended"),
    (False, True, True, "inactive table"),  # killed after preloading the new table
    (False, False, False, "without a table"),
    (False, True, False, None),
])
def test_the_kernel_decides_what_the_sweep_refreshes(
    suspended: bool, live: bool, inactive: bool, why: str | None,
) -> None:
    from edge_common.devmapper import DmInfo

    info = DmInfo("vg0-pvc--a", 0, 0, suspended, live, inactive)
    found = needs_refresh(record("-wi-a-----", name="pvc-a"), info)  # lvs may say "active"
    assert (found is None) if why is None else (found is not None and why in found)
