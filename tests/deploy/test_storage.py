"""The facts that break a cluster when the storage manifests get them wrong, checked against the
code: the driver name, the socket paths, mount propagation, flags, ports and images."""

from __future__ import annotations

import posixpath
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from csi_lvm.config import DEFAULT_DRIVER_NAME, CsiConfig, Mode
from csi_lvm.params import check_snapshot_params, parse_volume_params
from node_resource_manager.config import DEFAULT_GATE_KEY, NrmConfig
from tests.deploy.commands import FIELD_VALUES, exec_config, expanded_argv, is_ours, our_config
from tests.deploy.manifests import (
    DEPLOY,
    ROOT,
    Obj,
    container,
    containers,
    find,
    flag,
    has_container,
    has_flag,
    kustomization_dirs,
    one,
    pod_spec,
    pod_workloads,
    rel,
    render,
    resolve,
    unix_path,
)

KUBELET_DIR = "/var/lib/kubelet"
REGISTRATION_DIR = "/var/lib/kubelet/plugins_registry"
SIDECAR_REGISTRY = "registry.k8s.io/sig-storage/"
STORAGE_DIRS = [d for d in kustomization_dirs() if d != DEPLOY / "kms" and d != DEPLOY / "examples"]


def node_ds(objs: tuple[Obj, ...]) -> Obj:
    return one(objs, "DaemonSet", "csi-lvm-node")


def resizer(objs: tuple[Obj, ...]) -> Obj:
    return one(objs, "Deployment", "csi-lvm-resizer")


def nrm_default(name: str) -> object:
    return NrmConfig.__dataclass_fields__[name].default


# ------------------------------------------------------------------------------ driver name


def test_driver_name_is_the_plugins_default_everywhere(base: tuple[Obj, ...]) -> None:
    driver = one(base, "CSIDriver")["metadata"]["name"]
    assert driver == DEFAULT_DRIVER_NAME
    assert one(base, "StorageClass", "csi-local-lvm")["provisioner"] == DEFAULT_DRIVER_NAME
    assert one(base, "VolumeSnapshotClass")["driver"] == DEFAULT_DRIVER_NAME
    for workload in (node_ds(base), resizer(base)):
        cfg = our_config(container(workload, "csi-lvm"))
        assert cfg.driver_name == DEFAULT_DRIVER_NAME, "csi-lvm overrides --driver-name"


def test_csi_driver_object_matches_a_local_volume_driver(base: tuple[Obj, ...]) -> None:
    spec = one(base, "CSIDriver")["spec"]
    assert spec["attachRequired"] is False
    assert spec["podInfoOnMount"] is True
    assert spec["storageCapacity"] is True
    assert spec["volumeLifecycleModes"] == ["Persistent"]


def test_storage_class_is_wait_for_first_consumer_expandable_ext4(base: tuple[Obj, ...]) -> None:
    sc = one(base, "StorageClass", "csi-local-lvm")
    assert sc["volumeBindingMode"] == "WaitForFirstConsumer"
    assert sc["allowVolumeExpansion"] is True
    assert sc["parameters"]["csi.storage.k8s.io/fstype"] == "ext4"


def test_storage_class_parameters_are_accepted_by_the_driver(base: tuple[Obj, ...]) -> None:
    sc = one(base, "StorageClass", "csi-local-lvm")
    cfg = CsiConfig(node_id="n")
    # what external-provisioner passes with --extra-create-metadata, plus the class parameters
    params = {**sc.get("parameters", {}), "csi.storage.k8s.io/pvc/name": "p",
              "csi.storage.k8s.io/pvc/namespace": "default", "csi.storage.k8s.io/pv/name": "pv"}
    parsed = parse_volume_params(
        params, default_vg=cfg.default_vg, default_thin_pool=cfg.default_thin_pool,
        default_wipe=cfg.delete_wipe.value, capability_fs_types=[], has_mount=True)
    assert parsed.fs_type == "ext4"


