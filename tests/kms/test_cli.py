"""kms-plugin keygen | rotate | selftest | inspect, and the HTTP endpoint."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from kms_plugin import etcd_value
from kms_plugin.backends import local
from kms_plugin.cli import main
from tests.kms.apiserver import FakeApiserver
from tests.kms.conftest import BackendRig, StartPlugin

SECRET = b"k8s\x00\n\x0c\n\x02v1\x12\x06Secret\x12\x10top-secret-value"
KEY = "/registry/secrets/prod/db-password"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_keygen_rotate_and_selftest_through_the_command(tmp_path: Path, capsys):
    ring = str(tmp_path / "ring.json")
    code, out, _ = run(capsys, "keygen", "--local-keyring", ring, "--key-name", "edge")
    assert code == 0 and "g1" in out
    assert os.stat(ring).st_mode & 0o777 == 0o600
    code, _, err = run(capsys, "keygen", "--local-keyring", ring)
    assert code != 0 and "refusing to overwrite" in err
    code, out, _ = run(capsys, "rotate", "--local-keyring", ring)
    assert code == 0 and "g2" in out
    code, out, _ = run(capsys, "selftest", "--local-keyring", ring, "--json")
    report = json.loads(out)
    assert code == 0 and report["result"] == "ok" and "edge version g2" in report["root_key"]


def test_selftest_exit_code_tells_when_the_root_key_is_disabled(tmp_path: Path, capsys):
    ring = tmp_path / "ring.json"
    local.keygen(ring, "edge")
    local.set_state(ring, "g1", "disabled")
    code, out, _ = run(capsys, "selftest", "--local-keyring", str(ring))
    assert code == 1 and "FAILED" in out and "disabled" in out


def test_serve_refuses_a_keyring_readable_by_others(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.setattr("kms_plugin.cli.setup_logging", lambda *a, **k: None)  # keep pytest's
    ring = tmp_path / "ring.json"
    local.keygen(ring, "edge")
    ring.chmod(0o644)
    code, _, err = run(capsys, "serve", "--local-keyring", str(ring),
                       "--endpoint", f"unix://{tmp_path}/kms.sock")
    assert code == 2 and "chmod 600" in err


def test_serve_refuses_an_abstract_socket_which_anyone_could_decrypt_through(
    tmp_path: Path, capsys, monkeypatch
):
    monkeypatch.setattr("kms_plugin.cli.setup_logging", lambda *a, **k: None)
    ring = tmp_path / "ring.json"
    local.keygen(ring, "edge")
    code, _, err = run(capsys, "serve", "--local-keyring", str(ring),
                       "--endpoint", f"unix:///@kmst-open-{os.getpid()}")
    assert code == 1 and "abstract unix socket" in err and "no file permissions" in err


def test_config_file_environment_and_flags_reach_the_plugin_config(tmp_path: Path, monkeypatch):
    from edge_common.config import resolve
    from kms_plugin.cli import build_parser
    from kms_plugin.config import ENV_PREFIX, PluginConfig

    cfg = tmp_path / "kms.yaml"
    cfg.write_text("backend: local\nlocal-keyring: /from/file\nkek_max_uses: 10\n"
                   "health_interval: 7\n")
    monkeypatch.setenv("KMS_PLUGIN_KEK_MAX_USES", "20")
    ns = build_parser().parse_args(["serve", "--config", str(cfg), "--health-interval", "3"])
    config = resolve(PluginConfig, ns, env_prefix=ENV_PREFIX)
    assert config.local_keyring == "/from/file"
    assert config.kek_max_uses == 20
    assert config.health_interval == 3.0
    assert config.backend_option_map() == {"keyring": "/from/file"}
    bad = tmp_path / "bad.yaml"
    bad.write_text("kek_max_usez: 1\n")
    with pytest.raises(Exception, match="unknown option"):
        resolve(PluginConfig, build_parser().parse_args(["serve", "--config", str(bad)]),
                env_prefix=ENV_PREFIX)


def _stored_secret(rp_endpoint: str) -> bytes:
    with FakeApiserver(rp_endpoint, provider="edge-kms") as api:
        return api.write(KEY, SECRET)


def test_inspect_shows_provider_key_id_type_and_annotations_without_the_secret(
    local_backend_rig: BackendRig, start_plugin: StartPlugin, tmp_path: Path, capsys
):
    rp = start_plugin(local_backend_rig)
    value_file = tmp_path / "value.bin"
    value_file.write_bytes(_stored_secret(rp.endpoint))
    ring = str(local_backend_rig.extra["keyring"])
    code, out, _ = run(capsys, "inspect", str(value_file), "--local-keyring", ring, "--json")
    report = json.loads(out)
    assert code == 0
    assert report["provider"] == "edge-kms"
    assert report["key_id"] == rp.plugin.keys.status_key_id()
    assert report["dek_source_type"] == "HKDF_SHA256_XNONCE_AES_GCM_SEED"
    assert "root key test-ring version g1" in report["annotations"]["kek.kms-plugin.edge.io"]
    assert "decrypt" not in report

    code, out, _ = run(capsys, "inspect", str(value_file), "--local-keyring", ring, "--decrypt",
                       "--etcd-key", KEY, "--json")
    report = json.loads(out)
    assert code == 0 and report["decrypt"].startswith("ok")
    assert report["object"] == {"encoding": "protobuf", "apiVersion": "v1", "kind": "Secret"}
    assert "top-secret-value" not in out and "plaintext_base64" not in report

    code, out, _ = run(capsys, "inspect", str(value_file), "--local-keyring", ring, "--decrypt",
                       "--etcd-key", KEY, "--show-secret", "--json")
    assert code == 0 and b"top-secret-value" in __import__("base64").b64decode(
        json.loads(out)["plaintext_base64"])


def test_inspect_decrypt_fails_for_the_wrong_etcd_key_or_an_unencrypted_value(
    local_backend_rig: BackendRig, start_plugin: StartPlugin, tmp_path: Path, capsys
):
    rp = start_plugin(local_backend_rig)
    value_file = tmp_path / "value.bin"
    value_file.write_bytes(_stored_secret(rp.endpoint))
    ring = str(local_backend_rig.extra["keyring"])
    code, out, _ = run(capsys, "inspect", str(value_file), "--local-keyring", ring, "--decrypt",
                       "--etcd-key", "/registry/secrets/prod/other")
    assert code == 1 and "FAILED" in out
    code, out, _ = run(capsys, "inspect", str(value_file), "--decrypt")
    assert code == 2
    plain = tmp_path / "plain.bin"
    plain.write_bytes(b"k8s\x00\n\x0c\n\x02v1\x12\x06Secret")
    code, out, _ = run(capsys, "inspect", str(plain), "--local-keyring", ring)
    assert code == 1 and "NO" in out


def test_inspect_through_the_running_plugins_socket(
    local_backend_rig: BackendRig, start_plugin: StartPlugin, tmp_path: Path, capsys
):
    rp = start_plugin(local_backend_rig)
    value_file = tmp_path / "value.b64"
    value_file.write_bytes(__import__("base64").b64encode(_stored_secret(rp.endpoint)))
    code, out, _ = run(capsys, "inspect", str(value_file), "--input-format", "base64",
                       "--decrypt", "--etcd-key", KEY, "--via-socket", "--endpoint", rp.endpoint)
    assert code == 0 and "decrypt: ok" in out


def test_inspect_reads_what_the_independent_apiserver_model_wrote(
    local_backend_rig: BackendRig, start_plugin: StartPlugin
):
    rp = start_plugin(local_backend_rig)
    with FakeApiserver(rp.endpoint) as api:
        raw = api.write(KEY, SECRET)
        seed = api.state.seed if api.state else b""
    value = etcd_value.parse(raw)
    assert etcd_value.open_data(value, seed, KEY) == SECRET


def test_http_endpoint_serves_healthz_readyz_and_metrics_with_hashed_key_ids(
    local_backend_rig: BackendRig, start_plugin: StartPlugin
):
    rp = start_plugin(local_backend_rig, metrics_port=0)
    assert rp.plugin.http is not None
    base = f"http://127.0.0.1:{rp.plugin.http.port}"
    with FakeApiserver(rp.endpoint) as api:
        api.sync()
    assert urllib.request.urlopen(base + "/healthz", timeout=5).status == 200
    assert urllib.request.urlopen(base + "/readyz", timeout=5).status == 200
    body = urllib.request.urlopen(base + "/metrics", timeout=5).read().decode()
    for name in ("kms_plugin_requests_total", "kms_plugin_request_duration_seconds_bucket",
                 "kms_plugin_backend_calls_total", "kms_plugin_kek_cache_requests_total",
                 "kms_plugin_local_kek_age_seconds", "kms_plugin_local_kek_uses",
                 "kms_plugin_current_key_info", "kms_plugin_health_state"):
        assert name in body, name
    key_id = rp.plugin.keys.status_key_id()
    assert key_id not in body
    assert 'key_id_hash="sha256:' in body
    local_backend_rig.disable()
    rp.plugin.monitor.probe()
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(base + "/readyz", timeout=5)
    assert info.value.code == 503
    assert urllib.request.urlopen(base + "/healthz", timeout=5).status == 200


def test_secrets_are_never_flags_nor_in_any_repr(tmp_path: Path, capsys, monkeypatch):
    from kms_plugin.backends.awskms import AwsKmsOptions
    from kms_plugin.backends.awskms.credentials import AwsCredentials
    from kms_plugin.config import PluginConfig

    for flag in ("--awskms-secret-access-key", "--awskms-session-token",
                 "--awskms-access-key-id"):
        with pytest.raises(SystemExit):
            main(["selftest", flag, "x"])
        assert "unrecognized arguments" in capsys.readouterr().err
    secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
    config = PluginConfig(awskms_secret_access_key=secret, awskms_session_token=secret)
    assert secret not in repr(config)
    assert secret not in repr(AwsKmsOptions.parse({"key_id": "k", "secret_access_key": secret}))
    assert secret not in repr(AwsCredentials("AKIA", secret, secret))
    ring = tmp_path / "ring.json"
    keyring = local.keygen(ring, "edge")
    assert repr(keyring.primary.key) not in repr(keyring)
