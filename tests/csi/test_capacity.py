"""GetCapacity (from a cache our own changes invalidate) and the metrics endpoint."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from edge_proto.csi.v1 import csi_pb2
from tests.csi.conftest import NODE, CsiRig, MiB, code_of, create_request, mount_cap
from tests.rigs.loopdisks import LoopDiskFactory
from tests.rigs.lvm import VgFactory, unique_vg_name

Mode = csi_pb2.VolumeCapability.AccessMode


def capacity(csi: CsiRig, **kw: object) -> csi_pb2.GetCapacityResponse:
    return csi.controller.GetCapacity(csi_pb2.GetCapacityRequest(**kw))  # type: ignore[arg-type]


def vg_free(csi: CsiRig) -> int:
    vg = csi.lvm.get_vg(csi.vg.name)
    assert vg is not None
    return vg.free


def test_get_capacity_is_the_vg_free_space_and_follows_our_own_changes_at_once(
        csi: CsiRig) -> None:
    before = capacity(csi, volume_capabilities=[mount_cap()])
    assert before.available_capacity == vg_free(csi) > 0
    assert before.maximum_volume_size.value == before.available_capacity
    assert before.minimum_volume_size.value == 4 * MiB
    vol = csi.controller.CreateVolume(create_request("pvc-c", required=16 * MiB)).volume
    assert capacity(csi).available_capacity == before.available_capacity - 16 * MiB
    csi.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id))
    assert capacity(csi).available_capacity == before.available_capacity


def test_changes_made_by_others_show_after_the_periodic_refresh(
        csi_factory: Callable[..., CsiRig]) -> None:
    csi = csi_factory(capacity_refresh_seconds=0.2)
    before = capacity(csi).available_capacity
    csi.lvm.lvcreate(csi.vg.name, "outside", 8 * MiB)
    deadline = time.monotonic() + 20
    while capacity(csi).available_capacity != before - 8 * MiB:
        assert time.monotonic() < deadline, "the cache was never refreshed"
        time.sleep(0.1)


def test_capacity_for_another_node_or_an_unsupported_capability_is_zero(csi: CsiRig) -> None:
    key = f"topology.{csi.config.driver_name}/node"
    here = capacity(csi, accessible_topology=csi_pb2.Topology(segments={key: NODE}))
    assert here.available_capacity > 0
    elsewhere = capacity(csi, accessible_topology=csi_pb2.Topology(segments={key: "node-b"}))
    assert elsewhere.available_capacity == 0
    multi = capacity(csi, volume_capabilities=[mount_cap(mode=Mode.MULTI_NODE_MULTI_WRITER)])
    assert multi.available_capacity == 0


def test_capacity_of_a_vg_or_pool_that_is_not_here_is_zero(csi: CsiRig) -> None:
    assert capacity(csi, parameters={"vgName": "absent-vg"}).available_capacity == 0
    thin = capacity(csi, parameters={"lvmType": "thin", "thinPool": "nopool"})
    assert thin.available_capacity == 0


def test_striped_capacity_reports_the_largest_striped_volume(csi: CsiRig) -> None:
    csi.lvm.lvcreate(csi.vg.name, "skew", 20 * MiB)  # lands on one PV: stripes are limited
    csi.driver.cache.invalidate()  # type: ignore[union-attr]
    resp = capacity(csi, parameters={"lvmType": "striped"})
    pvs = sorted(pv.free for pv in csi.lvm.pvs() if pv.vg_name == csi.vg.name)
    assert resp.maximum_volume_size.value == 2 * pvs[0]
    assert resp.available_capacity == vg_free(csi)


def test_bad_parameters_are_invalid_argument(csi: CsiRig) -> None:
    assert code_of(lambda: capacity(csi, parameters={"lvmType": "raid5"})) == \
        grpc.StatusCode.INVALID_ARGUMENT


def test_metrics_expose_rpc_counts_and_vg_gauges(csi_factory: Callable[..., CsiRig]) -> None:
    csi = csi_factory(metrics_address="127.0.0.1:0")
    capacity(csi)
    code_of(lambda: csi.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest()))
    assert csi.driver is not None and csi.driver.metrics is not None
    port = csi.driver.metrics.port
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'csi_lvm_grpc_requests_total{code="OK",method="GetCapacity"} 1.0' in text
    assert 'csi_lvm_grpc_requests_total{code="INVALID_ARGUMENT",method="DeleteVolume"} 1.0' in text
    assert "csi_lvm_grpc_request_duration_seconds_bucket" in text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples[("csi_lvm_vg_free_bytes", (("vg", csi.vg.name),))] == vg_free(csi)
    vg = csi.lvm.get_vg(csi.vg.name)
    assert vg is not None
    assert samples[("csi_lvm_vg_size_bytes", (("vg", csi.vg.name),))] == vg.size
    ready = urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5)
    assert ready.status == 200


def test_a_volume_group_built_after_start_is_usable_and_published_at_once(
        csi_factory: Callable[..., CsiRig], vg_factory: VgFactory) -> None:
    # The node agent builds the VG after the driver has started (same DaemonSet): neither
    # CreateVolume nor GetCapacity may wait for the next periodic refresh (an hour here).
    name = unique_vg_name("late")
    csi = csi_factory(allowed_vgs=[name], capacity_refresh_seconds=3600.0,
                      vg_recheck_seconds=0.0)
    absent = capacity(csi, parameters={"vgName": name})
    assert absent.available_capacity == 0
    vg_factory(name=name)
    published = capacity(csi, parameters={"vgName": name})
    assert published.available_capacity > 0
    vol = csi.controller.CreateVolume(create_request("pvc-late", vgName=name)).volume
    assert vol.volume_id == f"{name}/pvc-late"


def test_requests_for_an_absent_vg_reread_lvm_at_most_once_per_recheck_period(
        csi_factory: Callable[..., CsiRig]) -> None:
    # No change watch: other LVM work on this host would (rightly) make the cache stale.
    csi = csi_factory(allowed_vgs=["absent-vg-x"], capacity_refresh_seconds=3600.0,
                      vg_recheck_seconds=3600.0, lvm_change_check_seconds=0.0,
                      block_events=False)
    cache = csi.driver.cache  # type: ignore[union-attr]
    reads: list[int] = []
    cache.on_refresh(lambda report: reads.append(1))
    for _ in range(20):
        assert capacity(csi, parameters={"vgName": "absent-vg-x"}).available_capacity == 0
    assert len(reads) <= 1


def _wait_for_capacity(csi: CsiRig, vg: str, wanted: Callable[[int], bool],
                       seconds: float) -> int | None:
    """GetCapacity of `vg` until wanted(capacity) (returns it), or None after `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        got = capacity(csi, parameters={"vgName": vg}).available_capacity
        if wanted(got):
            return got
        if time.monotonic() > deadline:
            return None
        time.sleep(0.1)


# The periodic refresh is an hour and a miss re-reads LVM at most once an hour in these
# tests: only the change watch (csi_lvm.lvmwatch) can make GetCapacity see the change.
SLOW = {"capacity_refresh_seconds": 3600.0, "vg_recheck_seconds": 3600.0}


def test_a_vg_built_or_changed_outside_the_driver_shows_in_get_capacity_within_seconds(
        csi_factory: Callable[..., CsiRig], vg_factory: VgFactory) -> None:
    name = unique_vg_name("agent")
    csi = csi_factory(allowed_vgs=[name], block_events=False, lvm_change_check_seconds=0.2,
                      **SLOW)
    assert capacity(csi, parameters={"vgName": name}).available_capacity == 0
    vg = vg_factory(name=name)  # what the node agent does: vgcreate, no event here
    size = _wait_for_capacity(csi, name, lambda c: c > 0, 10)
    assert size is not None, "a VG built after start never showed in GetCapacity"
    csi.lvm.lvcreate(vg.name, "outside", 8 * MiB)  # someone else takes space
    assert _wait_for_capacity(csi, name, lambda c: c == size - 8 * MiB, 10) is not None
    assert csi.driver is not None and csi.driver.change_watch is not None
    assert csi.driver.change_watch.noticed >= 2


def test_without_the_change_watch_the_same_vg_waits_for_the_periodic_refresh(
        csi_factory: Callable[..., CsiRig], vg_factory: VgFactory) -> None:
    # The control of the test above: it fails without the watch.
    name = unique_vg_name("agent")
    csi = csi_factory(allowed_vgs=[name], block_events=False, lvm_change_check_seconds=0.0,
                      **SLOW)
    assert capacity(csi, parameters={"vgName": name}).available_capacity == 0
    vg_factory(name=name)
    assert _wait_for_capacity(csi, name, lambda c: c > 0, 3) is None


def test_a_block_device_event_makes_get_capacity_reread_lvm(
        csi_factory: Callable[..., CsiRig], vg_factory: VgFactory,
        loop_disks: LoopDiskFactory) -> None:
    # Where LVM's metadata backups are not visible: a disk that appears (a uevent, the
    # kernel's here: no udev daemon) and is added to the VG moments later, as the agent does.
    vg = vg_factory()
    csi = csi_factory(allowed_vgs=[vg.name], lvm_change_paths=[], **SLOW)
    assert csi.driver is not None
    watch = csi.driver.change_watch
    assert watch is not None
    if watch.event_source is None:
        pytest.skip("no uevent netlink socket here (see the log): the stat path covers it")
    before = capacity(csi, parameters={"vgName": vg.name}).available_capacity
    assert before > 0
    (disk,) = loop_disks(1)  # the uevent
    csi.lvm.vgextend(vg.name, [disk.device])  # no event of its own without udev
    grown = _wait_for_capacity(csi, vg.name, lambda c: c > before, 10)
    assert grown is not None, "the new disk's uevent never made GetCapacity re-read LVM"