def test_volume_snapshot_class_parameters_are_accepted_by_the_driver(
    base: tuple[Obj, ...],
) -> None:
    check_snapshot_params(one(base, "VolumeSnapshotClass").get("parameters", {}))


def test_examples_use_the_storage_class_and_the_drivers_default_vg(kubectl: str) -> None:
    objs = render(DEPLOY / "examples")
    pvc = one(objs, "PersistentVolumeClaim")
    assert pvc["spec"]["storageClassName"] == "csi-local-lvm"
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert pvc["spec"]["resources"]["requests"]["storage"] == "50Mi"
    deployment = one(objs, "Deployment")
    claims = [v["persistentVolumeClaim"]["claimName"] for v in pod_spec(deployment)["volumes"]
              if "persistentVolumeClaim" in v]
    assert claims == [pvc["metadata"]["name"]]
    assert deployment["metadata"]["namespace"] == pvc["metadata"]["namespace"]
    cm = one(objs, "ConfigMap", str(nrm_default("configmap_name")))
    assert cm["metadata"]["namespace"] == nrm_default("configmap_namespace")
    topology = yaml.safe_load(cm["data"][str(nrm_default("configmap_key"))])
    entries = topology["volumegroup"] if isinstance(topology, dict) else topology
    assert [e["name"] for e in entries] == [CsiConfig(node_id="n").default_vg]


def example_topology() -> str:
    cm = yaml.safe_load((DEPLOY / "examples" / "node-resource-topo.yaml").read_text())
    return str(cm["data"][str(nrm_default("configmap_key"))])


def test_example_topology_names_devices_that_match_no_disk_and_says_so() -> None:
    topology = yaml.safe_load(example_topology())
    devices = [d for e in topology["volumegroup"] for d in e["topology"]["devices"]]
    assert devices and all(d.startswith("/dev/disk/by-id/REPLACE-ME") for d in devices)
    for file in (DEPLOY / "examples" / "node-resource-topo.yaml",
                 DEPLOY / "examples" / "kustomization.yaml",
                 DEPLOY / "overlays" / "example" / "kustomization.yaml"):
        assert "REPLACE-ME" in file.read_text(), f"{rel(file)} does not tell to replace them"


def test_example_topology_applied_as_is_is_refused_and_touches_nothing(tmp_path: Path) -> None:
    topo = tmp_path / "topology.yaml"
    topo.write_text(example_topology())
    labels = f"{DEFAULT_GATE_KEY}=true,kubernetes.io/storagetype=lvm"
    result = subprocess.run(
        [sys.executable, "-m", "node_resource_manager", "--node-name", "edge-1",
         "--topology-file", str(topo), "--node-labels", labels, "--dry-run", "--no-log-json",
         "--state-dir", str(tmp_path / "state")],
        capture_output=True, text=True, timeout=60, check=False, cwd=ROOT)
    assert result.returncode == 2, result.stdout + result.stderr  # devices refused
    assert "/dev/disk/by-id/REPLACE-ME-1 does not exist" in result.stdout
    assert "nothing is changed" in result.stdout


# ------------------------------------------------------------------------------ sockets


def test_node_socket_paths_agree_between_plugin_sidecars_registrar_and_kubelet(
    base: tuple[Obj, ...],
) -> None:
    ds = node_ds(base)
    plugin = container(ds, "csi-lvm")
    endpoint = unix_path(our_config(plugin).endpoint)
    served = resolve(ds, plugin, endpoint)
    assert served is not None and served.kind == "hostPath", "the socket is not on the host"
    kubelet_plugin_dir = f"{KUBELET_DIR}/plugins/{DEFAULT_DRIVER_NAME}"
    assert posixpath.dirname(served.where) == kubelet_plugin_dir
    registrar = container(ds, "node-driver-registrar")
    assert flag(registrar, "--kubelet-registration-path") == served.where
    sidecars = [c for c in containers(ds) if has_flag(c, "--csi-address")]
    assert {c["name"] for c in sidecars} >= {"csi-provisioner", "csi-snapshotter",
                                             "node-driver-registrar", "livenessprobe"}
    for c in sidecars:
        address = flag(c, "--csi-address")
        assert address is not None
        seen = resolve(ds, c, address.removeprefix("unix://"))
        assert seen is not None and seen.where == served.where, (
            f"{c['name']} looks for the socket at {seen.where if seen else address}, "
            f"the plugin listens at {served.where}")
    registration = resolve(ds, registrar, "/registration")
    assert registration is not None and registration.where == REGISTRATION_DIR


