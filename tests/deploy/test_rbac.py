"""RBAC grants exactly what the code calls.

Two angles on the node agent, so that neither the manifests nor the code can change alone:
statically, every API request in node_resource_manager/ (official client calls or raw REST
paths, tests/deploy/kube_calls.py) must equal the agent's roles; dynamically, the real agent runs
against the fake API server and every request it makes must be authorized by those roles, the
way kube-apiserver's RBAC authorizer decides (namespaces, resourceNames, field selectors)."""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from csi_lvm.config import CsiConfig
from node_resource_manager.config import DEFAULT_GATE_KEY, NrmConfig
from tests.deploy.commands import our_config
from tests.deploy.kube_calls import (
    Permission,
    literal_namespaces,
    package_files,
    permission,
    permissions_needed,
    rest_calls,
)
from tests.deploy.manifests import ROOT, Obj, container, find, one, pod_spec, rules_of

NRM_COMPONENT = "node-resource-manager"
# The agent posts its Events through the Event sink the services share.
NRM_FILES = [*package_files(ROOT / "node_resource_manager"), ROOT / "edge_common" / "events.py"]


def nrm_roles(objs: tuple[Obj, ...]) -> list[Obj]:
    return [o for o in objs if o["kind"] in ("Role", "ClusterRole")
            and o["metadata"].get("labels", {}).get("app.kubernetes.io/component")
            == NRM_COMPONENT]


def granted(roles: list[Obj]) -> set[Permission]:
    out = set()
    for role in roles:
        namespaced = role["kind"] == "Role"
        for group, resource, verb, _ in rules_of(role):
            out.add(Permission(group, resource, verb, namespaced))
    return out


def authorizes(roles: list[Obj], *, verb: str, group: str, resource: str, namespace: str,
               name: str, field_selector: str = "") -> bool:
    """kube-apiserver's RBAC decision for one request, given these roles are bound."""
    selected = {part.split("=", 1)[1] for part in field_selector.split(",")
                if part.startswith("metadata.name=")}
    for role in roles:
        if role["kind"] == "Role" and role["metadata"]["namespace"] != namespace:
            continue
        for rule in role.get("rules", []):
            if not ({group, "*"} & set(rule.get("apiGroups", []))
                    and {resource, "*"} & set(rule.get("resources", []))
                    and {verb, "*"} & set(rule.get("verbs", []))):
                continue
            names = rule.get("resourceNames") or []
            if not names or name in names:
                return True
            if verb in ("list", "watch") and selected and selected <= set(names):
                return True
    return False


# ------------------------------------------------------------------------------ the scanners


def test_method_names_map_to_group_resource_and_verb() -> None:
    core, storage = client.CoreV1Api, client.StorageV1Api
    assert permission(core, "read_namespaced_config_map") == Permission(
        "", "configmaps", "get", True)
    assert permission(core, "list_namespaced_config_map", watched=True) == Permission(
        "", "configmaps", "watch", True)
    assert permission(core, "list_node") == Permission("", "nodes", "list", False)
    assert permission(core, "patch_node") == Permission("", "nodes", "patch", False)
    assert permission(core, "create_namespaced_event") == Permission("", "events", "create", True)
    assert permission(core, "replace_namespaced_persistent_volume_claim_status") == Permission(
        "", "persistentvolumeclaims/status", "update", True)
    assert permission(storage, "delete_namespaced_csi_storage_capacity") == Permission(
        "storage.k8s.io", "csistoragecapacities", "delete", True)


def test_scanner_finds_client_calls_and_functions_handed_to_a_watch(tmp_path: Path) -> None:
    source = tmp_path / "agent.py"
    source.write_text(textwrap.dedent("""
        from kubernetes import client, watch
        api = client.CoreV1Api()
        api.read_namespaced_secret("n", "ns")
        api.list_namespaced_pod("ns", watch=True)
        for event in watch.Watch().stream(api.list_node):
            api.patch_node_status("n", {})
    """))
    assert permissions_needed([source]) == {
        Permission("", "secrets", "get", True),
        Permission("", "pods", "watch", True),
        Permission("", "nodes", "watch", False),
        Permission("", "nodes/status", "patch", False),
    }


