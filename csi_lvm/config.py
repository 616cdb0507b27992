"""Every option of the CSI driver in one typed dataclass (flags, environment CSI_LVM_*, YAML file).

`csi-lvm --help` and docs/csi-lvm.md list them; the defaults below are the ones the deploy
manifests rely on.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from edge_common.config import ConfigError, load, option
from edge_common.version import VERSION

ENV_PREFIX = "CSI_LVM_"
DEFAULT_DRIVER_NAME = "local.csi.edge.io"
DEFAULT_VG = "volumegroup1"
GIB = 1024**3


class Mode(enum.Enum):
    """Which services this instance serves."""

    ALL = "all"  # identity + controller + node, on the storage node (DaemonSet)
    CONTROLLER = "controller"  # identity + ControllerExpandVolume only, no LVM (external-resizer)


class CreateWipe(enum.Enum):
    """What CreateVolume clears on a new LV before handing it out (lvcreate -Wy -Zy always runs)."""

    AUTO = "auto"  # the head and tail for filesystem volumes, the whole LV for raw block volumes
    HEADER = "header"  # the head and tail only (filesystems never expose blocks they did not write)
    FULL = "full"  # the whole LV, every time (BLKZEROOUT, or writes where unsupported)


class DeleteWipe(enum.Enum):
    """What DeleteVolume does to the data before lvremove (StorageClass `wipeOnDelete` wins)."""

    NONE = "none"
    DISCARD = "discard"  # BLKDISCARD: fast; whether reads return zeros depends on the device
    ZERO = "zero"  # BLKZEROOUT (falls back to writing zeros)


@dataclass(frozen=True)
class CsiConfig:
    endpoint: str = option(
        "unix:///csi/csi.sock", help="gRPC endpoint: unix:///path or unix:///@abstract-name",
        metavar="URL",
    )
    node_id: str = option(
        "", help="this node's name (Kubernetes node name); required in mode 'all'", metavar="NAME",
    )
    driver_name: str = option(
        DEFAULT_DRIVER_NAME,
        help="CSI driver name; also the ownership tag value and the topology key suffix",
        metavar="NAME",
    )
    mode: Mode = option(
        Mode.ALL,
        help="all: identity, controller and node on the storage node; controller: a central "
        "instance for external-resizer that answers ControllerExpandVolume without LVM",
    )
    default_vg: str = option(
        DEFAULT_VG, help="volume group used when a StorageClass names none (parameter vgName)",
        metavar="VG",
    )
    allowed_vgs: list[str] = option(
        [], help="volume groups a StorageClass may name besides default_vg (comma-separated); "
        "empty: the default VG only (never any other VG of the host, the OS's included)",
        metavar="VG,...",
    )
    default_thin_pool: str = option(
        "", help="thin pool used by lvmType thin when a StorageClass names none (thinPool)",
        metavar="LV",
    )
    lvm_command: list[str] = option(
        ["lvm"], help="command prefix for every LVM call, e.g. nsenter,--mount=/proc/1/ns/mnt,"
        "--ipc=/proc/1/ns/ipc,--,lvm (comma-separated)", metavar="ARGV",
    )
    lvm_extra_args: list[str] = option(
        [], help="arguments added to every LVM sub-command (comma-separated)", metavar="ARGS",
    )
    lvm_auto_driverloaded: bool = option(
        True, help="add --driverloaded n to LVM calls when the kernel has no device-mapper",
    )
    lvm_config: str = option(
        "", help="an LVM --config string for every call, e.g. for hosts without udev",
        metavar="TEXT",
    )
    lvm_timeout_seconds: float = option(
        120.0, help="timeout of one LVM command", metavar="SECONDS",
    )
    capacity_refresh_seconds: float = option(
        30.0, help="how often the VG/thin-pool capacity cache behind GetCapacity is refreshed "
        "(our own changes invalidate it at once)", metavar="SECONDS",
    )
    thin_overprovision_ratio: float = option(
        1.0, help="overprovision ratio of a thin pool that carries no csi-lvm.edge.io/"
        "overprovision=<ratio> tag: room for thin volumes = pool size x ratio - the virtual "
        "sizes already handed out (the pool's tag, as LVM reports it, always wins)",
        metavar="RATIO",
    )
    thin_pool_data_threshold_percent: float = option(
        90.0, help="a thin pool whose data usage reaches this percent is reported: its thin "
        "volumes get an abnormal VolumeCondition, GetCapacity reports 0 for it, new and grown "
        "thin volumes are RESOURCE_EXHAUSTED, a Warning is logged and counted", metavar="PERCENT",
    )
    thin_pool_metadata_threshold_percent: float = option(
        80.0, help="the same for the thin pool's metadata usage (a pool out of metadata turns "
        "read-only)", metavar="PERCENT",
    )
    vg_recheck_seconds: float = option(
        2.0, help="a volume group or thin pool missing from the capacity cache is looked up "
        "again in LVM at most this often (so a VG the node agent just built is usable within "
        "seconds, and a flood of requests for an absent one costs one lvm call per period)",
        metavar="SECONDS",
    )
    lvm_change_paths: list[str] = option(
        ["/etc/lvm/backup"], help="directories LVM rewrites on every metadata change (its "
        "metadata backups), stat()ed every lvm_change_check_seconds: a change made outside the "
        "driver (the node agent's vgcreate/vgextend, an lvcreate) marks the capacity cache "
        "stale, so GetCapacity shows it within seconds; where LVM runs on the host through "
        "nsenter: /proc/1/root/etc/lvm/backup (comma-separated; empty: off)", metavar="DIR,...",
    )
    lvm_change_check_seconds: float = option(
        1.0, help="how often lvm_change_paths are checked (one stat each, no LVM process); "
        "0: never", metavar="SECONDS",
    )
    block_events: bool = option(
        True, help="block device uevents (udev's, or the kernel's without a udev daemon) mark "
        "the capacity cache stale too: GetCapacity re-reads LVM, at most once a second, for "
        "15 s after one (a disk appearing is made a VG moments later)",
    )
    default_volume_size: int = option(
        GIB, help="bytes given to a volume whose request has no capacity range",
        metavar="BYTES",
    )
    create_wipe: CreateWipe = option(
        CreateWipe.AUTO, help="what a new LV gets cleared of before it is handed out",
    )
    delete_wipe: DeleteWipe = option(
        DeleteWipe.NONE, help="default for the StorageClass parameter wipeOnDelete",
    )
    thick_snapshot_percent: int = option(
        100, help="copy-on-write space of a thick snapshot, in percent of its origin, when the "
        "VolumeSnapshotClass has no snapshotSize", metavar="PERCENT",
    )
    max_data_jobs: int = option(
        2, help="thick clones, restores and full wipes running at once (more queue); they run "
        "outside the gRPC workers", metavar="N",
    )
    data_job_wait_seconds: float = option(
        60.0, help="how long CreateVolume and DeleteVolume wait for their copy or full wipe when "
        "the caller set no deadline (with one, they wait until 2 s before it); then they answer "
        "ABORTED (pending) with the progress and the job finishes in the background; a retry "
        "waits for the same job again, never a second one. At most half of grpc_workers wait at "
        "once (one more answers ABORTED at once)", metavar="SECONDS",
    )
    clone_via_snapshot: bool = option(
        True, help="copy a thick source volume through a temporary COW snapshot so the copy is "
        "consistent while the source is in use",
    )
    kube_events: bool = option(
        True, help="post Events (thin pool past/below its threshold) on this Node through the "
        "Kubernetes API when running in a cluster or given kubeconfig; otherwise they are "
        "logged only",
    )
    kubeconfig: str = option(
        "", help="kubeconfig for Events (and, in mode controller, for reading what the nodes "
        "publish); empty: the pod's service account when in a cluster", metavar="FILE",
    )
    storage_capacity_namespace: str = option(
        "kube-system", help="mode controller: namespace of the CSIStorageCapacity objects "
        "external-provisioner publishes; ControllerExpandVolume refuses growth beyond what the "
        "volume's node publishes there", metavar="NAMESPACE",
    )
    advertise_get_snapshot: bool = option(
        False, help="advertise the alpha GET_SNAPSHOT controller capability (CSI 1.12; the "
        "GetSnapshot RPC answers either way): off by default because conformance suites and "
        "sidecars built against older specs reject capabilities they do not know",
    )
    encryption_backends_file: str = option(
        "", help="YAML file naming this node's key backends for encrypted volumes (StorageClass "
        "encrypted: \"true\"; see docs/csi-lvm.md); empty: encrypted volumes are refused",
        metavar="FILE",
    )
    encryption_rewrap_seconds: float = option(
        3600.0, help="how often open encrypted volumes have their keys re-wrapped under their "
        "backend's current root key (after a rotation); 0: never", metavar="SECONDS",
    )
    cryptsetup_timeout_seconds: float = option(
        60.0, help="timeout of one cryptsetup command", metavar="SECONDS",
    )
    max_volumes_per_node: int = option(
        0, help="NodeGetInfo max_volumes_per_node (0: no limit)", metavar="N",
    )
    grpc_workers: int = option(
        16, help="gRPC worker threads; at most half of them wait for data jobs (the rest "
        "always serve Probe, NodePublish, NodeGetVolumeStats, ...)", metavar="N",
    )
    socket_group: str = option(
        "", help="group owning the socket file (mode 0660 when set, else 0600)", metavar="GROUP",
    )
    metrics_address: str = option(
        "", help="host:port for /metrics, /healthz and /readyz; empty: disabled",
        metavar="HOST:PORT",
    )
    log_level: str = option("INFO", help="log level", metavar="LEVEL")
    log_json: bool = option(True, help="JSON log lines (off: human-readable)")

    def __post_init__(self) -> None:
        if not self.driver_name or len(self.driver_name) > 63:
            raise ValueError("driver_name must be 1 to 63 characters")
        if self.mode is Mode.ALL and not self.node_id:
            raise ValueError("node_id is required (--node-id NAME) in mode 'all'")
        if len(self.node_id) > 128:
            raise ValueError("node_id must be at most 128 bytes")
        if not self.lvm_command:
            raise ValueError("lvm_command must not be empty")
        if self.thin_overprovision_ratio <= 0:
            raise ValueError("thin_overprovision_ratio must be positive")
        if self.default_volume_size <= 0:
            raise ValueError("default_volume_size must be positive")
        if not 1 <= self.thick_snapshot_percent <= 100:
            raise ValueError("thick_snapshot_percent must be between 1 and 100")
        for what, percent in (("thin_pool_data_threshold_percent",
                               self.thin_pool_data_threshold_percent),
                              ("thin_pool_metadata_threshold_percent",
                               self.thin_pool_metadata_threshold_percent)):
            if not 0 < percent <= 100:
                raise ValueError(f"{what} must be above 0 and at most 100")
        if self.max_data_jobs < 1 or self.data_job_wait_seconds < 0:
            raise ValueError("max_data_jobs must be at least 1, data_job_wait_seconds >= 0")
        if self.grpc_workers < 1:
            raise ValueError("grpc_workers must be at least 1")
        if self.vg_recheck_seconds < 0 or self.lvm_change_check_seconds < 0:
            raise ValueError("vg_recheck_seconds and lvm_change_check_seconds must not be "
                             "negative")
        if self.capacity_refresh_seconds <= 0 or self.lvm_timeout_seconds <= 0:
            raise ValueError("capacity_refresh_seconds and lvm_timeout_seconds must be positive")
        if self.encryption_rewrap_seconds < 0 or self.cryptsetup_timeout_seconds <= 0:
            raise ValueError("encryption_rewrap_seconds must not be negative and "
                             "cryptsetup_timeout_seconds must be positive")

    @property
    def topology_key(self) -> str:
        return topology_key(self.driver_name)

    @property
    def configured_vgs(self) -> list[str]:
        """The VGs Probe requires: the default one and every allowed one."""
        out = [self.default_vg]
        out += [vg for vg in self.allowed_vgs if vg not in out]
        return out

    def vg_allowed(self, vg: str) -> bool:
        """Only the default VG and the listed ones: with no list, the default VG alone."""
        return vg == self.default_vg or vg in self.allowed_vgs


def topology_key(driver_name: str) -> str:
    return f"topology.{driver_name}/node"


def load_config(argv: Sequence[str] | None = None) -> CsiConfig:
    return load(
        CsiConfig, argv, env_prefix=ENV_PREFIX, prog="csi-lvm",
        description="CSI driver for local LVM volumes (identity, controller and node services)",
        version=VERSION,
    )


__all__ = ["ConfigError", "CreateWipe", "CsiConfig", "DeleteWipe", "Mode", "load_config",
           "topology_key", "DEFAULT_DRIVER_NAME", "DEFAULT_VG", "ENV_PREFIX"]