def test_resizer_and_controller_instance_share_the_socket(base: tuple[Obj, ...]) -> None:
    dep = resizer(base)
    plugin = container(dep, "csi-lvm")
    cfg = our_config(plugin)
    assert cfg.mode is Mode.CONTROLLER
    served = resolve(dep, plugin, unix_path(cfg.endpoint))
    address = flag(container(dep, "csi-resizer"), "--csi-address")
    assert served is not None and address is not None
    seen = resolve(dep, container(dep, "csi-resizer"), address)
    assert seen is not None and seen.where == served.where and served.kind == "emptyDir"


# ------------------------------------------------------------------------------ mounts


@pytest.mark.parametrize("directory", STORAGE_DIRS, ids=rel)
def test_kubelet_dir_is_mounted_bidirectional_by_privileged_containers_only(
    kubectl: str, directory: Path
) -> None:
    for workload in pod_workloads(render(directory)):
        volumes = {v["name"]: v for v in pod_spec(workload).get("volumes", [])}
        for c in containers(workload):
            for m in c.get("volumeMounts", []):
                host = volumes[m["name"]].get("hostPath", {}).get("path", "")
                if posixpath.normpath(host) == KUBELET_DIR:
                    assert m.get("mountPropagation") == "Bidirectional", (
                        f"{c['name']} mounts {KUBELET_DIR} without Bidirectional propagation: "
                        "volumes it mounts would not reach kubelet and pods")
                if m.get("mountPropagation") == "Bidirectional":
                    assert c.get("securityContext", {}).get("privileged") is True, c["name"]


def test_plugin_sees_kubelet_paths_at_the_same_path_and_host_devices(
    base: tuple[Obj, ...],
) -> None:
    ds = node_ds(base)
    plugin = container(ds, "csi-lvm")
    target = f"{KUBELET_DIR}/pods/uid/volumes/kubernetes.io~csi/pvc-1/mount"
    seen = resolve(ds, plugin, target)
    assert seen is not None and seen.where == target
    for name in ("csi-lvm", "node-resource-manager"):
        c = container(ds, name)
        dev_dir = our_config(c).dev_dir if name == "node-resource-manager" else "/dev"
        dev = resolve(ds, c, f"{dev_dir}/sdb")
        assert dev is not None and dev.where == "/dev/sdb", f"{name} lacks the host's /dev"
        assert c.get("securityContext", {}).get("privileged") is True


def _lvm_in_host_mount_namespace(argv: list[str]) -> bool:
    return argv[:1] == ["nsenter"] and any(a.startswith("--mount=/proc/1/ns/mnt") for a in argv)


@pytest.mark.parametrize("directory", STORAGE_DIRS, ids=rel)
def test_agent_reads_the_hosts_dev_at_its_dev_dir_and_lvm_gets_paths_it_can_open(
    kubectl: str, directory: Path
) -> None:
    """--dev-dir is where the AGENT sees the host's /dev; LVM is always handed /dev/...
    paths, so where LVM runs (host namespace via nsenter, or this container) /dev must be the
    host's. The mount tables it reads are the host's only with hostPID, which the agent
    checks (--mount-namespace=hostpid)."""
    ds = node_ds(render(directory))
    agent = container(ds, "node-resource-manager")
    cfg = our_config(agent)
    seen = resolve(ds, agent, f"{cfg.dev_dir}/sdb")
    assert seen is not None and seen.kind == "hostPath" and seen.where == "/dev/sdb"
    assert cfg.host_paths().dev_disk.as_posix() == f"{cfg.dev_dir}/disk"
    if not _lvm_in_host_mount_namespace(cfg.lvm_command):
        lvm_view = resolve(ds, agent, "/dev/sdb")
        assert lvm_view is not None and lvm_view.where == "/dev/sdb", "LVM lacks the host /dev"
    assert pod_spec(ds)["hostPID"] is True and cfg.mount_namespace == "hostpid"
    assert "/proc/1/mountinfo" in cfg.mount_tables


