"""The Identity service: plugin info, capabilities and a Probe that tells the truth."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from csi_lvm.config import Mode
from edge_common.version import VERSION
from edge_proto.csi.v1 import csi_pb2
from tests.csi.conftest import CsiRig

Service = csi_pb2.PluginCapability.Service
Expansion = csi_pb2.PluginCapability.VolumeExpansion


def test_plugin_info_gives_the_configured_name_and_the_project_version(csi: CsiRig) -> None:
    info = csi.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest())
    assert info.name == csi.config.driver_name
    assert info.vendor_version == VERSION


def test_plugin_capabilities_offer_controller_topology_and_both_expansions(csi: CsiRig) -> None:
    caps = csi.identity.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest()).capabilities
    services = {c.service.type for c in caps if c.HasField("service")}
    expansions = {c.volume_expansion.type for c in caps if c.HasField("volume_expansion")}
    assert services == {Service.CONTROLLER_SERVICE, Service.VOLUME_ACCESSIBILITY_CONSTRAINTS}
    assert expansions == {Expansion.ONLINE, Expansion.OFFLINE}


def test_probe_is_ready_when_lvm_answers_and_the_vg_exists(csi: CsiRig) -> None:
    assert csi.identity.Probe(csi_pb2.ProbeRequest()).ready.value is True


def test_probe_is_not_ready_when_a_configured_vg_is_missing(
        csi_factory: Callable[..., CsiRig]) -> None:
    csi = csi_factory(start=False)
    csi.start(allowed_vgs=[csi.vg.name + "-missing"])
    resp = csi.identity.Probe(csi_pb2.ProbeRequest())
    assert resp.HasField("ready") and resp.ready.value is False


def test_probe_is_not_ready_when_lvm_does_not_answer(csi_factory: Callable[..., CsiRig]) -> None:
    csi = csi_factory(lvm_command=["/nonexistent/lvm"])
    assert csi.identity.Probe(csi_pb2.ProbeRequest()).ready.value is False


def test_a_controller_only_instance_is_ready_without_lvm(
        csi_factory: Callable[..., CsiRig]) -> None:
    csi = csi_factory(mode=Mode.CONTROLLER, node_id="", lvm_command=["/nonexistent/lvm"])
    assert csi.identity.Probe(csi_pb2.ProbeRequest()).ready.value is True


def test_probe_answers_from_a_recent_lvm_read_without_an_lvm_process(
        csi_factory: Callable[..., CsiRig], tmp_path: Path) -> None:
    # Probe must stay prompt on a node busy with copies: LVM answered for the capacity cache
    # within a refresh period, so Probe spawns nothing; a missing VG is still asked of LVM.
    log = tmp_path / "lvm-calls"
    wrapper = tmp_path / "lvm"
    wrapper.write_text(f'#!/bin/sh\necho "$1" >> {log}\nexec lvm "$@"\n')
    wrapper.chmod(0o755)
    csi = csi_factory(lvm_command=[str(wrapper)], capacity_refresh_seconds=3600.0)
    log.unlink(missing_ok=True)
    for _ in range(5):
        assert csi.identity.Probe(csi_pb2.ProbeRequest()).ready.value is True
    assert not log.exists()
    lvm_gone = csi_factory(lvm_command=[str(wrapper)], capacity_refresh_seconds=3600.0,
                           allowed_vgs=[csi.vg.name + "-missing"])
    assert lvm_gone.identity.Probe(csi_pb2.ProbeRequest()).ready.value is False
    assert "vgs" in log.read_text().split()
