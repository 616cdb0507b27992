"""CSI driver rigs: a real csi-lvm on a unix socket over a real VG on loop disks.

``csi``       a started in-process driver (mode all) on a 2-PV VG shared by the test module
              (emptied before and after each test); ``csi.controller``,
              ``csi.identity`` are gRPC stubs over the socket; ``csi.restart(**overrides)``.
``csi_factory(**config overrides)`` for more (or differently configured) drivers.
``gate``      an LvmGate: hold one chosen lvm call (concurrency and crash tests).
Every driver gets a unique driver name (so its ownership tag is unique on this machine).
"""

from __future__ import annotations

import secrets
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
import pytest

from csi_lvm.config import CsiConfig, Mode
from csi_lvm.server import Driver
from edge_common.loopdisk import loop_disks
from edge_common.lvm import Lvm
from edge_common.server import unix_channel
from edge_proto.csi.v1 import csi_pb2, csi_pb2_grpc
from tests.rigs.lvm import TestVg, remove_vg_and_pvs, unique_vg_name

MiB = 1 << 20
GATE = Path(__file__).resolve().parent / "lvm_gate.py"
NODE = "node-a"


def driver_name() -> str:
    return f"t{secrets.token_hex(4)}.csi.edge.io"


def mount_cap(fs_type: str = "", mode: int = 1, flags: tuple[str, ...] = ()) -> Any:
    return csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(fs_type=fs_type, mount_flags=list(flags)),
        access_mode=csi_pb2.VolumeCapability.AccessMode(mode=mode))  # type: ignore[arg-type]


def block_cap(mode: int = 1) -> Any:
    return csi_pb2.VolumeCapability(
        block=csi_pb2.VolumeCapability.BlockVolume(),
        access_mode=csi_pb2.VolumeCapability.AccessMode(mode=mode))  # type: ignore[arg-type]


def create_request(name: str, required: int = 8 * MiB, limit: int = 0,
                   caps: list[Any] | None = None, **params: str) -> Any:
    return csi_pb2.CreateVolumeRequest(
        name=name, capacity_range=csi_pb2.CapacityRange(required_bytes=required,
                                                        limit_bytes=limit),
        volume_capabilities=caps if caps is not None else [mount_cap()], parameters=params)


