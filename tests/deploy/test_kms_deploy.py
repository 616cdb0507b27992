"""The KMS plugin's static pod and the EncryptionConfiguration: valid, and consistent with each
other and with the plugin's code (socket, probes, key file)."""

from __future__ import annotations

import copy
import posixpath
import re
from pathlib import Path

import pytest
import yaml

from kms_plugin.config import PluginConfig
from tests.deploy.commands import our_config
from tests.deploy.manifests import DEPLOY, Obj, container, one, pod_spec, resolve, unix_path
from tests.deploy.schemas import ENCRYPTION_CONFIGURATION_V1, errors

ENCRYPTION_CONFIG = DEPLOY / "kms" / "encryption-config.yaml"
READ_FIRST_CONFIG = DEPLOY / "kms" / "encryption-config-read-first.yaml"


def encryption_config(path: Path = ENCRYPTION_CONFIG) -> Obj:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert len(docs) == 1
    return dict(docs[0])


def test_read_first_configuration_reads_kms_but_writes_in_clear() -> None:
    # step 1 of enabling and of disabling encryption: the same kms provider, identity first
    read_first = encryption_config(READ_FIRST_CONFIG)
    assert not errors(read_first, ENCRYPTION_CONFIGURATION_V1)
    (entry,) = read_first["resources"]
    (final,) = encryption_config()["resources"]
    assert entry["resources"] == final["resources"]
    assert entry["providers"] == list(reversed(final["providers"]))
    assert entry["providers"][0] == {"identity": {}}


def plugin_pod(objs: tuple[Obj, ...]) -> tuple[Obj, Obj, PluginConfig]:
    pod = one(objs, "Pod", "kms-plugin")
    c = container(pod, "kms-plugin")
    return pod, c, our_config(c)


def test_static_pod_is_a_host_network_node_critical_pod(kms: tuple[Obj, ...]) -> None:
    pod, _, _ = plugin_pod(kms)
    spec = pod_spec(pod)
    assert spec["hostNetwork"] is True
    assert spec["priorityClassName"] == "system-node-critical"
    assert pod["metadata"]["namespace"] == "kube-system"


def test_probes_are_healthz_and_readyz_on_the_plugins_http_endpoint(
    kms: tuple[Obj, ...],
) -> None:
    _, c, cfg = plugin_pod(kms)
    assert cfg.metrics_port > 0
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        get = c[probe]["httpGet"]
        assert get["port"] == cfg.metrics_port, probe
        # hostNetwork: kubelet probes the node; a loopback-only endpoint needs host 127.0.0.1
        if cfg.metrics_address in ("127.0.0.1", "localhost"):
            assert get.get("host") == "127.0.0.1", probe


def test_http_endpoint_binds_loopback_by_default(kms: tuple[Obj, ...]) -> None:
    _, _, cfg = plugin_pod(kms)
    assert cfg.metrics_address == "127.0.0.1"


BINARY_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}


def quantity_bytes(text: str) -> int:
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi)", text)
    assert match, f"unexpected memory quantity {text!r}"
    return int(match.group(1)) * BINARY_UNITS[match.group(2)]


def test_static_pod_requests_the_memory_the_plugin_uses(kms: tuple[Obj, ...]) -> None:
    # resident memory is ~58 MiB idle and after a decrypt storm (docs/benchmarks.md)
    _, c, _ = plugin_pod(kms)
    request = quantity_bytes(c["resources"]["requests"]["memory"])
    assert request >= 64 * 2**20
    assert quantity_bytes(c["resources"]["limits"]["memory"]) >= request


def test_socket_and_keyring_live_on_host_paths(kms: tuple[Obj, ...]) -> None:
    pod, c, cfg = plugin_pod(kms)
    socket = resolve(pod, c, unix_path(cfg.endpoint))
    assert socket is not None and socket.kind == "hostPath"
    assert socket.where == unix_path(cfg.endpoint), "the apiserver must find it at the same path"
    assert cfg.backend == "local"
    keyring = resolve(pod, c, cfg.local_keyring)
    assert keyring is not None and keyring.kind == "hostPath"
    assert not keyring.mount.get("readOnly"), "kms-plugin rotate writes the keyring in place"


def test_static_pod_uses_the_plugins_defaults_so_commands_in_the_pod_need_no_flags(
    kms: tuple[Obj, ...],
) -> None:
    # `kubectl exec kms-plugin-NODE -- kms-plugin selftest|rotate|inspect` run with defaults
    _, _, cfg = plugin_pod(kms)
    defaults = PluginConfig()
    for name in ("endpoint", "backend", "local_keyring"):
        assert getattr(cfg, name) == getattr(defaults, name), name


def test_encryption_configuration_is_schema_valid() -> None:
    assert errors(encryption_config(), ENCRYPTION_CONFIGURATION_V1) == []


def test_encryption_configuration_encrypts_secrets_with_kms_v2_then_identity(
    kms: tuple[Obj, ...],
) -> None:
    doc = encryption_config()
    (entry,) = doc["resources"]
    assert entry["resources"] == ["secrets"]
    kms_provider, identity = entry["providers"]
    assert identity == {"identity": {}}
    conf = kms_provider["kms"]
    assert conf["apiVersion"] == "v2"
    assert conf["name"]
    assert re.fullmatch(r"\d+s", conf["timeout"]) and int(conf["timeout"][:-1]) <= 10
    _, _, cfg = plugin_pod(kms)
    assert conf["endpoint"] == cfg.endpoint, "kube-apiserver would dial a socket nobody serves"
    assert posixpath.isabs(unix_path(conf["endpoint"]))


@pytest.mark.parametrize("change, why", [
    (lambda d: d["resources"][0]["providers"][0]["kms"].update(cachesize=1000),
     "cachesize is KMS v1 only"),
    (lambda d: d["resources"][0]["providers"][0]["kms"].pop("name"), "name is required"),
    (lambda d: d["resources"][0]["providers"][0]["kms"].update(name="a:b"), "':' in the name"),
    (lambda d: d["resources"][0]["providers"][0]["kms"].update(endpoint="/run/kms.sock"),
     "endpoint must be unix://"),
    (lambda d: d["resources"][0]["providers"][0]["kms"].update(timeout="3"), "timeout unit"),
    (lambda d: d["resources"][0]["providers"][0].update(identity={}), "two providers in one"),
    (lambda d: d["resources"][0].update(provider=[]), "misspelled field"),
    (lambda d: d.update(apiVersion="apiserver.config.k8s.io/v1beta1"), "old apiVersion"),
    (lambda d: d["resources"][0].update(resources=[]), "no resources"),
])
def test_encryption_configuration_schema_rejects(change: object, why: str) -> None:
    broken = copy.deepcopy(encryption_config())
    assert callable(change)
    change(broken)
    assert errors(broken, ENCRYPTION_CONFIGURATION_V1), why


def test_operations_doc_mounts_the_socket_directory_into_kube_apiserver(
    kms: tuple[Obj, ...],
) -> None:
    _, _, cfg = plugin_pod(kms)
    text = (DEPLOY.parent / "docs" / "operations.md").read_text()
    socket_dir = posixpath.dirname(unix_path(cfg.endpoint))
    # the kubeadm ClusterConfiguration and the RKE2 config of the guide mount it
    assert f"hostPath: {socket_dir}" in text and f"mountPath: {socket_dir}" in text
    assert f"- {socket_dir}:{socket_dir}" in text
    assert "--encryption-provider-config=/etc/kubernetes/enc/encryption-config.yaml" in text