# ------------------------------------------------------------------------------ flags


@pytest.mark.parametrize("directory", kustomization_dirs(), ids=rel)
def test_our_containers_flags_are_known_to_the_code(kubectl: str, directory: Path) -> None:
    for workload in pod_workloads(render(directory)):
        for c in containers(workload):
            if is_ours(c):
                our_config(c)  # raises on an unknown flag or a refused value


def test_flag_check_catches_a_misspelled_flag(base: tuple[Obj, ...]) -> None:
    plugin = dict(container(node_ds(base), "csi-lvm"))
    plugin["args"] = [*plugin["args"], "--metrics-adress=:1"]
    with pytest.raises(AssertionError, match="metrics-adress"):
        our_config(plugin)


def test_node_ids_come_from_the_node_name(base: tuple[Obj, ...]) -> None:
    ds = node_ds(base)
    assert our_config(container(ds, "csi-lvm")).node_id == "edge-node-1"
    assert our_config(container(ds, "node-resource-manager")).node_name == "edge-node-1"


def test_daemonset_runs_only_on_nodes_with_the_agents_gate_label(base: tuple[Obj, ...]) -> None:
    selector = pod_spec(node_ds(base))["nodeSelector"]
    assert selector == {DEFAULT_GATE_KEY: nrm_default("gate_label_value")}
    assert DEFAULT_GATE_KEY == "alibabacloud.com/edge-enable-localstorage"


def test_provisioner_runs_in_node_deployment_mode_with_capacity(base: tuple[Obj, ...]) -> None:
    prov = container(node_ds(base), "csi-provisioner")
    for required in ("--node-deployment", "--enable-capacity", "--strict-topology",
                     "--extra-create-metadata"):
        assert has_flag(prov, required), required
    assert not has_flag(prov, "--feature-gates")  # Topology is GA: on without a gate
    assert flag(prov, "--capacity-ownerref-level") == "1"  # the DaemonSet owns the capacities
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in prov["env"]}
    assert env == {"NODE_NAME": "spec.nodeName", "NAMESPACE": "metadata.namespace",
                   "POD_NAME": "metadata.name"}


def test_snapshotter_runs_distributed(base: tuple[Obj, ...]) -> None:
    snap = container(node_ds(base), "csi-snapshotter")
    assert has_flag(snap, "--node-deployment")
    assert {e["name"] for e in snap["env"]} == {"NODE_NAME"}


def test_both_lvm_users_run_the_same_lvm_and_nsenter_has_the_host_pid_namespace(
    base: tuple[Obj, ...],
) -> None:
    ds = node_ds(base)
    # --ipc: libdevmapper's udev cookie semaphore must live where the host's udevd sees it.
    host_lvm = ["nsenter", "--mount=/proc/1/ns/mnt", "--ipc=/proc/1/ns/ipc", "--", "lvm"]
    commands = {our_config(container(ds, n)).lvm_command == host_lvm
                for n in ("csi-lvm", "node-resource-manager")}
    assert commands == {True}
    assert pod_spec(ds)["hostPID"] is True


