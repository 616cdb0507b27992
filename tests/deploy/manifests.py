"""Helpers for the deploy/ tests: render kustomizations, find objects, resolve paths in pods."""

from __future__ import annotations

import functools
import posixpath
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from edge_common.commands import run

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBECTL = shutil.which("kubectl")

Obj = dict[str, Any]


def kustomization_dirs() -> list[Path]:
    """Every buildable kustomization under deploy/ (components are built through their users)."""
    out = []
    for file in sorted(DEPLOY.rglob("kustomization.yaml")):
        doc = yaml.safe_load(file.read_text())
        if doc.get("kind") == "Component":
            continue
        out.append(file.parent)
    return out


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


@functools.cache
def render(directory: Path) -> tuple[Obj, ...]:
    """`kubectl kustomize DIR` parsed into objects (cached: rendering is the slow part)."""
    if KUBECTL is None:
        raise RuntimeError("kubectl is not installed")
    result = run([KUBECTL, "kustomize", str(directory)], timeout=120)
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    return tuple(docs)


def find(objs: tuple[Obj, ...] | list[Obj], kind: str, name: str | None = None) -> list[Obj]:
    return [o for o in objs if o.get("kind") == kind
            and (name is None or o["metadata"]["name"] == name)]


def one(objs: tuple[Obj, ...] | list[Obj], kind: str, name: str | None = None) -> Obj:
    found = find(objs, kind, name)
    assert len(found) == 1, f"expected exactly one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_spec(obj: Obj) -> Obj:
    if obj["kind"] == "Pod":
        return dict(obj["spec"])
    return dict(obj["spec"]["template"]["spec"])


def containers(obj: Obj) -> list[Obj]:
    spec = pod_spec(obj)
    return list(spec.get("initContainers", [])) + list(spec["containers"])


def container(obj: Obj, name: str) -> Obj:
    found = [c for c in containers(obj) if c["name"] == name]
    assert len(found) == 1, f"{obj['kind']} {obj['metadata']['name']} has no container {name}"
    return found[0]


def has_container(obj: Obj, name: str) -> bool:
    return any(c["name"] == name for c in containers(obj))


def flag(c: Obj, name: str) -> str | None:
    """The value of `--name=value` (or `--name value`) in a container's command + args."""
    argv = list(c.get("command", [])) + list(c.get("args", []))
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            return str(argv[i + 1])
        if arg.startswith(name + "="):
            return str(arg.split("=", 1)[1])
    return None


def has_flag(c: Obj, name: str) -> bool:
    argv = list(c.get("command", [])) + list(c.get("args", []))
    return any(a == name or a.startswith(name + "=") for a in argv)


def pod_workloads(objs: tuple[Obj, ...] | list[Obj]) -> Iterator[Obj]:
    for o in objs:
        if o.get("kind") in ("Pod", "Deployment", "DaemonSet", "StatefulSet", "Job"):
            yield o


@dataclass(frozen=True)
class Resolved:
    """Where a path inside a container really lives."""

    volume: str
    kind: str  # "hostPath", "emptyDir", ...
    host_path: str | None  # for hostPath volumes: the path on the node
    subpath: str  # below the volume's root
    mount: Obj

    @property
    def where(self) -> str:
        base = self.host_path if self.host_path is not None else f"<{self.kind} {self.volume}>"
        return posixpath.normpath(posixpath.join(base, self.subpath)) if self.subpath else (
            posixpath.normpath(base))


def resolve(obj: Obj, c: Obj, path: str) -> Resolved | None:
    """The volume (and the host path, for hostPath volumes) behind `path` in container `c`:
    the longest mountPath that contains it wins, as in the kernel."""
    best: Obj | None = None
    for m in c.get("volumeMounts", []):
        mp = posixpath.normpath(m["mountPath"])
        if path == mp or path.startswith(mp.rstrip("/") + "/"):
            if best is None or len(mp) > len(posixpath.normpath(best["mountPath"])):
                best = m
    if best is None:
        return None
    volumes = {v["name"]: v for v in pod_spec(obj).get("volumes", [])}
    vol = volumes[best["name"]]
    sub = posixpath.relpath(path, posixpath.normpath(best["mountPath"]))
    sub = "" if sub == "." else sub
    if best.get("subPath"):
        sub = posixpath.join(best["subPath"], sub) if sub else best["subPath"]
    if "hostPath" in vol:
        return Resolved(vol["name"], "hostPath", vol["hostPath"]["path"], sub, best)
    kind = next(k for k in vol if k != "name")
    return Resolved(vol["name"], kind, None, sub, best)


def unix_path(endpoint: str) -> str:
    """The filesystem path of a unix:///path endpoint (abstract sockets have none)."""
    assert endpoint.startswith("unix://"), endpoint
    path = endpoint[len("unix://"):]
    assert path.startswith("/") and not path.startswith("/@"), f"{endpoint}: not a socket file"
    return path


def rules_of(role: Obj) -> set[tuple[str, str, str, tuple[str, ...]]]:
    """A Role's rules as (apiGroup, resource, verb, resourceNames) tuples."""
    out = set()
    for rule in role.get("rules", []):
        names = tuple(sorted(rule.get("resourceNames", [])))
        for group in rule.get("apiGroups", []):
            for resource in rule.get("resources", []):
                for verb in rule.get("verbs", []):
                    out.add((group, resource, verb, names))
    return out
