"""THE LVM command layer shared by csi_lvm and node_resource_manager.

Usage::

    from edge_common.lvm import Lvm, LvmSettings, LvmError

    lvm = Lvm(Lvm.settings_for_this_kernel(timeout=30))
    vg = lvm.get_vg("vg0")            # None only when lvm says "not found"
    lvm.lvcreate("vg0", "pvc-1", 1 << 30, tags=("owner=csi",))

Settings (documented in LvmSettings): a command prefix (``nsenter ... lvm`` in a container),
extra arguments after each sub-command (``--driverloaded n`` on kernels without device-mapper),
a default timeout and an optional ``--config`` string. Every method runs exactly one lvm
process and accepts ``timeout=`` to override the default.
"""

from edge_common.lvm.attr import LvAttr
from edge_common.lvm.errors import (
    ECMD_FAILED,
    LvmCommandNotFound,
    LvmError,
    LvmOutputError,
    LvmStillRunning,
    LvmTimeout,
    still_running,
)
from edge_common.lvm.records import LogicalVolume, LvmReport, PhysicalVolume, VolumeGroup
from edge_common.lvm.runner import Lvm
from edge_common.lvm.settings import DRIVERLOADED_NO, LvmSettings

__all__ = [
    "DRIVERLOADED_NO",
    "ECMD_FAILED",
    "LogicalVolume",
    "LvAttr",
    "Lvm",
    "LvmCommandNotFound",
    "LvmError",
    "LvmOutputError",
    "LvmReport",
    "LvmSettings",
    "LvmStillRunning",
    "LvmTimeout",
    "PhysicalVolume",
    "VolumeGroup",
    "still_running",
]