@pytest.mark.parametrize("directory", STORAGE_DIRS, ids=rel)
def test_kubectl_exec_sees_the_same_node_and_lvm_as_the_containers_process(
    kubectl: str, directory: Path
) -> None:
    ds = node_ds(render(directory))
    agent = container(ds, "node-resource-manager")
    running = our_config(agent)
    # kubectl -n kube-system exec POD -c node-resource-manager -- node-resource-manager --dry-run
    execd = exec_config(agent, "node-resource-manager", "--dry-run")
    assert execd.node_name == running.node_name == FIELD_VALUES["spec.nodeName"]
    for name in ("lvm_command", "lvm_config", "lvm_extra_args", "dev_dir", "mount_namespace"):
        assert getattr(execd, name) == getattr(running, name), f"exec'd {name} differs"
    plugin = container(ds, "csi-lvm")
    execd = exec_config(plugin, "csi-lvm", "--endpoint=unix:///tmp/x.sock", "--node-id=n")
    running = our_config(plugin)
    assert (execd.lvm_command, execd.lvm_config) == (running.lvm_command, running.lvm_config)


def test_container_lvm_overlay_shares_lvm_state_between_both_lvm_users(kubectl: str) -> None:
    ds = node_ds(render(DEPLOY / "overlays" / "container-lvm"))
    for name in ("csi-lvm", "node-resource-manager"):
        c = container(ds, name)
        cfg = our_config(c)
        assert cfg.lvm_command == ["lvm"], name
        assert "udev_sync = 0" in cfg.lvm_config
        for path in ("/run/lvm", "/run/lock/lvm", "/etc/lvm/backup", "/etc/lvm/archive"):
            seen = resolve(ds, c, path)
            assert seen is not None and seen.where == path, f"{name}: {path} is not the host's"


def test_without_snapshots_overlay_has_no_snapshot_parts(kubectl: str) -> None:
    objs = render(DEPLOY / "overlays" / "without-snapshots")
    assert not find(objs, "VolumeSnapshotClass")
    assert not has_container(node_ds(objs), "csi-snapshotter")
    assert not [o for o in objs if o["kind"].endswith("Role") and "snapshotter" in
                o["metadata"]["name"]]
    assert has_container(node_ds(objs), "csi-provisioner")


# ------------------------------------------------------------------------------ probes, ports


@pytest.mark.parametrize("directory", kustomization_dirs(), ids=rel)
def test_probes_hit_declared_ports_and_host_ports_do_not_collide(
    kubectl: str, directory: Path
) -> None:
    for workload in pod_workloads(render(directory)):
        spec = pod_spec(workload)
        ports = [p for c in containers(workload) for p in c.get("ports", [])]
        numbers = [p["containerPort"] for p in ports]
        assert len(numbers) == len(set(numbers)), f"{workload['metadata']['name']}: {numbers}"
        for c in containers(workload):
            for probe, port in probe_ports(c):
                if isinstance(port, str):  # kubelet resolves a name in the probed container
                    assert port in own_ports(c), f"{c['name']} {probe}: no port named {port}"
                elif not spec.get("hostNetwork"):  # on the host network a number is enough
                    assert port in numbers, f"{c['name']} {probe}: port {port} undeclared"


PROBES = ("livenessProbe", "readinessProbe", "startupProbe")


def own_ports(c: Obj) -> dict[str, int]:
    """The container's own named ports: the only names kubelet resolves for its probes."""
    return {p["name"]: p["containerPort"] for p in c.get("ports", []) if "name" in p}


def probe_ports(c: Obj) -> list[tuple[str, int | str]]:
    return [(probe, c[probe]["httpGet"]["port"]) for probe in PROBES
            if "httpGet" in c.get(probe, {})]


def probe_port_number(c: Obj, port: int | str) -> int:
    return own_ports(c)[port] if isinstance(port, str) else port


def test_a_pod_wide_port_map_would_miss_a_name_declared_by_another_container() -> None:
    # the mistake this test file once made: a name declared by a sidecar is not the plugin's
    plugin = {"name": "p", "readinessProbe": {"httpGet": {"port": "probe"}}}
    sidecar = {"name": "s", "ports": [{"name": "probe", "containerPort": 9797}]}
    pod_wide = {**own_ports(plugin), **own_ports(sidecar)}
    assert "probe" in pod_wide and "probe" not in own_ports(plugin)


