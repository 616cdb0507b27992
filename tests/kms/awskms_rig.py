"""AWS KMS rigs: our fake KMS (in process) and moto's server (a subprocess).

    def test_x(fake_kms):                       # function scope, one key created
        backend = fake_kms.backend()            # AwsKmsBackend on the fake, closed at teardown
        fake_kms.inject_throttling(ops="Encrypt", count=2)
        fake_kms.rotate_key()                   # key arguments default to fake_kms.key_arn
        assert fake_kms.calls["Encrypt"] == 3

    def test_y(moto_kms):                       # session scope, one key created
        with moto_kms.backend() as backend: ...
        arn = moto_kms.create_key()             # a fresh key for tests that change key state

Both signed by our own client (no boto3).  The fake verifies every signature against
TEST_ACCESS_KEY_ID/TEST_SECRET_ACCESS_KEY; moto routes by the SigV4 scope (``kms``) and checks
no signature.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from fake_kms import TEST_ACCESS_KEY_ID, TEST_SECRET_ACCESS_KEY, FakeKms, Fault
from kms_plugin.backends.awskms import AwsKmsBackend, AwsKmsOptions

# Fast retries and an isolated environment: nothing from the developer's AWS setup leaks in.
FAST_RETRIES: dict[str, object] = {
    "retry_base_seconds": 0.001,
    "retry_max_seconds": 0.01,
    "connect_timeout": 2.0,
    "request_timeout": 5.0,
}


def isolated_env(**extra: str) -> dict[str, str]:
    """An environment for backends under test: no AWS_* variables except the given ones."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["HOME"] = "/nonexistent-aws-home"
    env["AWS_EC2_METADATA_DISABLED"] = "true"  # no instance metadata probes off this host
    env.update(extra)
    return env


@dataclass
class FakeKmsRig:
    """A running :class:`FakeKms` with one key, plus helpers that default to that key."""

    server: FakeKms
    key_arn: str
    access_key_id: str = TEST_ACCESS_KEY_ID
    secret_access_key: str = TEST_SECRET_ACCESS_KEY
    _backends: list[AwsKmsBackend] = field(default_factory=list)

    @property
    def endpoint(self) -> str:
        return self.server.endpoint

    @property
    def region(self) -> str:
        return self.server.region

    def backend_options(self, **overrides: object) -> dict[str, object]:
        options: dict[str, object] = {
            "key_id": self.key_arn,
            "endpoint_url": overrides["endpoint_url"]
            if "endpoint_url" in overrides
            else self.endpoint,
            "region": self.region,
            "access_key_id": self.access_key_id,
            "secret_access_key": self.secret_access_key,
            **FAST_RETRIES,
        }
        options.update(overrides)
        return {k: v for k, v in options.items() if v is not None}

    def backend(self, *, env: dict[str, str] | None = None, **overrides: object) -> AwsKmsBackend:
        """An AwsKmsBackend on this fake (closed at teardown); ``None`` drops an option."""
        backend = AwsKmsBackend(
            AwsKmsOptions.parse(self.backend_options(**overrides)),
            env=env if env is not None else isolated_env(),
        )
        self._backends.append(backend)
        return backend

    # keys (default: the rig's key)
    def create_key(self, description: str = "") -> str:
        return self.server.create_key(description)

    def rotate_key(self, key: str | None = None) -> str:
        return self.server.rotate_key(key or self.key_arn)

    def disable_key(self, key: str | None = None) -> None:
        self.server.disable_key(key or self.key_arn)

    def enable_key(self, key: str | None = None) -> None:
        self.server.enable_key(key or self.key_arn)

    def schedule_deletion(self, key: str | None = None, days: int = 7) -> None:
        self.server.schedule_deletion(key or self.key_arn, days)

    def cancel_deletion(self, key: str | None = None) -> None:
        self.server.cancel_deletion(key or self.key_arn)

    def delete_key(self, key: str | None = None) -> None:
        self.server.delete_key(key or self.key_arn)

    def key_state(self, key: str | None = None) -> str:
        return self.server.key_state(key or self.key_arn)

    # faults
    def inject(self, kind: str, **kwargs: Any) -> Fault:
        return self.server.inject(kind, **kwargs)

    def inject_latency(
        self, seconds: float, *, ops: Iterable[str] | str | None = None, count: int | None = None
    ) -> Fault:
        return self.server.inject_latency(seconds, ops=ops, count=count)

    def inject_error(self, error_type: str, **kwargs: Any) -> Fault:
        return self.server.inject_error(error_type, **kwargs)

    def inject_throttling(
        self, *, ops: Iterable[str] | str | None = None, count: int | None = None
    ) -> Fault:
        return self.server.inject_throttling(ops=ops, count=count)

    def inject_server_error(self, status: int = 500, **kwargs: Any) -> Fault:
        return self.server.inject_server_error(status, **kwargs)

    def inject_drop(
        self, *, ops: Iterable[str] | str | None = None, count: int | None = None
    ) -> Fault:
        return self.server.inject_drop(ops=ops, count=count)

    def clear_faults(self) -> None:
        self.server.clear_faults()

    # counters
    @property
    def calls(self) -> dict[str, int]:
        return self.server.calls

    def call_count(self, operation: str) -> int:
        return self.server.call_count(operation)

    @property
    def total_calls(self) -> int:
        return self.server.total_calls

    def reset_calls(self) -> None:
        self.server.reset_calls()

    def close(self) -> None:
        for backend in self._backends:
            backend.close()
        self.server.stop()


