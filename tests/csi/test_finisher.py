"""The background finisher (csi_lvm/finish.py) on real lvm2 (metadata only: this host has no
device-mapper; the wipe itself and CreateVolume's critical path run in tests/kernel).

What it must do: drop ``unfinished`` of every queued LV in ONE lvchange, only of the LVs it
was given (by UUID: a recreated namesake is another LV), keep and retry what failed (logged,
counted), let a running lvchange end on stop, and let a first use settle an entry itself.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from csi_lvm.config import CsiConfig
from csi_lvm.finish import Finisher
from csi_lvm.volume import TAG_UNFINISHED, LvRef
from edge_common.devmapper import lvm_lv_uuid
from edge_common.lvm import Lvm
from tests.csi.conftest import LvmGate
from tests.rigs.lvm import TestVg

MiB = 1 << 20


def counting(lvm: Lvm, log: Path) -> Lvm:
    """The same lvm, through a prefix that appends each call's sub-command to ``log``
    (the argument after the original prefix, here one word: ``lvm``)."""
    script = log.with_suffix(".sh")
    script.write_text(f'#!/bin/sh\necho "$2" >> "{log}"\nexec "$@"\n')
    return Lvm(replace(lvm.settings, command=("sh", str(script), *lvm.settings.command)))


def calls(log: Path) -> list[str]:
    return log.read_text().split() if log.exists() else []


def tagged(lvm: Lvm, vg: str, name: str) -> bool:
    lv = lvm.get_lv(vg, name)
    assert lv is not None
    return TAG_UNFINISHED in lv.tags


def new_lv(lvm: Lvm, vg: str, name: str) -> tuple[LvRef, str, int]:
    lvm.lvcreate(vg, name, 8 * MiB, tags=[TAG_UNFINISHED, "other"])
    lv = lvm.get_lv(vg, name)
    assert lv is not None
    return LvRef(vg, name), lv.uuid, lv.size


def samples(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels or None) or 0.0


@pytest.fixture
def vg(vg_factory: Callable[..., TestVg]) -> str:
    return vg_factory(size=256 * MiB).name


def test_one_lvchange_drops_the_tag_of_every_queued_lv_and_of_no_other(
        lvm: Lvm, vg: str, tmp_path: Path) -> None:
    log = tmp_path / "calls"
    registry = CollectorRegistry()
    fin = Finisher(counting(lvm, log), registry=registry)
    entries = [new_lv(lvm, vg, f"lv{i}") for i in range(5)]
    _, _, _ = new_lv(lvm, vg, "bystander")  # born unfinished, never queued
    for ref, uuid, size in entries:
        fin.queue(ref, uuid, size)
    assert samples(registry, "csi_lvm_finisher_queued") == 5
    assert fin.run_once()
    assert calls(log) == ["lvchange"], "five LVs must cost one LVM process"
    assert not any(tagged(lvm, vg, ref.lv) for ref, _, _ in entries)
    assert tagged(lvm, vg, "bystander"), "an LV that was not queued keeps its tag"
    lv = lvm.get_lv(vg, "lv0")
    assert lv is not None and "other" in lv.tags  # only `unfinished` goes
    assert not fin.queued(entries[0][1])
    assert samples(registry, "csi_lvm_finisher_volumes_total") == 5
    assert samples(registry, "csi_lvm_finisher_batches_total", result="ok") == 1
    assert samples(registry, "csi_lvm_finisher_queued") == 0


def test_a_namesake_recreated_after_the_wipe_is_another_lv_and_keeps_its_tag(
        lvm: Lvm, vg: str) -> None:
    fin = Finisher(lvm)
    ref, old_uuid, size = new_lv(lvm, vg, "pvc-a")
    fin.queue(ref, old_uuid, size)
    lvm.lvremove(vg, "pvc-a")  # DeleteVolume, then a CreateVolume of the same name, unwiped yet
    _, new_uuid, _ = new_lv(lvm, vg, "pvc-a")
    assert new_uuid != old_uuid
    assert fin.run_once()  # nothing matches the old UUID: done, the entry goes
    assert tagged(lvm, vg, "pvc-a"), "the finisher finished an LV it never saw wiped"
    assert not fin.queued(old_uuid)


def test_a_failed_batch_is_counted_kept_and_retried_and_stop_waits_for_a_running_one(
        lvm: Lvm, vg: str, gate: LvmGate, caplog: pytest.LogCaptureFixture) -> None:
    registry = CollectorRegistry()
    gated = Lvm(replace(lvm.settings, command=(*gate.command, *lvm.settings.command[1:])))
    fin = Finisher(gated, delay_seconds=0.0, retry_seconds=0.3, registry=registry)
    ref, uuid, size = new_lv(lvm, vg, "pvc-b")
    gate.arm("lvchange")
    fin.start()
    try:
        fin.queue(ref, uuid, size)
        gate.wait_reached()
        gate.drop()  # this lvchange fails (exit 5 without running)
        deadline = time.monotonic() + 30
        while not samples(registry, "csi_lvm_finisher_batches_total", result="failed"):
            assert time.monotonic() < deadline, "the failure was not counted"
            time.sleep(0.05)
        assert fin.queued(uuid), "a failed tag removal was dropped from the queue"
        assert tagged(lvm, vg, "pvc-b")
        assert "retrying later" in caplog.text
        while fin.queued(uuid):  # the retry (ungated) succeeds
            assert time.monotonic() < deadline, "never retried"
            time.sleep(0.05)
        assert not tagged(lvm, vg, "pvc-b")

        # stop() while a batch's lvchange is held: it is let run to its end, never killed
        ref2, uuid2, size2 = new_lv(lvm, vg, "pvc-c")
        gate.arm("lvchange")
        fin.queue(ref2, uuid2, size2)
        gate.wait_reached()
        stopper = threading.Thread(target=fin.stop)
        stopper.start()
        time.sleep(0.5)
        assert stopper.is_alive(), "stop() returned while its lvchange was still running"
        gate.release()
        stopper.join(30)
        assert not stopper.is_alive()
        assert not tagged(lvm, vg, "pvc-c") and not fin.queued(uuid2)
    finally:
        gate.release()
        fin.stop(timeout=30)


def test_a_burst_of_creates_costs_one_background_lvchange(
        lvm: Lvm, vg: str, tmp_path: Path) -> None:
    log = tmp_path / "calls"
    fin = Finisher(counting(lvm, log), delay_seconds=0.5)
    entries = [new_lv(lvm, vg, f"burst{i}") for i in range(6)]
    fin.start()
    try:
        for ref, uuid, size in entries:  # queued as the creates answer, a few ms apart
            fin.queue(ref, uuid, size)
        deadline = time.monotonic() + 30
        while any(fin.queued(uuid) for _, uuid, _ in entries):
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        fin.stop(timeout=30)
    assert calls(log) == ["lvchange"]
    assert not any(tagged(lvm, vg, ref.lv) for ref, _, _ in entries)


def test_a_first_use_settles_a_queued_lv_only_at_the_size_that_was_wiped(
        lvm: Lvm, vg: str, tmp_path: Path) -> None:
    log = tmp_path / "calls"
    fin = Finisher(counting(lvm, log))
    ref, uuid, size = new_lv(lvm, vg, "pvc-d")
    fin.queue(ref, uuid, size)
    # grown since its wipe (ControllerExpandVolume before the first publish): its new tail
    # was never wiped, so the caller must finish it itself
    assert not fin.settle(ref, uuid, size + 4 * MiB)
    assert fin.queued(uuid) and calls(log) == []
    assert not fin.settle(ref, "not-queued", size)
    assert fin.settle(ref, uuid, size)
    assert calls(log) == ["lvchange"] and not fin.queued(uuid)
    assert not tagged(lvm, vg, "pvc-d")


def test_bad_input_is_refused_before_any_lvm_process(lvm: Lvm, tmp_path: Path) -> None:
    log = tmp_path / "calls"
    counted = counting(lvm, log)
    for vgs, tag, uuids in ((["vg"], TAG_UNFINISHED, ['x" || lv_name="y']),
                            (["vg"], TAG_UNFINISHED, [""]),
                            (["-vg"], TAG_UNFINISHED, ["abc"]),
                            (["vg"], "a,b", ["abc"])):
        with pytest.raises(ValueError):
            counted.deltag_by_uuid(vgs, tag, uuids)
    counted.deltag_by_uuid(["vg"], TAG_UNFINISHED, [])  # nothing to do: no process
    assert calls(log) == []
    with pytest.raises(ValueError, match="finish_delay_seconds"):
        CsiConfig(node_id="n", finish_delay_seconds=-1)
    with pytest.raises(ValueError, match="finish_retry_seconds"):
        CsiConfig(node_id="n", finish_retry_seconds=0)


def test_lv_uuid_from_the_device_mapper_uuid() -> None:
    vg_part, lv_part = "V" * 32, "abcdefGHIJklmnOPQRstuvWXYZ012345"
    assert lvm_lv_uuid(f"LVM-{vg_part}{lv_part}") == "abcdef-GHIJ-klmn-OPQR-stuv-WXYZ-012345"
    assert lvm_lv_uuid(f"LVM-{vg_part}{lv_part}-tpool") == ""  # a layer, not the LV itself
    assert lvm_lv_uuid("CRYPT-LUKS2-abc") == ""
    assert lvm_lv_uuid("") == ""
