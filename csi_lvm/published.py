"""What the storage nodes publish, read by the controller-only instance (`--mode controller`).

That instance has no LVM: to answer ControllerExpandVolume truthfully it looks at what the
volume's node publishes for the volume's StorageClass, the CSIStorageCapacity objects
external-provisioner writes from GetCapacity. Growth beyond their maximumVolumeSize (or
capacity) is RESOURCE_EXHAUSTED, as the node would answer; no published figure (capacity
tracking off, the node's object not written yet) leaves the decision to the node.

RBAC: persistentvolumes get/list (cluster) and csistoragecapacities list in
`storage_capacity_namespace` (the provisioner's namespace).
"""

from __future__ import annotations

import logging
import urllib.parse
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from csi_lvm.params import parse_quantity
from edge_common.errors import InvalidArgument, NotFound, Unavailable

if TYPE_CHECKING:
    from edge_common.kubeapi import KubeClient

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Room:
    node: str
    storage_class: str
    current: int  # the PV's capacity
    maximum: int | None  # the largest volume the node publishes (None: nothing published)


def _quantity(text: object) -> int | None:
    if not isinstance(text, str):
        return None
    try:
        return parse_quantity(text, "quantity")
    except InvalidArgument:
        return None


class PublishedCapacity:
    def __init__(self, api: KubeClient, driver_name: str, topology_key: str,
                 namespace: str) -> None:
        self.api = api
        self.driver_name = driver_name
        self.topology_key = topology_key
        self.namespace = namespace

    def _get(self, path: str) -> dict[str, Any]:
        from edge_common.kubeapi import ApiError

        try:
            return self.api.request("GET", path)
        except ApiError as exc:
            raise Unavailable(f"cannot read what the nodes publish ({path}): {exc}") from None

    def room(self, volume_id: str) -> Room:
        """The volume's node, size and what its node publishes (NOT_FOUND: no such PV)."""
        pvs = self._get("/api/v1/persistentvolumes").get("items") or []
        pv = next((p for p in pvs
                   if (p.get("spec") or {}).get("csi", {}).get("driver") == self.driver_name
                   and p["spec"]["csi"].get("volumeHandle") == volume_id), None)
        if pv is None:
            raise NotFound(f"no PersistentVolume of {self.driver_name} has volume handle "
                           f"{volume_id!r}")
        spec = pv["spec"]
        node = ""
        terms = (((spec.get("nodeAffinity") or {}).get("required") or {})
                 .get("nodeSelectorTerms") or [])
        for term in terms:
            for expr in term.get("matchExpressions") or []:
                if expr.get("key") == self.topology_key and expr.get("operator") == "In" \
                        and expr.get("values"):
                    node = expr["values"][0]
        storage_class = spec.get("storageClassName") or ""
        current = _quantity((spec.get("capacity") or {}).get("storage")) or 0
        maximum = self._published(node, storage_class) if node and storage_class else None
        return Room(node, storage_class, current, maximum)

    def _published(self, node: str, storage_class: str) -> int | None:
        path = (f"/apis/storage.k8s.io/v1/namespaces/{urllib.parse.quote(self.namespace)}"
                "/csistoragecapacities")
        for item in self._get(path).get("items") or []:
            if item.get("storageClassName") != storage_class:
                continue
            labels = ((item.get("nodeTopology") or {}).get("matchLabels") or {})
            if labels.get(self.topology_key) != node:
                continue
            return _quantity(item.get("maximumVolumeSize")) \
                if item.get("maximumVolumeSize") is not None else _quantity(item.get("capacity"))
        return None
