"""`kms-plugin serve` as a real process: restart, SIGTERM, socket handling."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from edge_common.server import EndpointError, unix_channel
from edge_proto.kms.v2 import service_pb2, service_pb2_grpc
from kms_plugin.envelope import ANNOTATION_KEY
from tests.kms.apiserver import FakeApiserver
from tests.kms.conftest import BackendRig, StartPlugin, make_rig
from tests.kms.test_apiserver_contract import secret_key, wait_for

REPO = Path(__file__).resolve().parents[2]


def _yaml_value(value: Any) -> Any:
    return value.value if hasattr(value, "value") else value


class ServeProcess:
    """``python -m kms_plugin serve --config FILE`` with the rig's environment."""

    def __init__(self, rig: BackendRig, endpoint: str, workdir: Path, **overrides: Any) -> None:
        self.endpoint = endpoint
        config = {
            "backend": rig.backend,
            **rig.options,
            "endpoint": endpoint,
            "metrics_port": 0,
            "log_format": "json",
            "health_interval": 3600.0,
            "refresh_interval": 3600.0,
            **overrides,
        }
        self.config_path = workdir / f"kms-{os.getpid()}-{time.monotonic_ns()}.yaml"
        self.config_path.write_text(yaml.safe_dump({k: _yaml_value(v) for k, v in config.items()}))
        self.log_path = self.config_path.with_suffix(".log")
        env = {**(rig.env or os.environ), "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kms_plugin", "serve", "--config", str(self.config_path)],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(REPO),
                start_new_session=True,
            )  # fmt: skip
        self.metrics_port: int | None = None

    def wait_ready(self, timeout: float = 30.0) -> ServeProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"plugin exited {self.proc.returncode}: {self.log()}")
            match = re.search(r'"metrics_port": (\d+)', self.log())
            if match:
                self.metrics_port = int(match.group(1))
                with FakeApiserver(self.endpoint) as api:
                    if api.status().healthz == "ok":
                        return self
            time.sleep(0.02)
        raise AssertionError(f"plugin not ready: {self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metric(self, name: str, **labels: str) -> float:
        body = urllib.request.urlopen(
            f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5
        ).read().decode()
        want = ",".join(f'{k}="{v}"' for k, v in labels.items())
        total = 0.0
        for line in body.splitlines():
            if line.startswith(name + "{") and all(p in line for p in want.split(",")):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def terminate(self, timeout: float = 20.0) -> int:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture
def serve(sock_dir: Path, tmp_path: Path) -> Iterator[Any]:
    started: list[ServeProcess] = []

    def start(rig: BackendRig, endpoint: str | None = None, **overrides: Any) -> ServeProcess:
        ep = endpoint or f"unix://{sock_dir}/p{len(started)}.sock"
        proc = ServeProcess(rig, ep, tmp_path, **overrides)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()


def test_restarted_process_serves_a_decrypt_storm_with_one_backend_call_per_local_kek(
    request: pytest.FixtureRequest, tmp_path: Path, serve: Any
):
    rig = make_rig("local", request, tmp_path)
    first = serve(rig, kek_max_uses=25).wait_ready()
    written = []
    for i in range(100):
        with FakeApiserver(first.endpoint) as api:
            state = api.sync()
            written.append((api.write(secret_key(i), b"secret %d" % i), state))
    keks = {s.annotations[ANNOTATION_KEY] for _, s in written}
    assert len(keks) >= 2
    assert first.terminate() == 0

    second = serve(rig, endpoint=first.endpoint, kek_max_uses=25).wait_ready()
    before = second.metric("kms_plugin_backend_calls_total", operation="unwrap")
    barrier = threading.Barrier(len(written))
    errors: list[BaseException] = []
    got: dict[int, bytes] = {}

    def read(i: int, raw: bytes) -> None:
        try:
            with FakeApiserver(second.endpoint) as api:
                barrier.wait()
                got[i] = api.read(secret_key(i), raw)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=read, args=(i, raw)) for i, (raw, _) in enumerate(written)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert got == {i: b"secret %d" % i for i in range(len(written))}
    unwraps = second.metric("kms_plugin_backend_calls_total", operation="unwrap") - before
    assert unwraps <= len(keks)
    assert second.metric("kms_plugin_kek_cache_requests_total", result="miss") <= len(keks)


