"""What `kms-plugin serve` loads (issue 14 point 10: idle memory): a plugin with the local
backend, serving and answering, never imports the pieces only other setups need.  Checked on
the real process with ``python -X importtime`` (every import statement it runs is on stderr;
importlib.import_module, which the backend registry uses, is not listed itself, only what the
imported module imports)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from edge_common.server import unix_channel
from edge_proto.kms.v2 import service_pb2, service_pb2_grpc
from kms_plugin.backends import local

REPO = Path(__file__).resolve().parents[2]

# what serve with the local backend, no --config and no --kube-events must not load, and why
NOT_LOADED = {
    "importlib.metadata": "package metadata (version, entry points) for built-in backends",
    "encodings.idna": "HTTPServer's reverse DNS of the metrics address",
    "unicodedata": "HTTPServer's reverse DNS of the metrics address",
    "yaml": "only --config files are YAML",
    "kubernetes": "only --kube-events talks to the API (and not with this client)",
    "pkcs11": "another backend (python-pkcs11)",
    "kms_plugin.backends.awskms.backend": "another backend",
    "kms_plugin.events": "only --kube-events",
}


def test_serve_with_the_local_backend_loads_nothing_it_does_not_use(tmp_path: Path) -> None:
    ring = tmp_path / "ring.json"
    local.keygen(ring, "footprint")
    endpoint = f"unix://{tmp_path}/kms.sock"
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    err = tmp_path / "stderr"
    with err.open("wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-X", "importtime", "-m", "kms_plugin", "serve", "--backend",
             "local", "--local-keyring", str(ring), "--endpoint", endpoint,
             "--metrics-port", "0"],
            stdout=subprocess.DEVNULL, stderr=fh, env=env, cwd=str(REPO),
        )
    try:
        deadline = time.monotonic() + 30
        answered = False
        while not answered and time.monotonic() < deadline and proc.poll() is None:
            if (tmp_path / "kms.sock").exists():
                with unix_channel(endpoint) as ch:
                    stub = service_pb2_grpc.KeyManagementServiceStub(ch)
                    try:
                        enc = stub.Encrypt(service_pb2.EncryptRequest(plaintext=b"s" * 32),
                                           timeout=5)
                        stub.Decrypt(service_pb2.DecryptRequest(
                            ciphertext=enc.ciphertext, key_id=enc.key_id,
                            annotations=dict(enc.annotations)), timeout=5)
                        answered = True
                    except Exception:  # not serving yet
                        time.sleep(0.05)
            else:
                time.sleep(0.05)
        assert answered, err.read_text()[-2000:]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
    imported = set(re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s+(\S+)", err.read_text(), re.M))
    assert "kms_plugin.plugin" in imported  # the check sees the plugin's imports
    loaded = {name: why for name, why in NOT_LOADED.items() if name in imported}
    assert not loaded, f"serve loaded modules it does not need: {loaded}"
