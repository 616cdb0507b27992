"""Crash safety: `csi-lvm` as a process, SIGKILLed in the middle of an operation, restarted;
the caller's retry converges with no orphan LV and no lost volume.

The driver's lvm command is tests/csi/lvm_gate.py, which holds one chosen lvm call. While it
is held the driver is killed; then the held call either never happens (drop: lvm was killed
before it committed) or completes after the driver died (release: lvm committed, the answer
was lost).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from csi_lvm.volume import read_tags
from edge_common.server import unix_channel
from edge_proto.csi.v1 import csi_pb2, csi_pb2_grpc
from tests.csi.conftest import (
    NODE,
    CsiRig,
    LvmGate,
    MiB,
    block_cap,
    create_request,
)


class DriverProcess:
    def __init__(self, csi: CsiRig, gate: LvmGate, log: Path) -> None:
        self.csi = csi
        self.gate = gate
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.channel: grpc.Channel | None = None

    def start(self) -> None:
        cfg = self.csi.config
        argv = [sys.executable, "-m", "csi_lvm", "--endpoint", cfg.endpoint,
                "--node-id", NODE, "--driver-name", cfg.driver_name,
                "--default-vg", self.csi.vg.name, "--lvm-command", ",".join(self.gate.command),
                "--log-level", "DEBUG"]
        env = {**os.environ, **self.gate.env}
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=out, env=env)
        self.channel = unix_channel(cfg.endpoint)
        try:
            grpc.channel_ready_future(self.channel).result(timeout=30)
        except grpc.FutureTimeoutError:
            raise AssertionError("driver did not start:\n" + self.log.read_text()) from None

    @property
    def controller(self) -> csi_pb2_grpc.ControllerStub:
        assert self.channel is not None
        return csi_pb2_grpc.ControllerStub(self.channel)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        if self.channel is not None:
            self.channel.close()
            self.channel = None

    def stop(self) -> None:
        if self.channel is not None:
            self.channel.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def proc(csi_factory: Callable[..., CsiRig], gate: LvmGate,
         tmp_path: Path) -> Iterator[DriverProcess]:
    csi = csi_factory(start=False)
    driver = DriverProcess(csi, gate, tmp_path / "driver.log")
    driver.start()
    yield driver
    driver.stop()


def call_in_background(fn: Callable[[], Any]) -> threading.Thread:
    def run() -> None:
        try:
            fn()
        except grpc.RpcError:
            pass  # the driver dies under it: UNAVAILABLE

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def kill_at(proc: DriverProcess, gate: LvmGate, words: tuple[str, ...], call: Callable[[], Any],
            then: str) -> None:
    """Arm the gate, start the call, SIGKILL the driver while the lvm call is held, then let
    the held lvm call run (`release`) or never happen (`drop`), and restart the driver."""
    gate.arm(*words)
    thread = call_in_background(call)
    held_pid = gate.wait_reached()
    proc.kill()
    getattr(gate, then)()
    # the held lvm process outlives the driver; wait for it before restarting
    deadline_thread_join(thread)
    wait_gone(held_pid)
    proc.start()


def deadline_thread_join(thread: threading.Thread) -> None:
    thread.join(timeout=30)
    assert not thread.is_alive()


def wait_gone(pid: int) -> None:
    deadline = time.monotonic() + 60
    while Path(f"/proc/{pid}").exists():
        stat = Path(f"/proc/{pid}/stat").read_text() if Path(f"/proc/{pid}/stat").exists() else ""
        if stat.split(") ")[-1].startswith("Z"):
            return
        assert time.monotonic() < deadline, "the held lvm call never finished"
        time.sleep(0.05)


def ours(proc: DriverProcess) -> dict[str, Any]:
    return {lv.name: read_tags(lv.tags, proc.csi.config.driver_name)
            for lv in proc.csi.our_lvs()}


@pytest.mark.parametrize("then", ["drop", "release"])
def test_sigkill_during_create_then_retry_gives_exactly_one_volume(
        proc: DriverProcess, gate: LvmGate, then: str) -> None:
    req = create_request("pvc-crash", required=8 * MiB)
    kill_at(proc, gate, ("lvcreate",), lambda: proc.controller.CreateVolume(req), then)
    assert set(ours(proc)) <= {"pvc-crash"}
    vol = proc.controller.CreateVolume(req).volume
    assert vol.capacity_bytes == 8 * MiB
    state = ours(proc)
    assert list(state) == ["pvc-crash"] and not state["pvc-crash"].pending
    listed = proc.controller.ListVolumes(csi_pb2.ListVolumesRequest()).entries
    assert [e.volume.volume_id for e in listed] == [vol.volume_id]


def test_sigkill_before_a_pending_volume_is_finished_leaves_no_orphan(
        proc: DriverProcess, gate: LvmGate) -> None:
    req = create_request("pvc-blk", required=8 * MiB, caps=[block_cap()])
    kill_at(proc, gate, ("lvchange", "--deltag"),
            lambda: proc.controller.CreateVolume(req), "drop")
    # the restart swept the unfinished LV: it was never handed out
    assert ours(proc) == {}
    assert proc.controller.ListVolumes(csi_pb2.ListVolumesRequest()).entries == []
    vol = proc.controller.CreateVolume(req).volume
    assert vol.volume_id.endswith("/pvc-blk")
    assert [(n, o.pending) for n, o in ours(proc).items()] == [("pvc-blk", False)]


@pytest.mark.parametrize("then", ["drop", "release"])
def test_sigkill_during_delete_then_retry_removes_the_volume(
        proc: DriverProcess, gate: LvmGate, then: str) -> None:
    vol = proc.controller.CreateVolume(create_request("pvc-del", required=8 * MiB)).volume
    req = csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id)
    kill_at(proc, gate, ("lvremove",), lambda: proc.controller.DeleteVolume(req), then)
    proc.controller.DeleteVolume(req)
    assert ours(proc) == {}


@pytest.mark.parametrize("then", ["drop", "release"])
def test_sigkill_during_expand_then_retry_reaches_the_size(
        proc: DriverProcess, gate: LvmGate, then: str) -> None:
    vol = proc.controller.CreateVolume(create_request("pvc-exp", required=8 * MiB)).volume
    req = csi_pb2.ControllerExpandVolumeRequest(
        volume_id=vol.volume_id, capacity_range=csi_pb2.CapacityRange(required_bytes=24 * MiB))
    kill_at(proc, gate, ("lvextend",), lambda: proc.controller.ControllerExpandVolume(req), then)
    assert proc.controller.ControllerExpandVolume(req).capacity_bytes == 24 * MiB
    lv = proc.csi.lvm.get_lv(proc.csi.vg.name, "pvc-exp")
    assert lv is not None and lv.size == 24 * MiB
    assert list(ours(proc)) == ["pvc-exp"]