@pytest.fixture
def fake_kms() -> Iterator[FakeKmsRig]:
    """A fake AWS KMS on a free loopback port, verifying signatures, with one key."""
    server = FakeKms(credentials={TEST_ACCESS_KEY_ID: TEST_SECRET_ACCESS_KEY}).start()
    rig = FakeKmsRig(server=server, key_arn=server.create_key("awskms test key"))
    try:
        yield rig
    finally:
        rig.close()


# -- moto -----------------------------------------------------------------------------------

MOTO_ACCESS_KEY_ID = "testing"
MOTO_SECRET_ACCESS_KEY = "testing"
MOTO_REGION = "us-east-1"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def moto_command(port: int) -> list[str]:
    script = Path(sys.executable).with_name("moto_server")
    if script.exists():
        return [str(script), "-H", "127.0.0.1", "-p", str(port)]
    found = shutil.which("moto_server")
    if found:
        return [found, "-H", "127.0.0.1", "-p", str(port)]
    return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]


@dataclass
class MotoKms:
    """moto's server in a subprocess, with one key created through our signed client."""

    endpoint: str
    process: subprocess.Popen[bytes]
    log_path: Path
    key_arn: str = ""
    key_id: str = ""
    region: str = MOTO_REGION
    access_key_id: str = MOTO_ACCESS_KEY_ID
    secret_access_key: str = MOTO_SECRET_ACCESS_KEY
    _control: AwsKmsBackend | None = None

    def backend_options(self, **overrides: object) -> dict[str, object]:
        options: dict[str, object] = {
            "key_id": self.key_arn,
            "endpoint_url": overrides["endpoint_url"]
            if "endpoint_url" in overrides
            else self.endpoint,
            "region": self.region,
            "access_key_id": self.access_key_id,
            "secret_access_key": self.secret_access_key,
            **FAST_RETRIES,
        }
        options.update(overrides)
        return {k: v for k, v in options.items() if v is not None}

    @contextlib.contextmanager
    def backend(self, **overrides: object) -> Iterator[AwsKmsBackend]:
        backend = AwsKmsBackend(
            AwsKmsOptions.parse(self.backend_options(**overrides)), env=isolated_env()
        )
        try:
            yield backend
        finally:
            backend.close()

    def call(self, operation: str, payload: dict[str, Any]) -> dict[str, Any]:
        """Any KMS operation on moto through our signed client."""
        if self._control is None:
            self._control = AwsKmsBackend(
                AwsKmsOptions.parse(self.backend_options(key_id="alias/moto-control")),
                env=isolated_env(),
            )
        return self._control.client.call(operation, payload)

    def create_key(self, description: str = "edge awskms test key") -> str:
        """Create a symmetric key; return its ARN."""
        meta = self.call(
            "CreateKey",
            {
                "Description": description,
                "KeyUsage": "ENCRYPT_DECRYPT",
                "KeySpec": "SYMMETRIC_DEFAULT",
            },
        )["KeyMetadata"]
        arn: str = meta["Arn"]
        return arn

    # moto resolves only bare key ids in some operations: pass the id part of the ARN
    def rotate_key(self, key: str | None = None) -> None:
        self.call("RotateKeyOnDemand", {"KeyId": _bare_id(key or self.key_arn)})

    def disable_key(self, key: str | None = None) -> None:
        self.call("DisableKey", {"KeyId": _bare_id(key or self.key_arn)})

    def enable_key(self, key: str | None = None) -> None:
        self.call("EnableKey", {"KeyId": _bare_id(key or self.key_arn)})

    def schedule_deletion(self, key: str | None = None, days: int = 7) -> None:
        self.call(
            "ScheduleKeyDeletion",
            {"KeyId": _bare_id(key or self.key_arn), "PendingWindowInDays": days},
        )

    def stop(self) -> None:
        if self._control is not None:
            self._control.close()
        _stop_process(self.process)


def _bare_id(key: str) -> str:
    return key.rsplit("/", 1)[-1] if key.startswith("arn:") else key


def _stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def _wait_listening(port: int, process: subprocess.Popen[bytes], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def start_moto(log_dir: Path, attempts: int = 3) -> MotoKms:
    """Start moto_server on a free loopback port (retrying if another process takes it)."""
    last_log = ""
    for attempt in range(attempts):
        port = _free_port()
        log_path = log_dir / f"moto-{attempt}.log"
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                moto_command(port),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=isolated_env(),
            )
        if _wait_listening(port, process, timeout=30.0):
            return MotoKms(endpoint=f"http://127.0.0.1:{port}", process=process, log_path=log_path)
        _stop_process(process)
        last_log = log_path.read_text(errors="replace")[-2000:]
    raise RuntimeError(f"moto_server did not start; its log ends with:\n{last_log}")


@pytest.fixture(scope="session")
def moto_kms(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoKms]:
    """moto's KMS server (``moto[server]``, a test dependency) with one created key."""
    moto = start_moto(tmp_path_factory.mktemp("moto"))
    try:
        moto.key_arn = moto.create_key()
        moto.key_id = _bare_id(moto.key_arn)
        yield moto
    finally:
        moto.stop()


__all__ = [
    "FAST_RETRIES",
    "FakeKmsRig",
    "MotoKms",
    "fake_kms",
    "isolated_env",
    "moto_kms",
    "start_moto",
]
