"""A minimal Kubernetes REST client: exactly the calls the node agent and the KMS plugin make.

Why not the official ``kubernetes`` package: importing it costs about 37 MB of resident memory
(every API group and model is loaded up front), more than the rest of the agent together, and
it is over half of the image's size. The few calls needed (get, list, watch, patch, create)
are plain HTTP with JSON bodies.

Supported credentials: in-cluster (service-account token re-read on every request, since bound
tokens rotate; the cluster CA), and kubeconfig files with a server URL, a CA (file or data) or
``insecure-skip-tls-verify``, and a bearer token (inline or ``tokenFile``) or a client
certificate and key (files or data). Exec and auth-provider plugins are not supported.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import ssl
import tempfile
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import yaml

SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


class ApiError(Exception):
    """The API server answered with an error status (``status`` is the HTTP code; 0 when the
    server could not be reached at all)."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        self.status = status
        self.reason = reason
        self.message = message
        super().__init__(f"{status} {reason}: {message}" if status else message)


@dataclass(frozen=True)
class ClusterConfig:
    server: str
    ca_file: str | None = None
    ca_data: bytes | None = None
    insecure: bool = False
    token: str | None = None
    token_file: str | None = None
    cert_data: bytes | None = None  # PEM, client certificate
    key_data: bytes | None = None  # PEM, client key


def in_cluster_config(sa_dir: str = SA_DIR) -> ClusterConfig:
    host = os.environ.get("KUBERNETES_SERVICE_HOST")
    port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    if not host:
        raise ApiError(0, "", "not running in a cluster (KUBERNETES_SERVICE_HOST unset); "
                              "give --kubeconfig")
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # IPv6
    return ClusterConfig(server=f"https://{host}:{port}", ca_file=f"{sa_dir}/ca.crt",
                         token_file=f"{sa_dir}/token")


def load_kubeconfig(path: str) -> ClusterConfig:
    try:
        with open(path) as fh:
            doc = yaml.safe_load(fh)
    except (OSError, yaml.YAMLError) as exc:
        raise ApiError(0, "", f"cannot read kubeconfig {path}: {exc}") from None
    base = os.path.dirname(os.path.abspath(path))
    try:
        context_name = doc["current-context"]
        context = _named(doc, "contexts", context_name)["context"]
        cluster = _named(doc, "clusters", context["cluster"])["cluster"]
        user = _named(doc, "users", context["user"]).get("user") or {}
    except (KeyError, TypeError) as exc:
        raise ApiError(0, "", f"kubeconfig {path}: incomplete ({exc})") from None
    if "exec" in user or "auth-provider" in user:
        raise ApiError(0, "", f"kubeconfig {path}: exec/auth-provider credentials are not "
                              "supported; use a token or a client certificate")

    def rel(value: str | None) -> str | None:
        return None if value is None else os.path.join(base, value)

    def data(key: str) -> bytes | None:
        raw = user.get(key) if key.startswith("client") else cluster.get(key)
        return base64.b64decode(raw) if raw else None

    def file_bytes(key: str) -> bytes | None:
        name = rel(user.get(key))
        if name is None:
            return None
        with open(name, "rb") as fh:
            return fh.read()

    return ClusterConfig(
        server=str(cluster["server"]).rstrip("/"),
        ca_file=rel(cluster.get("certificate-authority")),
        ca_data=data("certificate-authority-data"),
        insecure=bool(cluster.get("insecure-skip-tls-verify", False)),
        token=user.get("token"),
        token_file=rel(user.get("tokenFile")),
        cert_data=data("client-certificate-data") or file_bytes("client-certificate"),
        key_data=data("client-key-data") or file_bytes("client-key"),
    )


def _named(doc: Mapping[str, Any], section: str, name: str) -> dict[str, Any]:
    for item in doc.get(section) or []:
        if item.get("name") == name:
            return dict(item)
    raise KeyError(f"{section} {name!r}")


