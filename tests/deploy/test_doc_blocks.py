"""Every command block of README.md and docs/operations.md is run here, by CI, or marked as
needing a live cluster; and the blocks marked as tested are run as written.

A block carries its mark on the line before its fence: ``<!-- check: KIND ... -->`` where KIND
is ``tested as NAME`` (a test below runs it, looked up by NAME), ``checked ... as NAME`` /
``rendered ... as NAME`` (a configuration block a test below parses or renders), ``tested-by
PATH`` (a test file elsewhere runs what it runs), ``ci`` (CI runs the line itself) or ``live
cluster``. Paths under /etc are mapped into a temporary directory; nothing else of a block is
changed. Tests marked ``image`` need the built image (`make image`) and containerd: they run
in the image stage (`make image-smoke`), not in `make unit`.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from edge_common.loopdisk import LoopDisk
from tests.deploy.commands import our_config
from tests.deploy.manifests import DEPLOY, ROOT, container, containers, one, pod_spec, render

DOCS = ("README.md", "docs/operations.md")
SHELL = ("sh", "bash", "shell", "console")
MARK = re.compile(r"<!-- check: (.+?) -->")
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
IMAGE = f"ghcr.io/edge-node-services/edge-node-services:{VERSION}"
ARCHIVE = ROOT / "dist" / f"edge-node-services-{VERSION}.docker.tar"
REGISTRY_IMAGE = f"registry.example.com/edge/edge-node-services:{VERSION}"


@dataclass(frozen=True)
class Block:
    doc: str
    line: int
    lang: str
    body: str  # dedented
    mark: str | None

    @property
    def name(self) -> str | None:
        m = re.search(r"\bas ([a-z0-9-]+)", self.mark or "")
        return m.group(1) if m else None


def blocks(doc: str) -> list[Block]:
    lines = (ROOT / doc).read_text().splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        m = re.fullmatch(r"(\s*)```(\w*)\s*", lines[i])
        if not m:
            i += 1
            continue
        indent, lang = m.group(1), m.group(2)
        prev = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        mark = MARK.search(prev)
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
        body = "\n".join(line[len(indent):] for line in lines[i + 1:end])
        out.append(Block(doc, i + 1, lang, body + "\n", mark.group(1) if mark else None))
        i = end + 1
    return out


def all_blocks() -> list[Block]:
    return [b for doc in DOCS for b in blocks(doc)]


def block(name: str) -> Block:
    found = [b for b in all_blocks() if b.name == name]
    assert found, f"no block marked `as {name}` in {DOCS}"
    bodies = {b.body for b in found}
    assert len(bodies) == 1, f"blocks named {name} differ"
    return found[0]


# The blocks the tests below run or check (kept in step with the docs by the first tests).
EXECUTED = {"import-containerd", "ctr-kms", "rotate-stage", "rotate-promote", "nrm-dry-run",
            "enc-read-first", "enc-write", "enc-read-first-again", "overlay-storage",
            "overlay-kms", "kubeadm-config", "k3s-config", "rke2-config", "csi-enc-keygen",
            "csi-enc-backends"}


# ------------------------------------------------------------------------------ the marks


def test_every_command_block_is_run_by_a_test_or_ci_or_marked_live() -> None:
    for b in all_blocks():
        if b.lang not in SHELL:
            continue
        where = f"{b.doc}:{b.line}"
        assert b.mark, f"{where}: a command block without a check mark"
        kind = b.mark.split()[0]
        assert kind in ("tested", "tested-by", "ci", "live"), f"{where}: unknown mark {b.mark}"
        if kind == "tested":
            assert b.name in EXECUTED, f"{where}: no test runs the block {b.name}"
        elif kind == "tested-by":
            path = ROOT / b.mark.split()[1]
            assert path.is_file(), f"{where}: {path} does not exist"
        elif kind == "ci":
            for line in command_lines(b.body):
                assert ci_runs(line), f"{where}: CI does not run `{line}`"
        else:
            assert b.mark.startswith("live cluster"), f"{where}: {b.mark}"


def test_no_indented_code_block_escapes_the_marks() -> None:
    for doc in DOCS:
        text = (ROOT / doc).read_text()
        outside = re.sub(r"```.*?```", "", text, flags=re.S)
        for line in outside.splitlines():
            assert not re.match(r"    +(kubectl|ctr|make|bash|kms-plugin|node-resource-manager|"
                                r"csi-lvm|install|cp) ", line), f"{doc}: `{line.strip()}`"


def test_every_named_block_exists_and_every_executed_name_is_in_the_docs() -> None:
    named = {b.name for b in all_blocks() if b.name}
    assert EXECUTED == named


def test_the_demo_block_is_what_the_demo_test_runs() -> None:
    (b,) = [b for b in all_blocks() if b.mark and b.mark.startswith("tested-by")]
    assert b.body.strip() == "bash scripts/demo.sh"
    assert "make demo" in (ROOT / "scripts" / "demo.sh").read_text()
    assert "$(PY) -m edge_demo" in (ROOT / "Makefile").read_text()
    assert '"-m", "edge_demo"' in (ROOT / "tests" / "demo" / "test_demo.py").read_text()


def command_lines(body: str) -> list[str]:
    return [line.split(" #", 1)[0].strip() for line in body.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def make_prerequisites(target: str) -> list[str]:
    m = re.search(rf"^{target}:(.*)$", (ROOT / "Makefile").read_text(), flags=re.M)
    return m.group(1).split() if m else []


def ci_runs(line: str) -> bool:
    ci = (ROOT / ".ci" / "run").read_text() + (ROOT / "scripts" / "test.sh").read_text()
    if line in ("bash scripts/test.sh",):
        return "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
    words = line.split()
    if words[:1] == ["make"] and len(words) == 2:
        target = words[1]
        run_by_ci = [w for ln in ci.splitlines() if ln.startswith("make ") for w in ln.split()[1:]]
        expanded = set(run_by_ci) | {p for t in run_by_ci for p in make_prerequisites(t)}
        # `make docs` changes nothing CI could see: test_docs.py fails when it would
        return target in expanded or target == "docs"
    return False


def test_mark_parser_reads_marks_and_ci_lines() -> None:
    assert ci_runs("make unit") and ci_runs("make image") and not ci_runs("make bench")
    assert ci_runs("bash scripts/test.sh") and not ci_runs("rm -rf /")


# ------------------------------------------------------------------------------ running blocks


def run_block(body: str, *, cwd: Path, etc: Path | None = None,
              env: dict[str, str] | None = None, timeout: float = 300) -> str:
    """Run a shell block as written; /etc/... maps to ETC/... when ``etc`` is given."""
    script = body if etc is None else re.sub(r"(?<![\w.-])/etc/", f"{etc}/", body)
    full_env = {**os.environ, **(env or {})}
    full_env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{full_env.get('PATH', '')}"
    full_env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{full_env.get('PYTHONPATH', '')}"
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, f"exit {done.returncode}:\n{script}\n{done.stdout}{done.stderr}"
    return done.stdout + done.stderr


def test_run_block_maps_etc_and_fails_loudly(tmp_path: Path) -> None:
    out = run_block("echo /etc/kms-plugin/keyring.json\n", cwd=tmp_path, etc=tmp_path)
    assert out.strip() == f"{tmp_path}/kms-plugin/keyring.json"
    with pytest.raises(AssertionError, match="exit 3"):
        run_block("exit 3\n", cwd=tmp_path)


@pytest.mark.skipif(os.geteuid() != 0, reason="loop devices need root")
def test_nrm_dry_run_block_plans_the_vg_on_a_loop_disk_and_changes_nothing(
    tmp_path: Path,
) -> None:
    with LoopDisk(tmp_path, 64 * 2**20) as disk:
        device = disk.device
        (tmp_path / "topo.yaml").write_text(yaml.safe_dump({"volumegroup": [{
            "name": "volumegroup1", "key": "kubernetes.io/storagetype", "operator": "In",
            "value": "lvm", "topology": {"type": "device", "devices": [device]}}]}))
        before = subprocess.run(["blkid", "-p", device], capture_output=True, timeout=30,
                                check=False)
        out = run_block(block("nrm-dry-run").body, cwd=tmp_path,
                        env={"NRM_STATE_DIR": str(tmp_path / "state")})
        after = subprocess.run(["blkid", "-p", device], capture_output=True, timeout=30,
                               check=False)
    assert "DRY RUN: nothing is changed." in out
    assert f"volume group volumegroup1: CREATE from {device}" in out
    assert before.returncode == after.returncode == 2, "the disk is no longer blank"
    assert not (tmp_path / "state").exists() or not any((tmp_path / "state").iterdir())


def test_encryption_config_blocks_install_read_first_then_write(tmp_path: Path) -> None:
    run_block(block("enc-read-first").body, cwd=ROOT, etc=tmp_path)
    installed = tmp_path / "kubernetes" / "enc" / "encryption-config.yaml"
    assert stat.S_IMODE(installed.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(installed.stat().st_mode) == 0o600
    providers = yaml.safe_load(installed.read_text())["resources"][0]["providers"]
    assert [next(iter(p)) for p in providers] == ["identity", "kms"]
    run_block(block("enc-write").body, cwd=ROOT, etc=tmp_path)
    providers = yaml.safe_load(installed.read_text())["resources"][0]["providers"]
    assert [next(iter(p)) for p in providers] == ["kms", "identity"]
    run_block(block("enc-read-first-again").body, cwd=ROOT, etc=tmp_path)  # disabling, step 1
    providers = yaml.safe_load(installed.read_text())["resources"][0]["providers"]
    assert [next(iter(p)) for p in providers] == ["identity", "kms"]


@pytest.mark.parametrize("name, kustomization", [("overlay-storage", "my-registry"),
                                                 ("overlay-kms", "my-registry-kms")])
def test_registry_overlay_blocks_rewrite_every_container_of_ours(
    kubectl: str, tmp_path: Path, name: str, kustomization: str
) -> None:
    deploy = tmp_path / "deploy"
    shutil.copytree(DEPLOY, deploy)
    overlay = deploy / "overlays" / kustomization
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(block(name).body)
    images = {c["image"] for w in render(overlay) if w.get("kind") in ("Pod", "DaemonSet",
                                                                        "Deployment")
              for c in containers(w) if c.get("command")}
    assert images == {REGISTRY_IMAGE}


def test_encrypted_volume_keygen_block_makes_the_key_the_secret_and_configmap_use(
    kubectl: str, tmp_path: Path
) -> None:
    """The keygen block, then the Secret block's key name, then a wrap and unwrap through
    the driver's backend layer with the ConfigMap's backends.yaml (its path into the Secret
    mapped onto the file made here, at the Secret's mode)."""
    from csi_lvm.volume_keys import KeyBackends, new_volume_secret, parse_backends
    from tests.deploy.test_encryption_deploy import OVERLAY, SECRET, shipped_backends

    run_block(block("csi-enc-keygen").body, cwd=tmp_path, etc=tmp_path)
    ring = tmp_path / "csi-lvm" / "keyring.json"
    assert stat.S_IMODE(ring.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(ring.stat().st_mode) == 0o600
    (secret_block,) = [b for b in all_blocks() if f"secret generic {SECRET}" in b.body]
    m = re.search(r"--from-file=([\w.-]+)=/etc/csi-lvm/keyring\.json", secret_block.body)
    assert m, secret_block.body
    text, spec = shipped_backends(render(OVERLAY))
    keyring = spec.backends[spec.default].options["keyring"]
    assert keyring == f"/etc/csi-lvm/keys/{m.group(1)}", "the Secret's key is not the file named"
    ring.chmod(0o400)  # the Secret volume's defaultMode
    local = parse_backends(yaml.safe_load(text.replace(str(keyring), str(ring))))
    backends = KeyBackends(local)
    secret = new_volume_secret()
    uuid = "0f5e5f1c-51f4-4fd3-9f0e-0d5c8a6d2b1e"
    try:
        wrapped = backends.wrap(spec.default, secret, uuid)
        assert backends.unwrap(wrapped, uuid) == secret
    finally:
        backends.close()


def test_encrypted_volume_backends_block_parses_and_puts_every_file_in_its_place(
    kubectl: str,
) -> None:
    from csi_lvm.volume_keys import parse_backends
    from tests.deploy.test_encryption_deploy import (
        OVERLAY,
        misplaced,
        plugin_of,
        shipped_backends,
    )

    documented = parse_backends(yaml.safe_load(block("csi-enc-backends").body))
    assert {b.type for b in documented.backends.values()} == {"local", "pkcs11", "awskms"}
    objs = render(OVERLAY)
    ds, plugin = plugin_of(objs)
    assert misplaced(ds, plugin, documented) == []
    _, shipped = shipped_backends(objs)  # what the ConfigMap ships is the documented default
    assert shipped.default == documented.default
    assert shipped.backends[shipped.default] == documented.backends[documented.default]


def kms_socket_dir(kms: tuple[dict, ...]) -> str:
    cfg = our_config(container(one(kms, "Pod", "kms-plugin"), "kms-plugin"))
    return os.path.dirname(cfg.endpoint.removeprefix("unix://"))


ENC_FILE = "/etc/kubernetes/enc/encryption-config.yaml"


def test_kubeadm_block_sets_the_flags_and_mounts_the_config_and_the_socket(
    kms: tuple[dict, ...],
) -> None:
    doc = yaml.safe_load(block("kubeadm-config").body)
    assert doc["kind"] == "ClusterConfiguration" and doc["apiVersion"] == "kubeadm.k8s.io/v1beta4"
    args = {a["name"]: a["value"] for a in doc["apiServer"]["extraArgs"]}
    assert args == {"encryption-provider-config": ENC_FILE,
                    "encryption-provider-config-automatic-reload": "true"}
    volumes = {v["mountPath"]: v for v in doc["apiServer"]["extraVolumes"]}
    enc = volumes[os.path.dirname(ENC_FILE)]
    assert enc["hostPath"] == enc["mountPath"] and enc["readOnly"] is True
    sock = volumes[kms_socket_dir(kms)]
    assert sock["hostPath"] == sock["mountPath"] and not sock.get("readOnly")
    for v in volumes.values():
        assert set(v) <= {"name", "hostPath", "mountPath", "readOnly", "pathType"}


def test_k3s_and_rke2_blocks_set_the_flags_and_rke2_mounts(kms: tuple[dict, ...]) -> None:
    wanted = [f"encryption-provider-config={ENC_FILE}",
              "encryption-provider-config-automatic-reload=true"]
    assert yaml.safe_load(block("k3s-config").body) == {"kube-apiserver-arg": wanted}
    rke2 = yaml.safe_load(block("rke2-config").body)
    assert rke2["kube-apiserver-arg"] == wanted
    socket_dir = kms_socket_dir(kms)
    enc_dir = os.path.dirname(ENC_FILE)
    assert sorted(rke2["kube-apiserver-extra-mount"]) == sorted(
        [f"{enc_dir}:{enc_dir}:ro", f"{socket_dir}:{socket_dir}"])


def test_ctr_dry_run_block_runs_the_agent_as_the_daemonset_does(base: tuple[dict, ...]) -> None:
    (b,) = [b for b in all_blocks() if "nrm-dry-run" in b.body]
    words = b.body.replace("\\\n", " ").split()
    ds = one(base, "DaemonSet", "csi-lvm-node")
    spec = pod_spec(ds)
    agent = container(ds, "node-resource-manager")
    assert "--privileged" in words and agent["securityContext"]["privileged"] is True
    assert "--net-host" in words and spec["hostNetwork"] is True
    assert "pid:/proc/1/ns/pid" in words and spec["hostPID"] is True
    env = dict(words[i + 1].split("=", 1) for i, w in enumerate(words) if w == "--env")
    ds_env = {e["name"]: e["value"] for e in agent["env"]
              if e["name"].startswith("NRM_") and "value" in e}
    assert env == ds_env, "the dry run would not see what the agent sees"
    mounts = {m.split(",")[2].removeprefix("dst="): m.split(",")[1].removeprefix("src=")
              for i, w in enumerate(words) if w == "--mount" for m in [words[i + 1]]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    for mount in agent["volumeMounts"]:
        host = volumes[mount["name"]].get("hostPath", {}).get("path")
        if host and mount["mountPath"] in ("/host/dev", "/run/udev"):
            assert mounts[mount["mountPath"]].rstrip("/") == host.rstrip("/"), mount


# ------------------------------------------------------------------------------ the image


@pytest.fixture(scope="module")
def containerd() -> Iterator[str]:
    """A private containerd (own root, state and socket) with the built image imported by the
    README's own command; stopped and removed afterwards."""
    for tool in ("containerd", "ctr", "runc"):
        assert shutil.which(tool), f"{tool} is missing: run scripts/setup-host.sh"
    assert ARCHIVE.is_file(), f"{ARCHIVE} is missing: run `make image` first"
    work = Path(tempfile.mkdtemp(prefix="edge-ctrd."))
    socket = work / "containerd.sock"
    (work / "config.toml").write_text(
        f'version = 2\nroot = "{work}/root"\nstate = "{work}/state"\n'
        f'[grpc]\n  address = "{socket}"\n'
        '[plugins."io.containerd.grpc.v1.cri"]\n  disable = true\n')
    log = open(work / "containerd.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(["containerd", "--config", str(work / "config.toml")], stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not socket.exists():
            assert proc.poll() is None, (work / "containerd.log").read_text()
            assert time.monotonic() < deadline, "containerd did not start"
            time.sleep(0.2)
        yield str(socket)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        subprocess.run(["umount", "-R", str(work / "root")], capture_output=True, timeout=60,
                       check=False)
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.image
def test_import_block_loads_the_archive_into_containerd(containerd: str) -> None:
    env = {"CONTAINERD_ADDRESS": containerd}
    run_block(block("import-containerd").body, cwd=ROOT, env=env)
    out = run_block("ctr -n k8s.io images ls -q\n", cwd=ROOT, env=env)
    assert IMAGE in out.split()


@pytest.mark.image
def test_ctr_blocks_create_then_stage_and_promote_a_key_on_two_nodes(
    containerd: str, tmp_path: Path
) -> None:
    env = {"CONTAINERD_ADDRESS": containerd}
    run_block(block("import-containerd").body, cwd=ROOT, env=env)
    node1, node2 = tmp_path / "node1", tmp_path / "node2"
    wrapper = block("ctr-kms").body
    out = run_block(wrapper, cwd=tmp_path, etc=node1, env=env)
    keyring = node1 / "kms-plugin" / "keyring.json"
    assert "primary g1" in out and stat.S_IMODE(keyring.stat().st_mode) == 0o600
    assert stat.S_IMODE(keyring.parent.stat().st_mode) == 0o700
    shutil.copytree(node1, node2)  # install the keyring on the second control-plane node
    definition = wrapper.split("mkdir -p", 1)[0]  # the function, not the keygen again
    out = run_block(definition + block("rotate-stage").body, cwd=tmp_path, etc=node1, env=env)
    assert "staged g2" in out
    shutil.copy2(keyring, node2 / "kms-plugin" / "keyring.json")  # copy 1
    out = run_block(definition + block("rotate-promote").body, cwd=tmp_path, etc=node1, env=env)
    assert "new primary g2" in out
    # node2, still on the staged copy, already holds the key node1 now encrypts with
    staged = yaml.safe_load((node2 / "kms-plugin" / "keyring.json").read_text())
    promoted = yaml.safe_load(keyring.read_text())
    assert len(staged["keys"]) == len(promoted["keys"]) == 2