def code_of(call: Callable[[], Any]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()  # type: ignore[no-any-return]


@dataclass
class CsiRig:
    vg: TestVg
    lvm: Lvm
    config: CsiConfig
    tmp: Path
    driver: Driver | None = None
    channel: grpc.Channel | None = None
    _extra: list[Driver] = field(default_factory=list)

    @property
    def controller(self) -> csi_pb2_grpc.ControllerStub:
        assert self.channel is not None
        return csi_pb2_grpc.ControllerStub(self.channel)

    @property
    def identity(self) -> csi_pb2_grpc.IdentityStub:
        assert self.channel is not None
        return csi_pb2_grpc.IdentityStub(self.channel)

    @property
    def owner_tag(self) -> str:
        return f"csi-lvm.edge.io/owner={self.config.driver_name}"

    def start(self, **overrides: Any) -> None:
        if overrides:
            self.config = replace(self.config, **overrides)
        self.driver = Driver(self.config)
        self.driver.start()
        self.channel = unix_channel(self.config.endpoint)
        grpc.channel_ready_future(self.channel).result(timeout=10)

    def stop(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self.driver is not None:
            self.driver.stop(grace=1)
            self.driver = None

    def restart(self, **overrides: Any) -> None:
        self.stop()
        self.start(**overrides)

    def reset(self) -> None:
        """Remove every LV of the VG (the test's own and foreign ones)."""
        if self.lvm.lvs(self.vg.name):
            self.lvm.command("lvremove", "--yes", "--", self.vg.name)
        if self.driver is not None and self.driver.cache is not None:
            self.driver.cache.invalidate()
        assert self.driver is None or self.driver.locks.busy() == []

    def our_lvs(self) -> list[Any]:
        return [lv for lv in self.lvm.lvs(self.vg.name) if self.owner_tag in lv.tags]


def make_config(vg: str, tmp: Path, **overrides: Any) -> CsiConfig:
    values: dict[str, Any] = {
        "endpoint": f"unix://{tmp}/csi-{secrets.token_hex(3)}.sock",
        "node_id": NODE,
        "driver_name": driver_name(),
        "mode": Mode.ALL,
        "default_vg": vg,
        "lvm_timeout_seconds": 60.0,
        "capacity_refresh_seconds": 30.0,
        # Copies and full wipes answer within the call unless a test is about background jobs
        # (an emulated CPU on a busy host makes even small ones slow).
        "data_job_wait_seconds": 300.0,
    }
    values.update(overrides)
    return CsiConfig(**values)


@pytest.fixture
def csi_factory(csi: CsiRig) -> Iterator[Callable[..., CsiRig]]:
    """More drivers, differently configured, on the module's VG (emptied around the test)."""
    rigs: list[CsiRig] = []

    def make(start: bool = True, **overrides: Any) -> CsiRig:
        sock_dir = Path(f"/tmp/csi-{secrets.token_hex(4)}")  # short: unix socket path limit
        sock_dir.mkdir()
        rig = CsiRig(csi.vg, csi.lvm, make_config(csi.vg.name, sock_dir, **overrides), sock_dir)
        rigs.append(rig)
        if start:
            rig.start()
        return rig

    yield make
    for rig in rigs:
        rig.stop()
        for p in rig.tmp.iterdir():
            p.unlink()
        rig.tmp.rmdir()


@pytest.fixture(scope="module")
def shared_csi(tmp_path_factory: pytest.TempPathFactory, lvm: Lvm) -> Iterator[CsiRig]:
    """One VG and one driver for a whole test module (each test starts with an empty VG)."""
    directory = tmp_path_factory.mktemp("csi-shared")
    with loop_disks(2, 128 * MiB, directory) as disks:
        vg = TestVg(unique_vg_name("csi"), disks)
        lvm.vgcreate(vg.name, vg.devices)
        sock_dir = Path(f"/tmp/csi-{secrets.token_hex(4)}")
        sock_dir.mkdir()
        rig = CsiRig(vg, lvm, make_config(vg.name, sock_dir), sock_dir)
        try:
            rig.start()
            yield rig
        finally:
            rig.stop()
            for p in sock_dir.iterdir():
                p.unlink()
            sock_dir.rmdir()
            remove_vg_and_pvs(lvm, vg.name, vg.devices)


@pytest.fixture
def csi(shared_csi: CsiRig) -> Iterator[CsiRig]:
    """The module's driver, its VG emptied before and after the test."""
    shared_csi.reset()
    yield shared_csi
    shared_csi.reset()


class LvmGate:
    """Hold one lvm call: arm("lvcreate"), wait_reached(), then release() or drop()."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)

    @property
    def command(self) -> list[str]:
        return [sys.executable, str(GATE)]

    @property
    def env(self) -> dict[str, str]:
        return {"CSI_GATE_DIR": str(self.dir)}

    def arm(self, *words: str) -> None:
        for name in ("reached", "release", "drop"):
            (self.dir / name).unlink(missing_ok=True)
        (self.dir / "armed").write_text(" ".join(words))

    def wait_reached(self, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while not (self.dir / "reached").exists():
            if time.monotonic() > deadline:
                raise AssertionError("the gated lvm call was never made")
            time.sleep(0.02)
        return int((self.dir / "reached").read_text())

    def release(self) -> None:
        (self.dir / "release").write_text("")

    def drop(self) -> None:
        (self.dir / "drop").write_text("")


@pytest.fixture
def gate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LvmGate]:
    g = LvmGate(tmp_path / "gate")
    monkeypatch.setenv("CSI_GATE_DIR", str(g.dir))
    yield g
    g.release()  # never leave a call hanging