def test_our_metrics_endpoints_listen_on_their_declared_ports(base: tuple[Obj, ...]) -> None:
    for workload in (node_ds(base), resizer(base)):
        for c in containers(workload):
            if not is_ours(c):
                continue
            address = our_config(c).metrics_address
            assert address, f"{c['name']}: metrics endpoint disabled, probes would fail"
            port = int(address.rpartition(":")[2])
            assert port in [p["containerPort"] for p in c.get("ports", [])], c["name"]


def test_plugin_readiness_is_the_csi_probe_and_liveness_is_its_own_endpoint(
    base: tuple[Obj, ...],
) -> None:
    ds = node_ds(base)
    plugin = container(ds, "csi-lvm")
    sidecar = container(ds, "livenessprobe")
    readiness = probe_port_number(plugin, plugin["readinessProbe"]["httpGet"]["port"])
    assert listen_address(sidecar) == ("127.0.0.1", readiness)
    assert readiness in own_ports(sidecar).values()
    liveness = probe_port_number(plugin, plugin["livenessProbe"]["httpGet"]["port"])
    assert listen_address(plugin) == ("127.0.0.1", liveness)
    registrar = container(ds, "node-driver-registrar")
    port = probe_port_number(registrar, registrar["livenessProbe"]["httpGet"]["port"])
    assert listen_address(registrar) == ("127.0.0.1", port)


def listen_address(c: Obj) -> tuple[str, int] | None:
    """(host, port) a container's HTTP endpoint binds, as its process sees the flag."""
    if is_ours(c):
        address = our_config(c).metrics_address
    else:
        argv = expanded_argv(c)
        address = flag({"args": argv}, "--http-endpoint") or flag({"args": argv},
                                                                  "--metrics-address")
    if not address:
        return None
    host, _, port = address.rpartition(":")
    return host, int(port)


@pytest.mark.parametrize("directory", STORAGE_DIRS, ids=rel)
def test_host_network_http_endpoints_bind_loopback_or_by_option_the_node_ip(
    kubectl: str, directory: Path
) -> None:
    on_node_ip = directory.name == "metrics-on-node-ip"
    for workload in pod_workloads(render(directory)):
        if not pod_spec(workload).get("hostNetwork"):
            continue
        for c in containers(workload):
            bound = listen_address(c)
            if bound is None:
                continue
            expected = FIELD_VALUES["status.hostIP"] if on_node_ip else "127.0.0.1"
            assert bound[0] == expected, f"{rel(directory)} {c['name']} binds {bound}"
            for probe, port in probe_ports(c):
                host = c[probe]["httpGet"].get("host")
                # no host: kubelet probes the pod IP, which is the node IP on hostNetwork
                assert host == (None if on_node_ip else "127.0.0.1"), f"{c['name']} {probe}"
                assert probe_port_number(c, port) in {
                    p for other in containers(workload) if listen_address(other)
                    for p in [listen_address(other)[1]]}, f"{c['name']} {probe}: nobody listens"


# ------------------------------------------------------------------------------ sidecars

# The current release of each sidecar and the flags its command accepts at that tag, read from
# the published sources (cmd/*/main.go and the vendored csi-lib-utils standardflags) of
# github.com/kubernetes-csi/<repo>. Feature gates that are GA in that release are listed so
# that a manifest never passes one (a GA gate is locked on and is removed in a later release).
STANDARD_FLAGS = {"csi-address", "http-endpoint", "kube-api-burst", "kube-api-qps", "kubeconfig",
                  "leader-election", "leader-election-labels", "leader-election-lease-duration",
                  "leader-election-namespace", "leader-election-renew-deadline",
                  "leader-election-retry-period", "metrics-address", "metrics-path", "version"}
