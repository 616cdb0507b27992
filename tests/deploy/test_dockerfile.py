"""The Dockerfile, checked without a Docker engine: it parses, its stages hang together, every
path it copies exists in the build context (and is not dropped by .dockerignore), every package
the wheel needs is copied, and the commands it installs are the project's entry points."""

from __future__ import annotations

import importlib
import os
import re
import tomllib
from pathlib import Path

import pytest

from tests.deploy.commands import is_ours
from tests.deploy.dockerfile import (
    DockerfileError,
    ignore_patterns,
    is_ignored,
    parse,
)
from tests.deploy.manifests import ROOT, containers, pod_workloads

DOCKERFILE = ROOT / "Dockerfile"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SCRIPTS: dict[str, str] = PYPROJECT["project"]["scripts"]


def patterns() -> list[tuple[bool, str]]:
    return ignore_patterns((ROOT / ".dockerignore").read_text())


SKIP_DIRS = {".git", ".venv", ".mypy_cache", ".ruff_cache", ".pytest_cache", "dist", "build"}


def _walk(path: Path) -> list[Path]:
    """Files under `path`, never descending into the checkout's caches and virtualenv (a full
    walk of .venv alone takes minutes)."""
    if path.is_file():
        return [path]
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(path):
        if Path(dirpath) == ROOT:
            dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]
        out.extend(Path(dirpath) / name for name in filenames)
    return out


def build_context() -> set[str]:
    """Every file `COPY . .` sends to the builder (the checkout after .dockerignore)."""
    return set(context_files("."))


def context_files(source: str) -> list[str]:
    """The files a COPY source brings from the build context (after .dockerignore)."""
    ignored = patterns()
    rels = sorted(str(p.relative_to(ROOT)) for p in _walk(ROOT / source))
    return [r for r in rels if not is_ignored(r, ignored)]


# ------------------------------------------------------------------------------ the parser


def test_parser_joins_continuations_and_drops_comments() -> None:
    df = parse("# syntax=docker/dockerfile:1\nARG BASE=debian:bookworm-slim\n"
               "FROM ${BASE} AS build\n# a comment\nRUN apt-get update \\\n"
               "  # inside\n  && apt-get install -y lvm2\n"
               "FROM build\nCOPY --from=build [\"/a b\", \"/c\"]\n")
    assert df.directives == {"syntax": "docker/dockerfile:1"}
    assert [s.image for s in df.stages] == ["debian:bookworm-slim", "build"]
    assert df.stages[0].runs() == ["apt-get update && apt-get install -y lvm2"]
    (copy,) = df.stages[1].copies()
    assert copy.sources == ("/a b",) and copy.dest == "/c" and copy.from_stage == "build"


@pytest.mark.parametrize("text", [
    "RUN true\n",  # before FROM
    "FROM x\nRUNN true\n",  # unknown instruction
    "FROM x\nRUN a \\\n",  # ends in a continuation
    "FROM x AS a\nFROM y AS a\n",  # duplicate stage name
    "FROM ${NOPE}\n",  # undefined variable
    "FROM x\nCOPY onlyone\n",  # no destination
])
def test_parser_rejects_broken_dockerfiles(text: str) -> None:
    with pytest.raises(DockerfileError):
        df = parse(text)
        for stage in df.stages:
            stage.copies()


def test_dockerignore_matcher_follows_dockers_rules() -> None:
    pats = ignore_patterns("# c\n.git\n**/__pycache__\n*.egg-info\nbuild\nedge_proto/csi\n"
                           "docs\n!docs/keep.md\n")
    assert is_ignored(".git/config", pats)
    assert is_ignored("kms_plugin/backends/__pycache__/x.pyc", pats)
    assert is_ignored("edge_proto/csi/v1/csi_pb2.py", pats)
    assert not is_ignored("edge_proto/generate.py", pats)
    assert not is_ignored("buildah/x", pats)
    assert is_ignored("docs/a.md", pats) and not is_ignored("docs/keep.md", pats)


# ------------------------------------------------------------------------------ the Dockerfile


def test_dockerfile_is_multi_stage_on_one_debian_bookworm_base() -> None:
    df = parse(DOCKERFILE.read_text())
    assert len(df.stages) >= 2
    assert df.global_args["BASE_IMAGE"] == "debian:bookworm-slim"  # the registry default
    for stage in df.stages:
        assert stage.image == "debian:bookworm-slim", stage.image  # `make image` swaps it
    names = [s.name for s in df.stages]
    assert len(set(names)) == len(names)


def test_copy_from_names_an_earlier_stage() -> None:
    df = parse(DOCKERFILE.read_text())
    for n, stage in enumerate(df.stages):
        earlier = {s.name for s in df.stages[:n]}
        for copy in stage.copies():
            if copy.from_stage is not None:
                assert copy.from_stage in earlier, f"line {copy.line}: --from={copy.from_stage}"


