"""Every kustomization renders, and every object it renders is valid for the oldest and the
newest Kubernetes we support (kubernetes-validate's OpenAPI schemas, strict: unknown fields are
errors; our own schema for the VolumeSnapshotClass CRD)."""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import pytest
from kubernetes_validate import utils as kv

from tests.deploy.manifests import DEPLOY, Obj, kustomization_dirs, rel, render
from tests.deploy.schemas import errors, own_schema_for

OLDEST_SUPPORTED = "1.27"
NEWEST = kv.latest_version()
VERSIONS = [OLDEST_SUPPORTED, NEWEST]
DIRS = kustomization_dirs()
# APIs that are GA later than OLDEST_SUPPORTED: validated from that version on; older clusters
# use deploy/overlays/before-1.30, which renders none of them.
SINCE = {
    ("admissionregistration.k8s.io/v1", "ValidatingAdmissionPolicy"): "1.30",
    ("admissionregistration.k8s.io/v1", "ValidatingAdmissionPolicyBinding"): "1.30",
}


def _minor(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


def exists_in(obj: Obj, version: str) -> bool:
    since = SINCE.get((obj.get("apiVersion", ""), obj.get("kind", "")))
    return since is None or _minor(version) >= _minor(since)


def validation_errors(obj: Obj, version: str) -> list[str]:
    """[] when obj is valid for that Kubernetes version; else what is wrong."""
    return list(_validation_errors(json.dumps(obj, sort_keys=True), version))


@functools.lru_cache(maxsize=512)
def _validation_errors(text: str, version: str) -> tuple[str, ...]:
    # cached by content: the overlays render mostly the same objects as the base
    obj = json.loads(text)
    schema = own_schema_for(obj)
    if schema is not None:
        return tuple(errors(obj, schema))
    try:
        kv.validate(obj, version, strict=True)
    except kv.ValidationError as exc:
        path = ".".join(str(p) for p in exc.path)
        return (f"{path}: {exc.message}",)
    except kv.SchemaNotFoundError as exc:
        return (f"no schema: {exc.message} (add one to tests/deploy/schemas.py if it is a CRD)",)
    return ()


def describe(obj: Obj) -> str:
    meta = obj.get("metadata", {})
    ns = meta.get("namespace")
    return f"{obj.get('kind')} {ns + '/' if ns else ''}{meta.get('name')}"


def test_the_supported_versions_are_shipped_by_kubernetes_validate() -> None:
    shipped = kv.all_versions()
    assert any(v.startswith(OLDEST_SUPPORTED + ".") for v in shipped), shipped


def test_deploy_has_the_kustomizations_the_docs_name() -> None:
    names = {rel(d) for d in DIRS}
    assert {"deploy", "deploy/storage", "deploy/kms", "deploy/examples",
            "deploy/overlays/example", "deploy/overlays/without-snapshots",
            "deploy/overlays/container-lvm"} <= names


@pytest.mark.parametrize("directory", DIRS, ids=rel)
def test_kustomization_renders(kubectl: str, directory: Path) -> None:
    objs = render(directory)
    assert objs, f"{rel(directory)} rendered nothing"
    keys = [(o["apiVersion"].split("/")[0] if "/" in o["apiVersion"] else "", o["kind"],
             o["metadata"].get("namespace"), o["metadata"]["name"]) for o in objs]
    duplicates = {k for k in keys if keys.count(k) > 1}
    assert not duplicates, f"{rel(directory)}: objects rendered twice: {duplicates}"


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("directory", DIRS, ids=rel)
def test_every_rendered_object_is_valid_for_kubernetes(
    kubectl: str, directory: Path, version: str
) -> None:
    problems = {}
    for obj in render(directory):
        if not exists_in(obj, version):
            continue  # newer API: validated against NEWEST
        found = validation_errors(obj, version)
        if found:
            problems[describe(obj)] = found
    assert not problems, f"{rel(directory)} against Kubernetes {version}: {problems}"


@pytest.mark.parametrize("version", VERSIONS)
def test_validation_catches_a_misspelled_field(base: tuple[Obj, ...], version: str) -> None:
    daemonset = copy.deepcopy(next(o for o in base if o["kind"] == "DaemonSet"))
    daemonset["spec"]["template"]["spec"]["containers"][0]["volumeMount"] = []
    assert validation_errors(daemonset, version)


@pytest.mark.parametrize("version", VERSIONS)
def test_validation_catches_a_wrong_type(base: tuple[Obj, ...], version: str) -> None:
    driver = copy.deepcopy(next(o for o in base if o["kind"] == "CSIDriver"))
    driver["spec"]["attachRequired"] = "false"
    assert validation_errors(driver, version)


def test_volume_snapshot_class_schema_rejects_what_the_crd_rejects(base: tuple[Obj, ...]) -> None:
    vsc = next(o for o in base if o["kind"] == "VolumeSnapshotClass")
    assert validation_errors(vsc, NEWEST) == []
    for change in (
        lambda o: o.pop("driver"),
        lambda o: o.update(deletionPolicy="delete"),
        lambda o: o.update(parameter={}),
        lambda o: o["parameters"].update(snapshotSize=100),
    ):
        broken = copy.deepcopy(vsc)
        change(broken)
        assert validation_errors(broken, NEWEST), broken


def test_before_1_30_overlay_renders_only_apis_the_oldest_supported_version_has(
    kubectl: str,
) -> None:
    newer = [describe(o) for o in render(DEPLOY / "overlays" / "before-1.30")
             if not exists_in(o, OLDEST_SUPPORTED)]
    assert newer == []
    assert [describe(o) for o in render(DEPLOY) if not exists_in(o, OLDEST_SUPPORTED)] == [
        "ValidatingAdmissionPolicy csi-lvm-node-own-node-status",
        "ValidatingAdmissionPolicyBinding csi-lvm-node-own-node-status"]
