"""A CSI client that calls the driver the way Kubernetes does.

external-provisioner (node-deployment mode, WaitForFirstConsumer) calls CreateVolume with the
StorageClass parameters, the extra PVC metadata and the selected node's topology; kubelet calls
NodePublishVolume at ``/var/lib/kubelet/pods/<uid>/volumes/kubernetes.io~csi/<pv>/mount`` with
the pod's info in the volume context; external-resizer calls ControllerExpandVolume, then
kubelet NodeExpandVolume; the snapshotter CreateSnapshot with the VolumeSnapshotClass
parameters.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from edge_common.server import unix_channel
from edge_proto.csi.v1 import csi_pb2, csi_pb2_grpc

STORAGE_CLASS = "csi-local-lvm"
#: The parameters of StorageClass csi-local-lvm (deploy/) plus what the sidecar adds.
STORAGE_CLASS_PARAMETERS = {
    "lvmType": "linear",
    "csi.storage.k8s.io/fstype": "ext4",
}
RPC_TIMEOUT = 120.0

AccessMode = csi_pb2.VolumeCapability.AccessMode


def mount_capability(fs_type: str = "ext4") -> Any:
    return csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(fs_type=fs_type),
        access_mode=AccessMode(mode=AccessMode.SINGLE_NODE_WRITER),
    )


@dataclass(frozen=True)
class Pvc:
    """What Kubernetes knows about the claim: names that end up in the CSI requests."""

    namespace: str = "default"
    name: str = "data-demo-0"
    uid: str = ""
    pod_name: str = "demo-0"
    pod_uid: str = ""

    @staticmethod
    def new(namespace: str = "default", name: str = "data-demo-0") -> Pvc:
        return Pvc(namespace, name, str(uuid.uuid4()), "demo-0", str(uuid.uuid4()))

    @property
    def pv_name(self) -> str:
        return f"pvc-{self.uid}"

    def target_path(self, kubelet_dir: Path) -> Path:
        return (kubelet_dir / "pods" / self.pod_uid / "volumes" / "kubernetes.io~csi"
                / self.pv_name / "mount")


class CsiClient:
    def __init__(self, endpoint: str, timeout: float = RPC_TIMEOUT) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self.channel = unix_channel(endpoint)
        self.identity = csi_pb2_grpc.IdentityStub(self.channel)
        self.controller = csi_pb2_grpc.ControllerStub(self.channel)
        self.node = csi_pb2_grpc.NodeStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    # --- identity --------------------------------------------------------------------------

    def plugin_info(self) -> Any:
        return self.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest(), timeout=self.timeout)

    def probe_ready(self) -> bool:
        resp = self.identity.Probe(csi_pb2.ProbeRequest(), timeout=5)
        return not resp.HasField("ready") or bool(resp.ready.value)

    def node_info(self) -> Any:
        return self.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest(), timeout=self.timeout)

    # --- external-provisioner --------------------------------------------------------------

    def topology(self) -> dict[str, str]:
        return dict(self.node_info().accessible_topology.segments)

    def create_volume(self, pvc: Pvc, size: int, parameters: Mapping[str, str],
                      topology: Mapping[str, str], fs_type: str = "ext4") -> Any:
        params = dict(parameters)
        params.update({  # --extra-create-metadata
            "csi.storage.k8s.io/pvc/name": pvc.name,
            "csi.storage.k8s.io/pvc/namespace": pvc.namespace,
            "csi.storage.k8s.io/pv/name": pvc.pv_name,
        })
        selected = csi_pb2.Topology(segments=dict(topology))
        request = csi_pb2.CreateVolumeRequest(
            name=pvc.pv_name,
            capacity_range=csi_pb2.CapacityRange(required_bytes=size),
            volume_capabilities=[mount_capability(fs_type)],
            parameters=params,
            accessibility_requirements=csi_pb2.TopologyRequirement(
                requisite=[selected], preferred=[selected]),
        )
        return self.controller.CreateVolume(request, timeout=self.timeout).volume

    def get_capacity(self, parameters: Mapping[str, str], topology: Mapping[str, str]) -> int:
        resp = self.controller.GetCapacity(
            csi_pb2.GetCapacityRequest(
                volume_capabilities=[mount_capability()], parameters=dict(parameters),
                accessible_topology=csi_pb2.Topology(segments=dict(topology)),
            ),
            timeout=self.timeout,
        )
        return int(resp.available_capacity)

    def delete_volume(self, volume_id: str) -> None:
        self.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume_id),
                                     timeout=self.timeout)

    def retry_aborted(self, call: Callable[[], object], patience: float = 20.0) -> None:
        """Retry ``call`` while the driver answers ABORTED (another call for the same volume is
        still in flight, e.g. one the demo was interrupted in), as the sidecars do."""
        deadline = time.monotonic() + patience
        while True:
            try:
                call()
                return
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.ABORTED or time.monotonic() > deadline:
                    raise
            time.sleep(0.2)

    # --- external-resizer ------------------------------------------------------------------

    def controller_expand(self, volume_id: str, size: int) -> Any:
        return self.controller.ControllerExpandVolume(
            csi_pb2.ControllerExpandVolumeRequest(
                volume_id=volume_id, capacity_range=csi_pb2.CapacityRange(required_bytes=size),
                volume_capability=mount_capability(),
            ),
            timeout=self.timeout,
        )

    # --- external-snapshotter --------------------------------------------------------------

    def create_snapshot(self, volume_id: str, name: str,
                        parameters: Mapping[str, str]) -> Any:
        return self.controller.CreateSnapshot(
            csi_pb2.CreateSnapshotRequest(source_volume_id=volume_id, name=name,
                                          parameters=dict(parameters)),
            timeout=self.timeout,
        ).snapshot

    def delete_snapshot(self, snapshot_id: str) -> None:
        self.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snapshot_id),
                                       timeout=self.timeout)

    # --- kubelet ---------------------------------------------------------------------------

    def publish(self, volume: Any, pvc: Pvc, target: Path) -> None:
        context = dict(volume.volume_context)
        context.update({  # CSIDriver podInfoOnMount: true
            "csi.storage.k8s.io/pod.name": pvc.pod_name,
            "csi.storage.k8s.io/pod.namespace": pvc.namespace,
            "csi.storage.k8s.io/pod.uid": pvc.pod_uid,
            "csi.storage.k8s.io/serviceAccount.name": "default",
            "csi.storage.k8s.io/ephemeral": "false",
        })
        # kubelet creates the parent directory, the driver the target itself.
        target.parent.mkdir(parents=True, exist_ok=True)
        self.node.NodePublishVolume(
            csi_pb2.NodePublishVolumeRequest(
                volume_id=volume.volume_id, target_path=str(target),
                volume_capability=mount_capability(), volume_context=context, readonly=False,
            ),
            timeout=self.timeout,
        )

    def node_expand(self, volume_id: str, target: Path, size: int) -> int:
        resp = self.node.NodeExpandVolume(
            csi_pb2.NodeExpandVolumeRequest(
                volume_id=volume_id, volume_path=str(target),
                capacity_range=csi_pb2.CapacityRange(required_bytes=size),
                volume_capability=mount_capability(),
            ),
            timeout=self.timeout,
        )
        return int(resp.capacity_bytes)

    def stats(self, volume_id: str, target: Path) -> Any:
        return self.node.NodeGetVolumeStats(
            csi_pb2.NodeGetVolumeStatsRequest(volume_id=volume_id, volume_path=str(target)),
            timeout=self.timeout,
        )

    def unpublish(self, volume_id: str, target: Path) -> None:
        self.node.NodeUnpublishVolume(
            csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=str(target)),
            timeout=self.timeout,
        )


def rpc_error_text(exc: grpc.RpcError) -> str:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return f"{code.name if code else 'ERROR'}: {details}"


__all__ = ["CsiClient", "Pvc", "STORAGE_CLASS", "STORAGE_CLASS_PARAMETERS", "mount_capability",
           "rpc_error_text"]