def test_every_copied_path_exists_in_the_build_context() -> None:
    df = parse(DOCKERFILE.read_text())
    for stage in df.stages:
        for copy in stage.copies():
            if copy.from_stage is not None:
                continue
            for source in copy.sources:
                assert (ROOT / source).exists(), f"line {copy.line}: {source} does not exist"
                if source != ".":
                    assert not is_ignored(source, patterns()), (
                        f"line {copy.line}: {source} is excluded by .dockerignore")
                assert context_files(source), f"line {copy.line}: {source} brings no file"


def test_build_context_holds_the_wheels_sources_and_nothing_else() -> None:
    context = build_context()
    includes = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {pattern.rstrip("*") for pattern in includes}
    for package in packages:
        assert f"{package}/__init__.py" in context, f"{package} is not in the build context"
    assert {"pyproject.toml", "setup.py", PYPROJECT["project"]["readme"],
            "edge_proto/generate.py"} <= context
    assert any(f.startswith("proto/") and f.endswith(".proto") for f in context)
    assert not any(f.startswith(("edge_proto/csi/", "edge_proto/kms/")) for f in context), (
        "generated stubs must be regenerated in the build, not copied")
    tops = {f.partition("/")[0] for f in context if "/" in f}
    assert tops == packages | {"proto"}, f"unexpected in the build context: {tops}"
    assert not any("__pycache__" in f or f.endswith(".pyc") for f in context)


def test_build_stage_installs_the_project_with_binary_wheels_only() -> None:
    df = parse(DOCKERFILE.read_text())
    build = df.stages[0]
    assert any(c.sources == (".",) and c.from_stage is None for c in build.copies())
    env = " ".join(i.args for i in build.instructions if i.keyword == "ENV")
    assert "PIP_ONLY_BINARY=:all:" in env  # no compiler in either stage
    runs = " ".join(build.runs())
    assert re.search(r"\bpip install \.(\s|$)", runs)
    assert not re.search(r"\b(gcc|g\+\+|build-essential|libc6-dev)\b", runs)


def test_runtime_stage_has_the_storage_tools_and_no_build_tools() -> None:
    df = parse(DOCKERFILE.read_text())
    runtime = df.stages[-1]
    runs = " ".join(runtime.runs())
    for package in ("python3", "lvm2", "thin-provisioning-tools", "e2fsprogs", "xfsprogs",
                    "util-linux", "mount", "cryptsetup-bin", "ca-certificates"):
        assert re.search(rf"(?<![\w-]){re.escape(package)}(?![\w-])", runs), package
    assert not re.search(r"\b(gcc|pip|python3-venv|python3-pip|qemu\S*|softhsm2?)\b",
                         runs.replace("/opt/edge-node-services/bin", ""))
    for command in SCRIPTS:
        assert f"{command} --version" in runs, f"the image build does not run {command}"
    copies = runtime.copies()
    assert [(c.from_stage, c.sources) for c in copies] == [
        (df.stages[0].name, ("/opt/edge-node-services",))], "runtime copies only the venv"


def test_entry_points_exist_and_are_callable() -> None:
    assert set(SCRIPTS) == {"csi-lvm", "node-resource-manager", "kms-plugin"}
    for command, target in SCRIPTS.items():
        module, _, func = target.partition(":")
        assert callable(getattr(importlib.import_module(module), func)), command


def test_manifests_run_only_commands_the_image_installs() -> None:
    from tests.deploy.manifests import KUBECTL, kustomization_dirs, render

    if KUBECTL is None:
        pytest.skip("kubectl is not installed")
    for directory in kustomization_dirs():
        for workload in pod_workloads(render(directory)):
            for c in containers(workload):
                if is_ours(c):
                    assert c["command"][0] in SCRIPTS, c["command"]
                elif c["image"].startswith("edge-node-services") or (
                        "edge-node-services" in c["image"]):
                    raise AssertionError(f"{c['name']} runs our image without a command")


PRODUCT_PACKAGES = {"edge_common", "edge_proto", "csi_lvm", "node_resource_manager", "kms_plugin"}
CHECKOUT_TOOLS = ("fake_kms", "tests", "edge_demo", "kernel_guest", "benchmarks")


def test_product_wheel_holds_the_services_and_no_checkout_tool() -> None:
    from setuptools import find_packages

    includes = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    found = find_packages(where=str(ROOT), include=includes)
    assert {name.partition(".")[0] for name in found} == PRODUCT_PACKAGES
    assert not [name for name in found if name.startswith(CHECKOUT_TOOLS)]
    ignored = patterns()
    for tool in CHECKOUT_TOOLS:
        assert is_ignored(f"{tool}/__init__.py", ignored), f"{tool}/ is in the build context"


def test_product_code_never_imports_a_checkout_tool() -> None:
    pattern = re.compile(rf"^\s*(from|import)\s+({'|'.join(CHECKOUT_TOOLS)})\b", re.M)
    for package in PRODUCT_PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            assert not pattern.search(path.read_text()), f"{path} imports a checkout tool"
