"""The CSI Identity service: who we are, what we offer, and whether we are ready."""

from __future__ import annotations

import logging

import grpc
from google.protobuf.wrappers_pb2 import BoolValue

from csi_lvm.capacity import CapacityCache
from csi_lvm.config import CsiConfig, Mode
from edge_common.lvm import Lvm, LvmError
from edge_common.version import VERSION
from edge_proto.csi.v1 import csi_pb2, csi_pb2_grpc

log = logging.getLogger(__name__)

Service = csi_pb2.PluginCapability.Service
Expansion = csi_pb2.PluginCapability.VolumeExpansion


class Identity(csi_pb2_grpc.IdentityServicer):
    def __init__(self, config: CsiConfig, lvm: Lvm | None,
                 cache: CapacityCache | None = None) -> None:
        self.cfg = config
        self._lvm = lvm
        self._cache = cache

    def GetPluginInfo(self, request: csi_pb2.GetPluginInfoRequest,
                      context: grpc.ServicerContext) -> csi_pb2.GetPluginInfoResponse:
        return csi_pb2.GetPluginInfoResponse(
            name=self.cfg.driver_name, vendor_version=VERSION,
            manifest={"mode": self.cfg.mode.value, "node": self.cfg.node_id})

    def GetPluginCapabilities(self, request: csi_pb2.GetPluginCapabilitiesRequest,
                              context: grpc.ServicerContext,
                              ) -> csi_pb2.GetPluginCapabilitiesResponse:
        caps = [
            csi_pb2.PluginCapability(service=Service(type=Service.CONTROLLER_SERVICE)),
            csi_pb2.PluginCapability(
                service=Service(type=Service.VOLUME_ACCESSIBILITY_CONSTRAINTS)),
            csi_pb2.PluginCapability(volume_expansion=Expansion(type=Expansion.ONLINE)),
            csi_pb2.PluginCapability(volume_expansion=Expansion(type=Expansion.OFFLINE)),
        ]
        return csi_pb2.GetPluginCapabilitiesResponse(capabilities=caps)

    def readiness(self) -> tuple[bool, str]:
        """Ready when LVM answers and every configured VG exists (always, in controller mode)."""
        if self.cfg.mode is Mode.CONTROLLER or self._lvm is None:
            return True, "controller-only instance"
        wanted = self.cfg.configured_vgs
        # LVM answered within a refresh period (the capacity cache's last read): that is the
        # answer, so Probe costs no lvm process and stays prompt on a busy node.
        report = self._cache.recent(self.cfg.capacity_refresh_seconds) \
            if self._cache is not None else None
        if report is not None and all(report.vg(vg) is not None for vg in wanted):
            found = {vg.name for vg in report.vgs}
        else:
            try:
                found = {vg.name for vg in self._lvm.vgs()}
            except LvmError as exc:
                return False, f"lvm does not answer: {exc.message}"
        missing = [vg for vg in wanted if vg not in found]
        if missing:
            return False, f"volume group(s) {', '.join(missing)} missing on this node"
        return True, f"volume group(s) {', '.join(wanted)} present"

    def Probe(self, request: csi_pb2.ProbeRequest,
              context: grpc.ServicerContext) -> csi_pb2.ProbeResponse:
        ready, detail = self.readiness()
        if not ready:
            log.info("probe: not ready", extra={"reason": detail})
        return csi_pb2.ProbeResponse(ready=BoolValue(value=ready))