SIDECARS: dict[str, tuple[str, set[str], set[str]]] = {
    "csi-provisioner": ("v6.3.0", STANDARD_FLAGS | {
        "automaxprocs", "capacity-for-immediate-binding", "capacity-ownerref-level",
        "capacity-poll-interval", "capacity-threads", "cloning-protection-threads",
        "controller-publish-readonly", "default-fstype", "enable-capacity", "enable-pprof",
        "extra-create-metadata", "feature-gates", "immediate-topology",
        "kube-api-capacity-burst", "kube-api-capacity-qps", "node-deployment",
        "node-deployment-base-delay", "node-deployment-immediate-binding",
        "node-deployment-max-delay", "prevent-volume-mode-conversion", "retry-interval-max",
        "retry-interval-start", "snapshot-orphan-sweep-interval", "strict-topology", "timeout",
        "volume-name-prefix", "volume-name-uuid-length", "worker-threads"},
        {"Topology", "VolumeAttributesClass"}),
    "csi-snapshotter": ("v8.6.0", STANDARD_FLAGS | {
        "automaxprocs", "extra-create-metadata", "feature-gates", "groupsnapshot-name-prefix",
        "groupsnapshot-name-uuid-length", "node-deployment", "prevent-volume-mode-conversion",
        "resync-period", "retry-crd-interval-max", "retry-interval-max", "retry-interval-start",
        "snapshot-name-prefix", "snapshot-name-uuid-length", "timeout", "worker-threads"},
        set()),
    "csi-resizer": ("v2.2.1", STANDARD_FLAGS | {
        "automaxprocs", "extra-modify-metadata", "feature-gates", "handle-volume-inuse-error",
        "resync-period", "retry-interval-max", "retry-interval-start", "timeout", "workers"},
        set()),
    "csi-node-driver-registrar": ("v2.17.0", {
        "automaxprocs", "connection-timeout", "csi-address", "enable-pprof", "health-port",
        "http-endpoint", "kubelet-registration-path", "mode", "plugin-registration-path",
        "timeout", "version"}, set()),
    "livenessprobe": ("v2.19.0", {
        "automaxprocs", "csi-address", "health-port", "http-endpoint", "metrics-address",
        "metrics-path", "probe-timeout"}, set()),
}
# sidecars that call the driver with a per-call --timeout (the registrar and livenessprobe
# only call GetPluginInfo/Probe)
CALLS_THE_DRIVER = ("csi-provisioner", "csi-snapshotter", "csi-resizer")


def sidecars(objs: tuple[Obj, ...]) -> list[tuple[Obj, Obj]]:
    return [(w, c) for w in pod_workloads(objs) for c in containers(w)
            if c["image"].startswith(SIDECAR_REGISTRY)]


@pytest.mark.parametrize("directory", STORAGE_DIRS, ids=rel)
def test_sidecars_are_current_releases_and_pass_only_flags_they_have(
    kubectl: str, directory: Path
) -> None:
    seen = set()
    for _, c in sidecars(render(directory)):
        name, _, tag = c["image"].removeprefix(SIDECAR_REGISTRY).partition(":")
        release, known, ga_gates = SIDECARS[name]
        seen.add(name)
        assert tag == release, f"{name}:{tag}, current release is {release}"
        for arg in c.get("args", []):
            assert arg.startswith("--"), f"{name}: {arg}"
            key = arg[2:].partition("=")[0]
            assert key in known, f"{name} {release} has no flag --{key}"
        gates = (flag(c, "--feature-gates") or "").split(",")
        passed = {g.partition("=")[0] for g in gates if g}
        assert not passed & ga_gates, f"{name}: GA feature gates passed: {passed & ga_gates}"
    assert {"csi-provisioner", "csi-node-driver-registrar", "livenessprobe"} <= seen


@pytest.mark.parametrize("directory", STORAGE_DIRS, ids=rel)
def test_sidecar_timeouts_outlast_the_drivers_own_lvm_timeout(
    kubectl: str, directory: Path
) -> None:
    objs = render(directory)
    lvm_timeout = our_config(container(node_ds(objs), "csi-lvm")).lvm_timeout_seconds
    for _, c in sidecars(objs):
        if c["name"] not in CALLS_THE_DRIVER:
            continue
        timeout = flag(c, "--timeout")
        assert timeout is not None and timeout.endswith("s"), f"{c['name']}: {timeout}"
        # a sidecar that gives up first retries a call whose LVM command is still running
        assert float(timeout[:-1]) > lvm_timeout, f"{c['name']} --timeout={timeout}"


