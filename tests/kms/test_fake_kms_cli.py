"""The fake KMS as a process: `python -m fake_kms` (a checkout tool, not in the product)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from fake_kms import TEST_ACCESS_KEY_ID, TEST_SECRET_ACCESS_KEY, main
from kms_plugin.backends.awskms import AwsKmsBackend, AwsKmsOptions
from tests.kms.awskms_rig import FAST_RETRIES, isolated_env


@pytest.fixture
def fake_kms_process() -> Iterator[tuple[subprocess.Popen[str], dict[str, object]]]:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fake_kms",
            "--create-key",
            "--alias",
            "alias/demo",
            "--verify-signatures",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line, process.stderr.read() if process.stderr else "no output"
        yield process, json.loads(line)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()


@pytest.mark.timeout(60)
def test_fake_kms_process_serves_the_backend_and_stops_on_sigterm(
    fake_kms_process: tuple[subprocess.Popen[str], dict[str, object]],
) -> None:
    process, started = fake_kms_process
    endpoint = str(started["endpoint"])
    keys = started["keys"]
    assert isinstance(keys, list) and len(keys) == 1
    assert endpoint.startswith("http://127.0.0.1:")
    backend = AwsKmsBackend(
        AwsKmsOptions.parse(
            {
                "key_id": "alias/demo",
                "endpoint_url": endpoint,
                "region": "us-east-1",
                "access_key_id": TEST_ACCESS_KEY_ID,
                "secret_access_key": TEST_SECRET_ACCESS_KEY,
                **FAST_RETRIES,
            }
        ),
        env=isolated_env(),
    )
    try:
        assert backend.current_key().key_ref == keys[0]
        wrapped = backend.wrap(b"seed", {"a": "b"})
        assert backend.unwrap(wrapped.ciphertext, wrapped.key, {"a": "b"}) == b"seed"
    finally:
        backend.close()
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=20) == 0


def test_fake_kms_main_reports_a_port_in_use(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert main(["--port", str(port)]) == 1
    assert "cannot listen" in capsys.readouterr().err
