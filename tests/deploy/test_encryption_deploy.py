"""What a cluster needs for `encrypted: "true"`, checked against the code: deploy/components/
encryption (through deploy/overlays/encryption) gives the node plugin its backends file, the
files that file names, the host's /dev/mapper and cryptsetup locks, and the StorageClass
csi-local-lvm-encrypted; the base install has none of it (it must start without the Secret).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest
import yaml

from csi_lvm import cryptsetup
from csi_lvm.config import CsiConfig
from csi_lvm.encryption import CTX_ENCRYPTED, CTX_KEY_BACKEND, dm_crypt_problem
from csi_lvm.params import parse_volume_params
from csi_lvm.volume_keys import BackendsFile, KeyBackends, parse_backends
from tests.deploy.commands import our_config
from tests.deploy.manifests import DEPLOY, Obj, container, find, one, pod_spec, render, resolve

OVERLAY = DEPLOY / "overlays" / "encryption"
CONFIGMAP = "csi-lvm-encryption"
SECRET = "csi-lvm-encryption-keys"
CLASS = "csi-local-lvm-encrypted"
PKCS11_DIR = "/var/lib/csi-lvm/pkcs11"
#: backend options that name a file holding a key, a PIN or a credential: the Secret's
FILE_OPTIONS = {"keyring", "pin_file", "credentials_file"}
#: options that would put a secret itself into the ConfigMap
INLINE_SECRETS = {"access_key_id", "secret_access_key", "session_token", "pin"}


@pytest.fixture
def enc(kubectl: str) -> tuple[Obj, ...]:
    return render(OVERLAY)


def plugin_of(objs: tuple[Obj, ...]) -> tuple[Obj, Obj]:
    ds = one(objs, "DaemonSet", "csi-lvm-node")
    return ds, container(ds, "csi-lvm")


def shipped_backends(objs: tuple[Obj, ...]) -> tuple[str, BackendsFile]:
    """The backends file the plugin reads (through its volume mounts), parsed by the driver."""
    ds, plugin = plugin_of(objs)
    path = our_config(plugin).encryption_backends_file
    assert path, "the plugin has no encryption_backends_file"
    seen = resolve(ds, plugin, path)
    assert seen is not None and seen.kind == "configMap", f"{path} is not from a ConfigMap"
    volume = next(v for v in pod_spec(ds)["volumes"] if v["name"] == seen.volume)
    cm = one(objs, "ConfigMap", volume["configMap"]["name"])
    assert cm["metadata"]["namespace"] == ds["metadata"]["namespace"]
    text = cm["data"][seen.subpath]
    return text, parse_backends(yaml.safe_load(text), f"ConfigMap {CONFIGMAP}")


def misplaced(ds: Obj, plugin: Obj, spec: BackendsFile) -> list[str]:
    """Every way the backends' options break the rule: files with keys, PINs and credentials
    come from the Secret, a PKCS#11 module from the host's PKCS#11 directory, and no secret
    is written inline."""
    volumes = {v["name"]: v for v in pod_spec(ds)["volumes"]}
    problems = []
    for name, backend in spec.backends.items():
        for option, value in backend.options.items():
            if option in INLINE_SECRETS:
                problems.append(f"{name}: {option} inline")
            if option not in FILE_OPTIONS | {"module"}:
                continue
            seen = resolve(ds, plugin, str(value))
            if seen is None:
                problems.append(f"{name}: {option} {value} is in no volume")
            elif option == "module":
                if seen.host_path != PKCS11_DIR:
                    problems.append(f"{name}: module {value} is not under {PKCS11_DIR}")
            elif volumes[seen.volume].get("secret", {}).get("secretName") != SECRET \
                    or not seen.subpath:
                problems.append(f"{name}: {option} {value} is not a file of Secret {SECRET}")
    return problems


# ------------------------------------------------------------------------------ the backends


def test_plugin_reads_its_backends_file_from_the_configmap(enc: tuple[Obj, ...]) -> None:
    _, spec = shipped_backends(enc)
    assert spec.default in spec.backends
    assert spec.backends[spec.default].type == "local"


def test_every_file_a_shipped_backend_names_is_a_file_of_the_secret(
        enc: tuple[Obj, ...]) -> None:
    ds, plugin = plugin_of(enc)
    _, spec = shipped_backends(enc)
    assert misplaced(ds, plugin, spec) == []
    seen = resolve(ds, plugin, str(spec.backends[spec.default].options["keyring"]))
    assert seen is not None
    (keys,) = [v for v in pod_spec(ds)["volumes"] if v["name"] == seen.volume]
    # the local backend refuses a keyring group or others can read
    assert keys["secret"]["defaultMode"] & 0o077 == 0
    mounts = {m["mountPath"]: m for m in plugin["volumeMounts"]}
    assert mounts["/etc/csi-lvm/keys"].get("readOnly") is True


def test_the_placement_check_catches_secrets_in_the_wrong_place(enc: tuple[Obj, ...]) -> None:
    ds, plugin = plugin_of(enc)
    bad = parse_backends({"backends": {
        "a": {"type": "local", "keyring": "/etc/csi-lvm/config/keyring.json"},
        "b": {"type": "pkcs11", "module": "/usr/lib/softhsm/libsofthsm2.so", "token_label": "t",
              "key_label": "k", "pin_file": "/etc/csi-lvm/keys/pin"},
        "c": {"type": "awskms", "key_id": "k", "secret_access_key": "x"}}})
    problems = misplaced(ds, plugin, bad)
    assert any(p.startswith("a: keyring") for p in problems)
    assert any(p.startswith("b: module") for p in problems)
    assert any(p.startswith("c: secret_access_key inline") for p in problems)
    assert not any(p.startswith("b: pin_file") for p in problems)


# ------------------------------------------------------------------------------ the class


def test_encrypted_storage_class_is_accepted_and_names_a_configured_backend(
        enc: tuple[Obj, ...]) -> None:
    sc = one(enc, "StorageClass", CLASS)
    plain = one(enc, "StorageClass", "csi-local-lvm")
    assert sc["provisioner"] == plain["provisioner"]
    for key in ("volumeBindingMode", "allowVolumeExpansion", "reclaimPolicy"):
        assert sc[key] == plain[key], key
    params = sc["parameters"]
    assert params[CTX_ENCRYPTED] == "true"
    cfg = CsiConfig(node_id="n")
    parsed = parse_volume_params(
        {**params, "csi.storage.k8s.io/pvc/name": "p"}, default_vg=cfg.default_vg,
        default_thin_pool=cfg.default_thin_pool, default_wipe=cfg.delete_wipe.value,
        capability_fs_types=[], has_mount=True)
    assert parsed.encrypted and parsed.key_backend == params[CTX_KEY_BACKEND]
    _, spec = shipped_backends(enc)
    assert KeyBackends(spec).resolve_name(params[CTX_KEY_BACKEND]) == params[CTX_KEY_BACKEND]


# ------------------------------------------------------------------------------ cryptsetup


def test_cryptsetup_in_the_plugin_sees_the_hosts_dev_mapper_and_locks_without_host_ipc(
        enc: tuple[Obj, ...]) -> None:
    """cryptsetup runs in the plugin's container: the mapping's node must appear in the host's
    /dev/mapper (kubelet's targets and the host see it), its locks must be the host's. LVM
    enters the host's IPC namespace for libdevmapper's udev cookie; cryptsetup needs none
    because the driver runs it with udev disabled (libdevmapper makes the node itself)."""
    ds, plugin = plugin_of(enc)
    assert plugin["securityContext"]["privileged"] is True
    node = resolve(ds, plugin, "/dev/mapper/csi-crypt-vg-lv")
    assert node is not None and node.kind == "hostPath" and node.where == \
        "/dev/mapper/csi-crypt-vg-lv"
    locks = resolve(ds, plugin, "/run/cryptsetup/L_253:0")
    assert locks is not None and locks.kind == "hostPath" and locks.where == \
        "/run/cryptsetup/L_253:0"
    # dm_crypt_problem() looks for the host kernel's dm-crypt module (the image has none):
    # without the host's modules a node whose dm_crypt is not loaded yet refuses every volume
    module = "/lib/modules/6.1.0-1-amd64/kernel/drivers/md/dm-crypt.ko"
    assert inspect.signature(dm_crypt_problem).parameters["modules_root"].default == \
        Path("/lib/modules")
    seen = resolve(ds, plugin, module)
    assert seen is not None and seen.kind == "hostPath" and seen.where == module
    assert cryptsetup.Cryptsetup().binary == "cryptsetup"  # the image's, no nsenter prefix
    assert cryptsetup._ENV.get("DM_DISABLE_UDEV") == "1", (
        "cryptsetup would wait on a udev cookie the host's udevd cannot see from this IPC "
        "namespace: run it with udev disabled or through nsenter --ipc")


# ------------------------------------------------------------------------------ the base


def test_base_install_has_no_encryption_parts_and_starts_without_the_secret(
        base: tuple[Obj, ...]) -> None:
    ds, plugin = plugin_of(base)
    assert our_config(plugin).encryption_backends_file == ""
    assert not [v for v in pod_spec(ds)["volumes"] if "secret" in v]
    assert not [sc for sc in find(base, "StorageClass")
                if sc.get("parameters", {}).get(CTX_ENCRYPTED) == "true"]


def test_encryption_overlay_changes_only_the_plugin_container(
        base: tuple[Obj, ...], enc: tuple[Obj, ...]) -> None:
    def containers_by_name(objs: tuple[Obj, ...]) -> dict[str, Any]:
        ds = one(objs, "DaemonSet", "csi-lvm-node")
        return {c["name"]: c for c in pod_spec(ds)["containers"]}

    before, after = containers_by_name(base), containers_by_name(enc)
    assert before.keys() == after.keys()
    for name in before:
        if name != "csi-lvm":
            assert before[name] == after[name], name
