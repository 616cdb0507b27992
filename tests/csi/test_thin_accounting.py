"""Thin pool accounting (TopoLVM's rule) and pool thresholds, from LVM report records.

This kernel has no device-mapper, so no thin pool can exist here: these tests feed the
accounting the records LVM reports for pools and thin volumes (the real-kernel suite,
tests/kernel/test_csi_controller_kernel.py, fills a real pool by writes).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from prometheus_client import CollectorRegistry

from csi_lvm.capacity import (
    LvmCollector,
    PoolThresholds,
    pool_space,
    thin_refusal,
)
from csi_lvm.config import CsiConfig
from csi_lvm.controller import lv_condition
from csi_lvm.poolwatch import PoolWatch, make_sink
from csi_lvm.volume import TAG_OVERPROVISION
from edge_common.events import LogEvents
from edge_common.lvm import LogicalVolume, LvmReport
from edge_common.lvm.attr import LvAttr

MiB = 1 << 20
VG = "vg0"
T = PoolThresholds(data_percent=90.0, metadata_percent=80.0)


def pool(size: int = 64 * MiB, data: float = 10.0, meta: float = 5.0, health: str = "-",
         tags: tuple[str, ...] = ()) -> LogicalVolume:
    return LogicalVolume("pool0", VG, "u-pool", size, LvAttr.parse(f"twi-aotz{health}-"),
                         tags=tags, data_percent=data, metadata_percent=meta,
                         segtype="thin-pool")


def thin(name: str, size: int, pool_name: str = "pool0") -> LogicalVolume:
    return LogicalVolume(name, VG, f"u-{name}", size, LvAttr.parse("Vwi-a-tz--"),
                         pool_lv=pool_name, data_percent=0.0, segtype="thin")


def report(*lvs: LogicalVolume) -> LvmReport:
    return LvmReport(lvs=tuple(lvs))


def test_room_is_pool_size_times_ratio_minus_the_virtual_sizes_handed_out() -> None:
    r = report(pool(tags=(TAG_OVERPROVISION + "2",)), thin("a", 64 * MiB), thin("b", 36 * MiB),
               thin("elsewhere", 512 * MiB, pool_name="other"))
    space = pool_space(r, VG, "pool0", 1.0, T)
    assert space is not None
    assert (space.capacity, space.virtual_used, space.available) == \
        (128 * MiB, 100 * MiB, 28 * MiB)
    assert space.maximum == 28 * MiB
    assert thin_refusal(r, VG, "pool0", 28 * MiB, "", 1.0, T) is None
    refusal = thin_refusal(r, VG, "pool0", 32 * MiB, "", 1.0, T)
    assert refusal is not None and "room for 29360128 more bytes" in refusal


def test_a_volume_grown_or_re_created_counts_once() -> None:
    # Today's bug: a 4 GiB thin volume in a 64 MiB pool. Growing "a" to 64 MiB fits (it
    # already holds 36), to 4 GiB does not.
    r = report(pool(), thin("a", 36 * MiB))
    assert thin_refusal(r, VG, "pool0", 64 * MiB, "a", 1.0, T) is None
    assert thin_refusal(r, VG, "pool0", 4096 * MiB, "a", 1.0, T) is not None
    assert thin_refusal(r, VG, "pool0", 64 * MiB, "b", 1.0, T) is not None


def test_the_ratio_the_pool_carries_wins_over_the_configured_default() -> None:
    tagged = report(pool(tags=(TAG_OVERPROVISION + "1.5",)))
    space = pool_space(tagged, VG, "pool0", 4.0, T)
    assert space is not None and space.ratio == 1.5 and space.capacity == 96 * MiB
    untagged = pool_space(report(pool()), VG, "pool0", 4.0, T)
    assert untagged is not None and untagged.ratio == 4.0
    for bad in ("zero", "0", "-2", "inf", "nan"):
        odd = pool_space(report(pool(tags=(TAG_OVERPROVISION + bad,))), VG, "pool0", 3.0, T)
        assert odd is not None and odd.ratio == 3.0, bad


def test_a_pool_past_a_threshold_or_out_of_space_has_no_room_at_all() -> None:
    for full, why in ((pool(data=90.0), "data 90% used (threshold 90%)"),
                      (pool(meta=85.5), "metadata 85.5% used (threshold 80%)"),
                      (pool(data=100.0, health="D"), "out of data space")):
        space = pool_space(report(full), VG, "pool0", 10.0, T)
        assert space is not None and space.full and space.available == 0
        refusal = space.refusal(1)
        assert refusal is not None and why in refusal and "is full" in refusal
    assert not pool_space(report(pool(data=89.9, meta=79.9)), VG, "pool0", 1.0, T).full  # type: ignore[union-attr]


def test_every_thin_volume_of_a_full_pool_is_abnormal_and_names_the_pool() -> None:
    vol = thin("a", 32 * MiB)
    assert lv_condition(vol, pool(), T) == (False, "volume is healthy")
    abnormal, message = lv_condition(vol, pool(data=95.0), T)
    assert abnormal and "thin pool vg0/pool0" in message and "data 95% used" in message
    abnormal, message = lv_condition(vol, pool(data=100.0, health="D"), T)
    assert abnormal and "out of data space" in message
    # Thresholds are configurable: the same pool is fine under a higher one.
    assert not lv_condition(vol, pool(data=95.0), replace(T, data_percent=99.0))[0]


def test_a_name_that_is_no_thin_pool_has_no_room() -> None:
    r = report(thin("a", MiB))
    assert pool_space(r, VG, "a", 1.0, T) is None
    assert pool_space(r, VG, "pool0", 1.0, T) is None
    assert thin_refusal(r, VG, "pool0", MiB, "", 1.0, T) == "thin pool vg0/pool0 does not exist"


class _Cache:
    default_ratio = 2.0
    thresholds = T

    def __init__(self, r: LvmReport) -> None:
        self._r = r

    def cached(self) -> LvmReport:
        return self._r


def test_metrics_show_the_room_and_raise_the_threshold_gauge() -> None:
    registry = CollectorRegistry()
    r = report(pool(data=95.0), thin("a", 40 * MiB))
    registry.register(LvmCollector(_Cache(r)))  # type: ignore[arg-type]
    labels = {"vg": VG, "pool": "pool0"}
    assert registry.get_sample_value("csi_lvm_thin_pool_over_threshold", labels) == 1
    assert registry.get_sample_value("csi_lvm_thin_pool_available_bytes", labels) == 0
    assert registry.get_sample_value("csi_lvm_thin_pool_virtual_bytes", labels) == 40 * MiB
    healthy = CollectorRegistry()
    healthy.register(LvmCollector(_Cache(report(pool(), thin("a", 40 * MiB)))))  # type: ignore[arg-type]
    assert healthy.get_sample_value("csi_lvm_thin_pool_over_threshold", labels) == 0
    assert healthy.get_sample_value("csi_lvm_thin_pool_available_bytes", labels) == 88 * MiB


def test_a_pool_crossing_its_threshold_gives_one_warning_event_and_one_when_back() -> None:
    sink = LogEvents()
    watch = PoolWatch(sink, 1.0, T, "node-a")
    watch(report(pool(data=50.0)))
    assert sink.events == []
    watch(report(pool(data=91.0)))
    watch(report(pool(data=92.0)))  # still full: no second event
    assert [(reason, warning) for reason, _msg, warning in sink.events] == \
        [("ThinPoolOverThreshold", True)]
    assert "vg0/pool0" in sink.events[0][1] and "node-a" in sink.events[0][1]
    watch(report(pool(data=40.0)))
    assert [(reason, warning) for reason, _msg, warning in sink.events] == \
        [("ThinPoolOverThreshold", True), ("ThinPoolBelowThreshold", False)]


def test_outside_a_cluster_events_go_to_the_log(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    config = CsiConfig(node_id="n")
    assert isinstance(make_sink(config), LogEvents)
