"""`make image-smoke`: the built image, tested from inside (`buildah run`) and over real sockets.

Inside the image: each command's --version, `lvm version`, every product module imports,
and nothing of the checkout or of a build toolchain is there (fake_kms, tests, pip, gcc, qemu).
Over unix sockets in a directory shared with this host: `csi-lvm` answers GetPluginInfo and
Probe to a client on the host (as kubelet would call it); `kms-plugin serve` with a local
keyring made by the image's `kms-plugin keygen` answers the image's own
`kms-plugin selftest --via-socket` and a KMS v2 Status call from the host (as kube-apiserver).

Exit 0 when all pass; 1 with the failing step otherwise. Leaves no container behind.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from edge_common.server import unix_channel  # noqa: E402
from edge_proto.csi.v1 import csi_pb2, csi_pb2_grpc  # noqa: E402
from edge_proto.kms.v2 import service_pb2, service_pb2_grpc  # noqa: E402

SHARED = "/run/smoke"  # where the host directory appears inside the container
COMMANDS = ("csi-lvm", "node-resource-manager", "kms-plugin")
PRODUCT = ("edge_common", "edge_proto", "csi_lvm", "node_resource_manager", "kms_plugin")
NOT_SHIPPED = ("fake_kms", "tests", "edge_demo", "kernel_guest", "benchmarks", "pip",
               "setuptools", "kubernetes")
NO_TOOLS = ("gcc", "cc", "make", "pip", "pip3", "qemu-system-x86_64", "softhsm2-util")
START_TIMEOUT = 60.0
RUN_TIMEOUT = 120.0

IMPORT_ALL = """
import importlib, pkgutil, sys
for name in sys.argv[1:]:
    package = importlib.import_module(name)
    for info in pkgutil.walk_packages(package.__path__, name + "."):
        if not info.name.endswith(".__main__"):
            importlib.import_module(info.name)
"""
ABSENT = """
import importlib.util, sys
present = [n for n in sys.argv[1:] if importlib.util.find_spec(n) is not None]
sys.exit("shipped but must not be: " + ", ".join(present) if present else 0)
"""


class SmokeFailure(Exception):
    pass


class Container:
    def __init__(self, buildah: list[str], image: str, shared: Path) -> None:
        self.buildah = buildah
        self.shared = shared
        self.name = self._check([*buildah, "from", "--pull-never", image]).strip()

    def _check(self, argv: Sequence[str], timeout: float = RUN_TIMEOUT) -> str:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        if done.returncode != 0:
            raise SmokeFailure(f"{' '.join(argv)} exited {done.returncode}:\n{done.stderr}")
        return done.stdout

    def argv(self, command: Sequence[str]) -> list[str]:
        return [*self.buildah, "run", "--isolation", "chroot",
                "--volume", f"{self.shared}:{SHARED}", self.name, "--", *command]

    def run(self, *command: str) -> str:
        return self._check(self.argv(command))

    @contextmanager
    def background(self, *command: str) -> Iterator[subprocess.Popen[str]]:
        log = open(self.shared / f"{Path(command[0]).name}.log", "w")  # noqa: SIM115
        proc = subprocess.Popen(self.argv(command), stdout=log, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            log.close()

    def remove(self) -> None:
        subprocess.run([*self.buildah, "rm", self.name], capture_output=True, timeout=120,
                       check=False)


def wait_for_socket(path: Path, proc: subprocess.Popen[str], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while not path.exists():
        if proc.poll() is not None:
            raise SmokeFailure(f"exited {proc.returncode} before {path.name} appeared:\n"
                               f"{log.read_text()}")
        if time.monotonic() > deadline:
            raise SmokeFailure(f"{path.name} did not appear in {START_TIMEOUT:.0f}s")
        time.sleep(0.2)


def step(title: str) -> None:
    print(f"smoke: {title}", flush=True)


def smoke(container: Container, shared: Path) -> None:
    for command in COMMANDS:
        step(container.run(command, "--version").strip())
    step("lvm version: " + " / ".join(container.run("lvm", "version").split("\n")[:1]).strip())
    container.run("python3", "-c", IMPORT_ALL, *PRODUCT)
    step(f"every module of {', '.join(PRODUCT)} imports")
    container.run("python3", "-c", ABSENT, *NOT_SHIPPED)
    found = container.run("sh", "-c", 'for t in "$@"; do command -v "$t" || true; done', "sh",
                          *NO_TOOLS).split()
    if found:
        raise SmokeFailure(f"build or test tools in the image: {found}")
    step(f"not in the image: {', '.join(NOT_SHIPPED + NO_TOOLS)}")

    with container.background("csi-lvm", f"--endpoint=unix://{SHARED}/csi.sock",
                              "--node-id=smoke") as proc:
        wait_for_socket(shared / "csi.sock", proc, shared / "csi-lvm.log")
        with unix_channel(f"unix://{shared}/csi.sock") as channel:
            identity = csi_pb2_grpc.IdentityStub(channel)
            info = identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest(), timeout=30)
            probe = identity.Probe(csi_pb2.ProbeRequest(), timeout=30)
        step(f"CSI GetPluginInfo: {info.name} {info.vendor_version}; Probe answered "
             f"(ready={probe.ready.value}: no volume group in the smoke container)")

    keyring = f"{SHARED}/keyring.json"
    endpoint = f"unix://{SHARED}/kms.sock"
    backend = ["--backend=local", f"--local-keyring={keyring}"]
    container.run("kms-plugin", "keygen", *backend)
    with container.background("kms-plugin", "serve", *backend, f"--endpoint={endpoint}",
                              "--metrics-port=-1") as proc:
        wait_for_socket(shared / "kms.sock", proc, shared / "kms-plugin.log")
        selftest = container.run("kms-plugin", "selftest", "--via-socket", *backend,
                                 f"--endpoint={endpoint}")
        with unix_channel(f"unix://{shared}/kms.sock") as channel:
            status = service_pb2_grpc.KeyManagementServiceStub(channel).Status(
                service_pb2.StatusRequest(), timeout=30)
        if status.healthz != "ok":
            raise SmokeFailure(f"KMS v2 Status healthz={status.healthz!r}")
        step(f"KMS selftest --via-socket: {selftest.strip().splitlines()[-1]}; "
             f"v2 Status from the host: version={status.version} healthz={status.healthz}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("image", help="the image in buildah's local storage")
    parser.add_argument("--storage-driver", default=os.environ.get("STORAGE_DRIVER", "vfs"))
    args = parser.parse_args(argv)
    buildah = ["buildah", "--storage-driver", args.storage_driver]
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="edge-smoke.") as tmp:
        shared = Path(tmp)
        container = None
        try:
            container = Container(buildah, args.image, shared)
            smoke(container, shared)
        except (SmokeFailure, subprocess.TimeoutExpired, OSError) as exc:
            print(f"smoke: FAILED: {exc}", file=sys.stderr)
            return 1
        except Exception as exc:  # a gRPC error names the RPC that failed
            print(f"smoke: FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        finally:
            if container is not None:
                container.remove()
    step(f"passed in {time.monotonic() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