def test_scanner_follows_raw_rest_paths_through_helpers_and_parameters(tmp_path: Path) -> None:
    source = tmp_path / "agent.py"
    source.write_text(textwrap.dedent('''
        import threading
        NS = "kube-system"

        class Agent:
            def _pods(self):
                return f"/api/v1/namespaces/{self.ns}/pods"

            def run(self):
                self.api.request("GET", self._pods(), query={"fieldSelector": "x"})
                self.api.request("DELETE", f"/apis/apps/v1/namespaces/{NS}/deployments/{self.n}")
                self.api.request("PUT", "/api/v1/nodes/" + self.node + "/status", body={})
                threading.Thread(target=self._loop, args=("pods", self._pods())).start()

            def _loop(self, what, path):
                self._stream(path)

            def _stream(self, path):
                return self.api.watch(path, {}, timeout=5)
    '''))
    assert permissions_needed([source]) == {
        Permission("", "pods", "list", True),
        Permission("", "pods", "watch", True),
        Permission("apps", "deployments", "delete", True),
        Permission("", "nodes/status", "update", False),
    }
    assert literal_namespaces([source]) == {("apps", "deployments"): {"kube-system"}}


def test_scanner_refuses_a_request_whose_path_it_cannot_follow(tmp_path: Path) -> None:
    source = tmp_path / "agent.py"
    source.write_text("def f(api, paths):\n    api.request('GET', paths[0])\n")
    with pytest.raises(AssertionError, match="cannot tell which API path"):
        rest_calls([source])


def test_scanner_ignores_code_without_kubernetes_calls(tmp_path: Path) -> None:
    source = tmp_path / "other.py"
    source.write_text("things = {}\nthings.get('read_node')\nobj.list_node()\n")
    assert permissions_needed([source]) == set()


def test_rbac_decision_honours_namespaces_resource_names_and_field_selectors(
    base: tuple[Obj, ...],
) -> None:
    roles = nrm_roles(base)
    cm = dict(verb="list", group="", resource="configmaps", namespace="kube-system", name="")
    assert authorizes(roles, **cm, field_selector="metadata.name=node-resource-topo")
    assert not authorizes(roles, **cm)  # all ConfigMaps of kube-system: no
    assert not authorizes(roles, **{**cm, "namespace": "default"},
                          field_selector="metadata.name=node-resource-topo")
    assert not authorizes(roles, verb="get", group="", resource="secrets",
                          namespace="kube-system", name="node-resource-topo")


# ------------------------------------------------------------------------------ the agent


def test_node_agent_roles_grant_exactly_what_its_code_calls(base: tuple[Obj, ...]) -> None:
    needed = permissions_needed(NRM_FILES)
    assert needed, "found no Kubernetes API call in node_resource_manager/: scanner broken?"
    have = granted(nrm_roles(base))
    assert have == needed, (
        "deploy/storage/rbac-node.yaml and node_resource_manager/ disagree: "
        f"granted but never called {sorted(have - needed)}; "
        f"called but not granted {sorted(needed - have)}")


def test_node_agent_namespaced_grants_are_where_the_code_looks(base: tuple[Obj, ...]) -> None:
    defaults = NrmConfig.__dataclass_fields__
    where: dict[tuple[str, str], set[tuple[str, str | None, tuple[str, ...]]]] = {}
    for role in nrm_roles(base):
        for group, resource, _, names in rules_of(role):
            where.setdefault((group, resource), set()).add(
                (role["kind"], role["metadata"].get("namespace"), names))
    assert where[("", "configmaps")] == {
        ("Role", defaults["configmap_namespace"].default, (defaults["configmap_name"].default,))}
    for (group, resource), namespaces in literal_namespaces(NRM_FILES).items():
        assert {ns for _, ns, _ in where[(group, resource)]} == namespaces, resource
    assert where[("", "nodes")] == {("ClusterRole", None, ())}


def test_node_agent_roles_are_bound_to_the_daemonsets_service_account(
    base: tuple[Obj, ...],
) -> None:
    ds = one(base, "DaemonSet", "csi-lvm-node")
    account = ("kube-system", pod_spec(ds)["serviceAccountName"])
    bound = set()
    for binding in find(base, "RoleBinding") + find(base, "ClusterRoleBinding"):
        if any((s["namespace"], s["name"]) == account for s in binding["subjects"]):
            bound.add((binding["roleRef"]["kind"], binding["metadata"].get("namespace"),
                       binding["roleRef"]["name"]))
    for role in nrm_roles(base):
        ns = role["metadata"].get("namespace") if role["kind"] == "Role" else None
        assert (role["kind"], ns, role["metadata"]["name"]) in bound, role["metadata"]["name"]
    cfg = our_config(container(ds, "node-resource-manager"))
    assert not cfg.kubeconfig, "in the cluster the agent must use its service account"