def test_sigterm_finishes_the_in_flight_call_then_exits_and_removes_the_socket(
    request: pytest.FixtureRequest, tmp_path: Path, serve: Any, start_plugin: StartPlugin
):
    rig = make_rig("awskms-fake", request, tmp_path)
    fake = rig.extra["fake"]
    other = start_plugin(rig)  # wraps a seed under a local KEK the process has never seen
    with FakeApiserver(other.endpoint) as api:
        state = api.sync()
    proc = serve(rig).wait_ready()
    fake.inject_latency(1.0, ops="Decrypt")
    decrypts_before = fake.call_count("Decrypt")
    result: list[bytes] = []

    def slow_decrypt() -> None:
        with unix_channel(proc.endpoint) as ch:
            stub = service_pb2_grpc.KeyManagementServiceStub(ch)
            resp = stub.Decrypt(
                service_pb2.DecryptRequest(
                    ciphertext=state.ciphertext, key_id=state.key_id,
                    annotations=state.annotations, uid="in-flight",
                ),
                timeout=10,
            )
            result.append(bytes(resp.plaintext))

    t = threading.Thread(target=slow_decrypt)
    t.start()
    wait_for(lambda: fake.call_count("Decrypt") > decrypts_before, what="the call to reach KMS")
    assert proc.terminate() == 0
    t.join()
    assert result == [state.seed]
    socket_path = proc.endpoint[len("unix://"):]
    assert not os.path.exists(socket_path)
    log = proc.log()
    assert "signal received" in log
    audit = [json.loads(line) for line in log.splitlines()
             if '"kms_plugin.audit"' in line and '"in-flight"' in line]
    assert len(audit) == 1  # the audit line of the in-flight call, flushed at shutdown
    assert audit[0]["code"] == "OK" and audit[0]["method"] == "Decrypt"
    assert audit[0]["key_id_hash"].startswith("sha256:")
    assert state.seed.hex() not in log and state.key_id not in log


def test_a_live_socket_is_not_taken_over_but_a_stale_one_is_replaced(
    local_backend_rig: BackendRig, serve: Any
):
    first = serve(local_backend_rig).wait_ready()
    second = serve(local_backend_rig, endpoint=first.endpoint)
    assert second.proc.wait(30) != 0
    assert "already listening" in second.log()
    first.kill()  # SIGKILL: the socket file stays behind
    socket_path = first.endpoint[len("unix://"):]
    assert os.path.exists(socket_path)
    third = serve(local_backend_rig, endpoint=first.endpoint).wait_ready()
    assert third.terminate() == 0


def test_socket_is_0600_by_default_and_abstract_sockets_are_refused(
    local_backend_rig: BackendRig, start_plugin: StartPlugin
):
    rp = start_plugin(local_backend_rig)
    path = rp.endpoint[len("unix://"):]
    assert os.stat(path).st_mode & 0o777 == 0o600
    name = f"kmst-{os.getpid()}-{id(rp)}"
    with pytest.raises(EndpointError, match="abstract unix socket"):
        start_plugin(local_backend_rig, endpoint=f"unix:///@{name}")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:  # nothing listens there
        with pytest.raises(ConnectionRefusedError):
            probe.connect(f"\0{name}")


def test_socket_group_makes_the_socket_0660_for_that_group(
    local_backend_rig: BackendRig, start_plugin: StartPlugin
):
    gid = os.getgid()
    rp = start_plugin(local_backend_rig, socket_group=str(gid))
    st = os.stat(rp.endpoint[len("unix://"):])
    assert st.st_mode & 0o777 == 0o660 and st.st_gid == gid


def test_serve_runs_without_core_dumps_and_survives_kube_events_without_credentials(
    local_backend_rig: BackendRig, serve: Any, monkeypatch: pytest.MonkeyPatch
):
    # a static pod: the service env is there, the service-account token is not
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "1")
    monkeypatch.delenv("KUBECONFIG", raising=False)
    proc = serve(local_backend_rig, kube_events=True).wait_ready()
    limits = Path(f"/proc/{proc.proc.pid}/limits").read_text()
    core = next(line for line in limits.splitlines() if line.startswith("Max core file size"))
    assert core.split()[4:6] == ["0", "0"]
    assert "--kube-events: no Kubernetes credentials" in proc.log()
    assert proc.terminate() == 0


def test_harden_process_turns_core_dumps_off_and_makes_the_process_non_dumpable():
    code = (
        "import resource; from kms_plugin.hardening import harden_process, is_dumpable; "
        "assert is_dumpable(); harden_process(); "
        "print(resource.getrlimit(resource.RLIMIT_CORE), is_dumpable())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, cwd=str(REPO), env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(0, 0) False"