# ------------------------------------------------------------------------------ images


def image_component() -> dict[str, str]:
    doc = yaml.safe_load((DEPLOY / "components" / "image" / "kustomization.yaml").read_text())
    (entry,) = doc["images"]
    return dict(entry)


def test_image_tag_is_the_project_version() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert image_component()["newTag"] == version


@pytest.mark.parametrize("directory", kustomization_dirs(), ids=rel)
def test_images_are_single_sourced_and_pinned(kubectl: str, directory: Path) -> None:
    entry = image_component()
    ours = set()
    for workload in pod_workloads(render(directory)):
        for c in containers(workload):
            image = c["image"]
            if is_ours(c):
                ours.add(image)
                assert image.endswith(":" + entry["newTag"]), image
            elif image.startswith(SIDECAR_REGISTRY):
                assert re.search(r":v\d+\.\d+\.\d+$", image), f"sidecar not pinned: {image}"
            else:
                assert re.search(r":[\w.-]+$", image) and not image.endswith(":latest"), image
    assert len(ours) <= 1, f"{rel(directory)} uses several images of ours: {ours}"


def test_manifests_name_our_image_only_by_its_placeholder() -> None:
    placeholder = image_component()["name"]
    for file in DEPLOY.rglob("*.yaml"):
        if file.parent == DEPLOY / "components" / "image":
            continue
        for doc in yaml.safe_load_all(file.read_text()):
            for c in _containers_in(doc):
                if is_ours(c):
                    assert c["image"] == placeholder, f"{rel(file)}: {c['image']}"


def _containers_in(doc: object) -> list[Obj]:
    if not isinstance(doc, dict) or doc.get("kind") not in (
            "Pod", "Deployment", "DaemonSet", "StatefulSet"):
        return []
    return containers(doc)


def test_example_overlay_overrides_the_image_in_one_place(kubectl: str) -> None:
    images = {c["image"] for w in pod_workloads(render(DEPLOY / "overlays" / "example"))
              for c in containers(w) if is_ours(c)}
    assert images == {f"registry.example.com/mirror/edge-node-services:"
                      f"{image_component()['newTag']}"}


# ------------------------------------------------------------------------------ accounts


@pytest.mark.parametrize("directory", STORAGE_DIRS, ids=rel)
def test_service_accounts_and_role_references_resolve(kubectl: str, directory: Path) -> None:
    objs = render(directory)
    accounts = {(o["metadata"]["namespace"], o["metadata"]["name"])
                for o in find(objs, "ServiceAccount")}
    for workload in pod_workloads(objs):
        sa = pod_spec(workload).get("serviceAccountName")
        if sa is not None:
            assert (workload["metadata"]["namespace"], sa) in accounts
    roles = {("ClusterRole", None, o["metadata"]["name"]) for o in find(objs, "ClusterRole")}
    roles |= {("Role", o["metadata"]["namespace"], o["metadata"]["name"])
              for o in find(objs, "Role")}
    for binding in find(objs, "RoleBinding") + find(objs, "ClusterRoleBinding"):
        ref = binding["roleRef"]
        ns = binding["metadata"].get("namespace") if ref["kind"] == "Role" else None
        assert (ref["kind"], ns, ref["name"]) in roles, f"{binding['metadata']['name']}: {ref}"
        for subject in binding["subjects"]:
            assert (subject["namespace"], subject["name"]) in accounts


def test_expanded_argv_substitutes_downward_api_values(base: tuple[Obj, ...]) -> None:
    argv = expanded_argv(container(node_ds(base), "csi-lvm"))
    assert "--node-id=edge-node-1" in argv
