"""Every option of the node resource manager in one typed dataclass (flags, environment NRM_*,
YAML file via --config). ``node-resource-manager --help`` and docs/node-resource-manager.md list
them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from edge_common.config import load, option
from edge_common.lvm import LvmSettings
from edge_common.version import VERSION
from node_resource_manager.devices import HostPaths
from node_resource_manager.mounts import DEFAULT_MOUNT_TABLES
from node_resource_manager.safety import SafetySettings

ENV_PREFIX = "NRM_"
PROG = "node-resource-manager"
DESCRIPTION = (
    "Builds LVM volume groups from the node-resource-topo ConfigMap on the nodes it selects, "
    "and never wipes a disk it is not sure is free."
)
DEFAULT_GATE_KEY = "alibabacloud.com/edge-enable-localstorage"
DEFAULT_STATUS_ANNOTATION = "node-resource-manager.edge.io/status"


@dataclass(frozen=True)
class NrmConfig:
    node_name: str = option("", help="this node's name (required; in a pod: spec.nodeName)",
                            metavar="NAME")
    kubeconfig: str = option("", help="kubeconfig file; empty: in-cluster service account",
                             metavar="FILE")
    once: bool = option(False, help="reconcile once, print the result and exit (exit code: "
                        "0 converged, 1 config invalid, 2 device(s) refused, 3 LVM error, "
                        "4 Kubernetes API error)", env=False)
    dry_run: bool = option(False, help="print the plan (what would be created, extended or "
                           "refused, and why) and exit; changes nothing", env=False)
    topology_file: str = option("", help="offline mode: read the topology YAML from this file "
                                "instead of the ConfigMap (no Kubernetes)", metavar="FILE")
    node_labels: dict[str, str] = option({}, help="offline mode: this node's labels, "
                                         "k=v,k2=v2", metavar="K=V,...")
    status_file: str = option("", help="offline mode: write the status JSON here after "
                              "every reconcile", metavar="FILE")
    configmap_namespace: str = option("kube-system", help="namespace of the topology "
                                      "ConfigMap", metavar="NS")
    configmap_name: str = option("node-resource-topo", help="name of the topology ConfigMap",
                                 metavar="NAME")
    configmap_key: str = option("volumegroup", help="data key holding the topology YAML",
                                metavar="KEY")
    gate_label_key: str = option(DEFAULT_GATE_KEY, help="label a node must carry to be "
                                 "managed at all", metavar="KEY")
    gate_label_value: str = option("true", help="required value of the gate label",
                                   metavar="VALUE")
    status_annotation: str = option(DEFAULT_STATUS_ANNOTATION, help="Node annotation that "
                                    "receives the JSON status summary", metavar="KEY")
    resync_seconds: float = option(60.0, help="periodic reconcile even without any event",
                                   metavar="SECONDS")
    debounce_seconds: float = option(0.5, help="wait this long after an event for more "
                                     "events before reconciling", metavar="SECONDS")
    status_heartbeat_seconds: float = option(300.0, help="re-write an unchanged status "
                                             "annotation after this long", metavar="SECONDS")
    event_repeat_seconds: float = option(3600.0, help="an identical Event is emitted again "
                                         "only after this long", metavar="SECONDS")
    watch_timeout_seconds: int = option(300, help="server-side timeout of one watch request "
                                        "(it is then resumed from the last resourceVersion)",
                                        metavar="SECONDS")
    udev: bool = option(True, help="react to block device add/change/remove uevents "
                        "(degrades to the periodic resync when unavailable)")
    lvm_command: list[str] = option(["lvm"], help="command prefix for every LVM call, e.g. "
                                    "nsenter,--mount=/proc/1/ns/mnt,--ipc=/proc/1/ns/ipc,--,lvm "
                                    "(comma-separated)",
                                    metavar="ARGV")
    lvm_extra_args: list[str] = option([], help="arguments added to every LVM sub-command "
                                       "(comma-separated)", metavar="ARGS")
    lvm_auto_driverloaded: bool = option(True, help="add --driverloaded n to LVM calls when "
                                         "the kernel has no device-mapper")
    lvm_config: str = option("", help="an LVM --config string for every call",
                             metavar="TEXT")
    lvm_timeout_seconds: float = option(120.0, help="timeout of one LVM command",
                                        metavar="SECONDS")
    probe_timeout_seconds: float = option(20.0, help="timeout of one blkid/wipefs probe",
                                          metavar="SECONDS")
    mount_tables: list[str] = option(list(DEFAULT_MOUNT_TABLES),
                                     help="mountinfo files read to find mounted devices (the "
                                     "host's: run with hostPID)", metavar="FILE,...")
    swaps_file: str = option("/proc/swaps", help="active swap list", metavar="FILE")
    dev_dir: str = option("/dev", help="where the agent sees the host's /dev (e.g. /host/dev "
                          "in a container); LVM, which runs in the host's namespace, is "
                          "still given /dev/... paths", metavar="DIR")
    sys_dir: str = option("/sys", help="the host's /sys", metavar="DIR")
    udev_data_dir: str = option("/run/udev/data", help="the host's udev database (WWN and "
                                "serial of disks, extra identifiers of a medium)",
                                metavar="DIR")
    mount_namespace: str = option("host", help="where the agent runs, so that the mount "
                                  "tables it reads are the host's: 'host' (in the host's mount "
                                  "namespace), 'hostpid' (a container with hostPID: /proc/1 "
                                  "must be in another mount namespace), 'any' (not checked); "
                                  "when it does not hold, no new device is used",
                                  metavar="WHERE")
    dev_disk_dir: str = option("", help="where by-id/by-path/by-diskseq links live (patterns "
                               "/dev/disk/... are matched here); empty: <dev-dir>/disk",
                               metavar="DIR")
    state_dir: str = option("/var/lib/node-resource-manager", help="persistent directory for "
                            "the journal of physical volumes being created", metavar="DIR")
    metrics_address: str = option("", help="host:port for /metrics, /healthz and /readyz; "
                                  "empty: disabled", metavar="HOST:PORT")
    log_level: str = option("INFO", help="log level", metavar="LEVEL")
    log_json: bool = option(True, help="JSON log lines (off: human-readable)")

    def __post_init__(self) -> None:
        if not self.node_name:
            raise ValueError("--node-name is required (NRM_NODE_NAME)")
        if self.node_labels and not self.topology_file:
            raise ValueError("--node-labels only applies with --topology-file (offline mode)")
        if self.resync_seconds <= 0 or self.debounce_seconds < 0:
            raise ValueError("resync_seconds must be positive and debounce_seconds >= 0")
        if not self.lvm_command:
            raise ValueError("lvm_command must not be empty")
        if self.mount_namespace not in ("host", "hostpid", "any"):
            raise ValueError(f"mount_namespace must be host, hostpid or any, not "
                             f"{self.mount_namespace!r}")

    @property
    def offline(self) -> bool:
        return bool(self.topology_file)

    def lvm_settings(self) -> LvmSettings:
        return LvmSettings.from_options(
            self.lvm_command, self.lvm_extra_args, self.lvm_timeout_seconds, self.lvm_config,
            auto_driverloaded=self.lvm_auto_driverloaded)

    def host_paths(self) -> HostPaths:
        return HostPaths(dev=Path(self.dev_dir), sys=Path(self.sys_dir),
                         dev_disk=Path(self.dev_disk_dir or f"{self.dev_dir}/disk"),
                         udev_data=Path(self.udev_data_dir))

    def safety_settings(self) -> SafetySettings:
        return SafetySettings(paths=self.host_paths(), mount_tables=tuple(self.mount_tables),
                              swaps_file=self.swaps_file,
                              probe_timeout=self.probe_timeout_seconds,
                              mount_namespace=self.mount_namespace)


def load_config(argv: Sequence[str] | None = None) -> NrmConfig:
    return load(NrmConfig, argv, env_prefix=ENV_PREFIX, prog=PROG, description=DESCRIPTION,
                version=VERSION)