class KubeClient:
    """One short-lived connection per request; watches hold theirs while they stream."""

    def __init__(self, config: ClusterConfig, timeout: float = 30.0) -> None:
        self.config = config
        self.timeout = timeout
        url = urllib.parse.urlsplit(config.server)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ApiError(0, "", f"unsupported API server URL {config.server!r}")
        self._https = url.scheme == "https"
        self._host = url.hostname
        self._port = url.port or (443 if self._https else 80)
        self._prefix = url.path.rstrip("/")
        self._ssl = self._ssl_context() if self._https else None

    def _ssl_context(self) -> ssl.SSLContext:
        c = self.config
        if c.insecure:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        else:
            cadata = c.ca_data.decode() if c.ca_data else None
            ctx = ssl.create_default_context(cafile=c.ca_file, cadata=cadata)
        if c.cert_data and c.key_data:
            # load_cert_chain reads files: a private temporary directory, removed at once.
            with tempfile.TemporaryDirectory(prefix="nrm-cred-") as tmp:
                cert, key = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
                for path, content in ((cert, c.cert_data), (key, c.key_data)):
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                    with os.fdopen(fd, "wb") as fh:
                        fh.write(content)
                ctx.load_cert_chain(cert, key)
        return ctx

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        if self._https:
            return http.client.HTTPSConnection(self._host, self._port, timeout=timeout,
                                               context=self._ssl)
        return http.client.HTTPConnection(self._host, self._port, timeout=timeout)

    def _headers(self, content_type: str | None) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": "node-resource-manager"}
        token = self.config.token
        if self.config.token_file:
            try:
                with open(self.config.token_file) as fh:
                    token = fh.read().strip()
            except OSError as exc:
                raise ApiError(0, "", f"cannot read token {self.config.token_file}: "
                                      f"{exc.strerror}") from None
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if content_type:
            headers["Content-Type"] = content_type
        return headers

    def _url(self, path: str, query: Mapping[str, str | int | bool] | None) -> str:
        url = self._prefix + path
        if query:
            items = {k: (str(v).lower() if isinstance(v, bool) else str(v))
                     for k, v in query.items()}
            url += "?" + urllib.parse.urlencode(items)
        return url

    def request(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, str | int | bool] | None = None,
        body: Any = None,
        content_type: str | None = None,
    ) -> dict[str, Any]:
        payload = None if body is None else json.dumps(body).encode()
        conn = self._connection(self.timeout)
        try:
            conn.request(method, self._url(path, query), body=payload,
                         headers=self._headers(content_type or
                                               ("application/json" if payload else None)))
            resp = conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            raise ApiError(0, "", f"API server {self.config.server} unreachable: {exc}") from None
        finally:
            conn.close()
        if resp.status >= 400:
            raise _error(resp.status, resp.reason, data)
        try:
            out = json.loads(data) if data else {}
        except ValueError:
            raise ApiError(resp.status, "BadResponse", f"not JSON: {data[:200]!r}") from None
        return out if isinstance(out, dict) else {}

    def watch(
        self, path: str, query: Mapping[str, str | int | bool], *, timeout: float
    ) -> Iterator[dict[str, Any]]:
        """Watch events (``{"type", "object"}``) until the server ends the stream. An ERROR
        event is raised as ApiError with the Status code it carries (410 for expired)."""
        conn = self._connection(timeout)
        try:
            conn.request("GET", self._url(path, {**query, "watch": "true"}),
                         headers=self._headers(None))
            resp = conn.getresponse()
            if resp.status >= 400:
                raise _error(resp.status, resp.reason, resp.read())
            while True:
                line = resp.readline()
                if not line:
                    return
                if not line.strip():
                    continue
                event = json.loads(line)
                if event.get("type") == "ERROR":
                    obj = event.get("object") or {}
                    raise ApiError(int(obj.get("code") or 500), str(obj.get("reason") or ""),
                                   str(obj.get("message") or ""))
                yield event
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise ApiError(0, "", f"watch {path} interrupted: {exc}") from None
        finally:
            conn.close()


def _error(status: int, reason: str, data: bytes) -> ApiError:
    message = data.decode("utf-8", "replace")[:500]
    try:
        doc = json.loads(data)
        if isinstance(doc, dict):
            message = str(doc.get("message") or message)
            reason = str(doc.get("reason") or reason)
    except ValueError:
        pass
    return ApiError(status, reason, message)


def make_client(kubeconfig: str) -> KubeClient:
    """From a kubeconfig file, or in-cluster (the pod's service account) when empty."""
    return KubeClient(load_kubeconfig(kubeconfig) if kubeconfig else in_cluster_config())