def test_every_request_of_the_running_agent_is_authorized(
    base: tuple[Obj, ...], fake_kube: Any, tmp_path: Path
) -> None:
    """Run the real agent against the fake API server until it has read, watched, reported
    status and recorded an Event; every request it made must pass the RBAC decision."""
    roles = nrm_roles(base)
    ds = one(base, "DaemonSet", "csi-lvm-node")
    cfg = our_config(container(ds, "node-resource-manager"))
    node = "edge-node-1"
    fake_kube.put_node(node, labels={DEFAULT_GATE_KEY: "true", "kubernetes.io/storagetype": "lvm"})
    missing = f"/dev/disk/by-id/rbac-test-{uuid.uuid4().hex}"  # refused: nothing is touched
    fake_kube.set_configmap(cfg.configmap_namespace, cfg.configmap_name, {
        cfg.configmap_key: textwrap.dedent(f"""\
            volumegroup:
            - name: rbactest{uuid.uuid4().hex[:8]}
              key: kubernetes.io/storagetype
              operator: In
              value: lvm
              topology:
                type: device
                devices: [{missing}]
            """)})
    kubeconfig = fake_kube.write_kubeconfig(tmp_path / "kubeconfig")
    env = {k: v for k, v in os.environ.items() if not k.startswith("NRM_")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen(
        [sys.executable, "-m", "node_resource_manager", "--node-name", node,
         "--kubeconfig", str(kubeconfig), "--no-udev", "--state-dir", str(tmp_path / "state"),
         "--resync-seconds", "3600", "--log-level", "WARNING"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        fake_kube.wait_for_watch("configmaps", timeout=60)
        fake_kube.wait_for_watch("nodes", timeout=60)
        fake_kube.wait_for_requests("patch", "nodes", timeout=60)
        fake_kube.wait_for_requests("create", "events", timeout=60)
    except TimeoutError:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=30)
        raise AssertionError(f"the agent did not do its rounds: {err.decode()[-2000:]}") from None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
    made = [r for r in fake_kube.requests if r.resource]
    refused = []
    for r in made:
        resource = r.resource + (f"/{r.subresource}" if r.subresource else "")
        if not authorizes(roles, verb=r.verb, group=r.group, resource=resource,
                          namespace=r.namespace, name=r.name,
                          field_selector=r.query.get("fieldSelector", "")):
            refused.append(f"{r.method} {r.path}?{r.query} ({r.verb})")
    assert not refused, f"RBAC would refuse these requests of the agent: {refused}"
    used = {Permission(r.group, r.resource + (f"/{r.subresource}" if r.subresource else ""),
                       r.verb, bool(r.namespace)) for r in made}
    assert used <= permissions_needed(NRM_FILES), "the code scanner missed a request"


# ------------------------------------------------------------------------------ the others


def _roles_named(objs: tuple[Obj, ...], name: str) -> list[Obj]:
    return [o for o in objs if o["kind"] in ("Role", "ClusterRole")
            and o["metadata"]["name"] == name]


def test_csi_driver_calls_only_what_its_service_accounts_grant(base: tuple[Obj, ...]) -> None:
    # The controller-only csi-lvm (resizer Deployment) reads PVs and what the nodes publish;
    # if csi_lvm/ starts calling anything else, grant it and extend this test.
    needed = permissions_needed(package_files(ROOT / "csi_lvm"))
    assert needed == {Permission("", "persistentvolumes", "list", False),
                      Permission("storage.k8s.io", "csistoragecapacities", "list", True)}
    resizer = _roles_named(base, "csi-lvm-resizer")
    assert needed <= granted(resizer)
    namespace = CsiConfig.__dataclass_fields__["storage_capacity_namespace"].default
    assert {r["metadata"]["namespace"] for r in resizer if r["kind"] == "Role"} == {namespace}
    # The DaemonSet's csi-lvm posts Events on its Node through the shared sink
    # (edge_common/events.py); the service account it shares with csi-provisioner may create
    # Events.
    assert Permission("", "events", "create", False) in granted(
        _roles_named(base, "csi-lvm-provisioner"))


def test_kms_static_pod_does_not_enable_kubernetes_events(kms: tuple[Obj, ...]) -> None:
    # A static pod cannot use a ServiceAccount, so the plugin there has no API credentials.
    pod = one(kms, "Pod", "kms-plugin")
    cfg = our_config(container(pod, "kms-plugin"))
    assert cfg.kube_events is False
    assert "serviceAccountName" not in pod_spec(pod)


@pytest.mark.parametrize("package", ["node_resource_manager", "csi_lvm", "kms_plugin"])
def test_every_source_file_of_the_services_parses(package: str) -> None:
    for file in package_files(ROOT / package):
        ast.parse(file.read_text(), str(file))
