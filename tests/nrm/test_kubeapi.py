"""The agent's small Kubernetes client: credentials from kubeconfig / in-cluster, TLS with the
cluster CA, errors as ApiError (the fake API server covers the HTTP side elsewhere)."""

from __future__ import annotations

import base64
import datetime as dt
import http.server
import ipaddress
import json
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edge_common.kubeapi import (
    ApiError,
    ClusterConfig,
    KubeClient,
    in_cluster_config,
    load_kubeconfig,
)
from tests.rigs.fake_kube import FakeKubeServer


def _cert(tmp: Path) -> tuple[bytes, Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test-apiserver")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    cert_file, key_file = tmp / "server.crt", tmp / "server.key"
    cert_file.write_bytes(pem)
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return pem, cert_file, key_file


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[str, bytes, list[str]]]:
    """An HTTPS server that answers every GET with JSON and records Authorization headers."""
    pem, cert_file, key_file = _cert(tmp_path)
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            seen.append(self.headers.get("Authorization", ""))
            body = json.dumps({"kind": "Node", "metadata": {"name": "n"}}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            return

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert_file, key_file)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}", pem, seen
    finally:
        server.shutdown()
        server.server_close()


def test_https_with_the_cluster_ca_and_a_rotating_token_file(
    tls_server: tuple[str, bytes, list[str]], tmp_path: Path
) -> None:
    url, pem, seen = tls_server
    token = tmp_path / "token"
    token.write_text("first\n")
    client = KubeClient(ClusterConfig(server=url, ca_data=pem, token_file=str(token)))
    assert client.request("GET", "/api/v1/nodes/n")["metadata"]["name"] == "n"
    token.write_text("second\n")  # bound service-account tokens rotate
    client.request("GET", "/api/v1/nodes/n")
    assert seen == ["Bearer first", "Bearer second"]


def test_https_without_the_right_ca_is_refused(
    tls_server: tuple[str, bytes, list[str]],
) -> None:
    url, _, seen = tls_server
    client = KubeClient(ClusterConfig(server=url, token="t"))
    with pytest.raises(ApiError, match="unreachable") as info:
        client.request("GET", "/api/v1/nodes/n")
    assert info.value.status == 0
    assert seen == []


def test_kubeconfig_with_relative_files_and_inline_data(tmp_path: Path) -> None:
    (tmp_path / "ca.crt").write_bytes(b"CA")
    (tmp_path / "client.crt").write_bytes(b"CERT")
    doc = {
        "apiVersion": "v1", "kind": "Config", "current-context": "b",
        "clusters": [
            {"name": "one", "cluster": {"server": "https://a.example:6443/"}},
            {"name": "two", "cluster": {"server": "https://b.example",
                                        "certificate-authority": "ca.crt"}},
        ],
        "users": [{"name": "u", "user": {
            "client-certificate": "client.crt",
            "client-key-data": base64.b64encode(b"KEY").decode()}}],
        "contexts": [{"name": "a", "context": {"cluster": "one", "user": "u"}},
                     {"name": "b", "context": {"cluster": "two", "user": "u"}}],
    }
    path = tmp_path / "kubeconfig"
    path.write_text(json.dumps(doc))
    config = load_kubeconfig(str(path))
    assert config.server == "https://b.example"
    assert config.ca_file == str(tmp_path / "ca.crt")
    assert config.cert_data == b"CERT" and config.key_data == b"KEY"


def test_kubeconfig_with_an_exec_plugin_is_refused_clearly(tmp_path: Path) -> None:
    path = tmp_path / "kubeconfig"
    path.write_text(json.dumps({
        "current-context": "c", "clusters": [{"name": "k", "cluster": {"server": "https://x"}}],
        "users": [{"name": "u", "user": {"exec": {"command": "aws"}}}],
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}]}))
    with pytest.raises(ApiError, match="exec/auth-provider credentials are not supported"):
        load_kubeconfig(str(path))


def test_in_cluster_config_uses_the_service_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "fd00::1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "6443")
    config = in_cluster_config("/sa")
    assert config.server == "https://[fd00::1]:6443"
    assert config.ca_file == "/sa/ca.crt" and config.token_file == "/sa/token"
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST")
    with pytest.raises(ApiError, match="not running in a cluster"):
        in_cluster_config("/sa")


def test_errors_carry_the_status_code_and_message(fake_kube: FakeKubeServer) -> None:
    client = KubeClient(ClusterConfig(server=fake_kube.url))
    with pytest.raises(ApiError) as info:
        client.request("GET", "/api/v1/nodes/absent")
    assert info.value.status == 404
    assert 'nodes "absent" not found' in info.value.message


def test_watch_from_a_compacted_version_raises_410(fake_kube: FakeKubeServer) -> None:
    fake_kube.put_node("n1", labels={})
    old = str(fake_kube.resource_version)
    fake_kube.put_node("n1", labels={"a": "b"})
    fake_kube.compact()
    client = KubeClient(ClusterConfig(server=fake_kube.url))
    with pytest.raises(ApiError) as info:
        list(client.watch("/api/v1/nodes", {"resourceVersion": old, "timeoutSeconds": 5},
                          timeout=10))
    assert info.value.status == 410
