"""The contract between the node agent and the CSI driver on a thin pool's LVM tags.

The node agent writes the pool's overprovision ratio as a tag; the driver reads it from the
pool at every accounting, so a changed ratio takes effect without a restart of either.
"""

OVERPROVISION_TAG = "csi-lvm.edge.io/overprovision="  # + the ratio, e.g. "...=2.5"
