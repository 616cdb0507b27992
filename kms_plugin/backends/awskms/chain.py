"""The AWS SDK's credential sources beyond static keys and files: web identity (IRSA),
container credentials and IMDSv2, each refreshed before its credentials expire.

Where they come in the chain (:func:`~kms_plugin.backends.awskms.credentials.resolve_credentials`)
is the SDKs' order: environment, shared files, web identity, container, instance metadata.

* **Web identity**: ``AWS_WEB_IDENTITY_TOKEN_FILE`` + ``AWS_ROLE_ARN`` (+
  ``AWS_ROLE_SESSION_NAME``); STS ``AssumeRoleWithWebIdentity`` (unsigned; the token proves who
  we are) at ``AWS_ENDPOINT_URL_STS`` or ``https://sts.<region>.amazonaws.com``.  The token
  file is re-read on every refresh (kubelet rotates it).
* **Container**: ``AWS_CONTAINER_CREDENTIALS_RELATIVE_URI`` (on ``http://169.254.170.2``) or
  ``AWS_CONTAINER_CREDENTIALS_FULL_URI`` (https, or http only to loopback and the ECS/EKS
  link-local hosts), with ``Authorization`` from ``AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE``
  (re-read) or ``AWS_CONTAINER_AUTHORIZATION_TOKEN``.
* **credential_process** from the shared config file (``AWS_CONFIG_FILE``, else
  ``~/.aws/config``; section ``[default]`` or ``[profile NAME]``): the command is split like a
  shell would (``shlex``) and run as an argument list, never through a shell, with
  ``PROCESS_TIMEOUT``; its stdout is the SDKs' JSON (``Version`` 1, ``AccessKeyId``,
  ``SecretAccessKey``, optional ``SessionToken`` and ``Expiration``: without one the
  credentials do not expire).  Its output never reaches a log line or an error message.
* **IMDSv2** (never v1): a session token by ``PUT /latest/api/token``, then the role and its
  credentials; ``AWS_EC2_METADATA_SERVICE_ENDPOINT`` moves it, ``AWS_EC2_METADATA_DISABLED=true``
  turns it off.

Credentials are refreshed ``REFRESH_BEFORE`` seconds before they expire; if a refresh fails,
the old ones serve until they really expire (a warning each time), then calls fail
BackendUnavailable.  Secrets never reach a log line or a repr.
"""

from __future__ import annotations

import configparser
import datetime
import http.client
import json
import logging
import math
import shlex
import subprocess
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping
from pathlib import Path
from urllib.parse import urlencode, urlsplit

from kms_plugin.backends.awskms.credentials import AwsCredentials, shared_file
from kms_plugin.backends.errors import BackendConfigError, BackendUnavailable

log = logging.getLogger(__name__)

REFRESH_BEFORE = 300.0  # seconds before expiry a refresh is due
RETRY_AFTER_FAILURE = 10.0  # seconds between refresh attempts while old credentials still serve
HTTP_TIMEOUT = 2.0
PROCESS_TIMEOUT = 30.0  # seconds a credential_process may take (an SSO helper may be slow)
PROCESS_OUTPUT_MAX = 64 * 1024
IMDS_DEFAULT = "http://169.254.169.254"
ECS_HOST = "http://169.254.170.2"
_CONTAINER_HTTP_HOSTS = frozenset({"127.0.0.1", "::1", "localhost", "169.254.170.2",
                                   "169.254.170.23", "fd00:ec2::23"})
_STS_NS = "{https://sts.amazonaws.com/doc/2011-06-15/}"


class TemporaryCredentials:
    """Credentials and their expiry (wall-clock seconds)."""

    __slots__ = ("credentials", "expires_at")

    def __init__(self, credentials: AwsCredentials, expires_at: float) -> None:
        self.credentials = credentials
        self.expires_at = expires_at

    def __repr__(self) -> str:
        return f"TemporaryCredentials({self.credentials!r}, expires_at={self.expires_at})"


class RefreshingCredentials:
    """Hands out credentials from ``fetch``, fetching again before they expire; thread-safe.

    Duck-types :class:`~kms_plugin.backends.awskms.credentials.CredentialsProvider`.
    """

    def __init__(
        self, source: str, fetch: Callable[[], TemporaryCredentials],
        *, clock: Callable[[], float] = time.time,
    ) -> None:
        self.source = source
        self._fetch = fetch
        self._clock = clock
        self._lock = threading.Lock()
        self._current: TemporaryCredentials | None = None
        self._next_try = 0.0
        self.fetches = 0  # for tests

    def get(self) -> AwsCredentials:
        with self._lock:
            now = self._clock()
            cur = self._current
            if cur is not None and now < cur.expires_at - REFRESH_BEFORE:
                return cur.credentials
            if cur is not None and now < self._next_try and now < cur.expires_at:
                return cur.credentials  # a refresh failed a moment ago: do not hammer
            try:
                self.fetches += 1
                fresh = self._fetch()
            except BackendUnavailable as exc:
                if cur is not None and now < cur.expires_at:
                    self._next_try = now + RETRY_AFTER_FAILURE
                    log.warning(
                        "AWS credentials refresh from %s failed (%s); the current ones expire "
                        "in %.0f s", self.source, exc, cur.expires_at - now,
                    )
                    return cur.credentials
                raise
            self._current = fresh
            return fresh.credentials


def _parse_time(text: str, where: str) -> float:
    try:
        when = datetime.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise BackendUnavailable(f"{where}: unreadable Expiration") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return when.timestamp()


def _request(
    url: str, method: str = "GET", headers: Mapping[str, str] | None = None,
    body: bytes | None = None, *, where: str,
) -> bytes:
    parts = urlsplit(url)
    conn: http.client.HTTPConnection
    if parts.scheme == "https":
        conn = http.client.HTTPSConnection(parts.hostname or "", parts.port, timeout=HTTP_TIMEOUT)
    else:
        conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=HTTP_TIMEOUT)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        conn.request(method, path, body=body, headers=dict(headers or {}))
        resp = conn.getresponse()
        data = resp.read(1 << 20)
    except (OSError, http.client.HTTPException) as exc:
        raise BackendUnavailable(f"{where} unreachable ({type(exc).__name__})") from None
    finally:
        conn.close()
    if resp.status != 200:
        raise BackendUnavailable(f"{where} answered HTTP {resp.status}")
    return data


def _from_json(data: bytes, where: str, token_field: str = "Token") -> TemporaryCredentials:
    try:
        doc = json.loads(data)
        creds = AwsCredentials(
            str(doc["AccessKeyId"]), str(doc["SecretAccessKey"]),
            str(doc[token_field]) if doc.get(token_field) else None, source=where,
        )
        expires = _parse_time(str(doc["Expiration"]), where)
    except (ValueError, KeyError, TypeError):
        raise BackendUnavailable(f"{where}: malformed credentials answer") from None
    if not creds.access_key_id or not creds.secret_access_key:
        raise BackendUnavailable(f"{where}: empty credentials")
    return TemporaryCredentials(creds, expires)


# --- web identity (IRSA) -----------------------------------------------------------------


def web_identity(env: Mapping[str, str], region: str) -> RefreshingCredentials:
    token_file = Path(env["AWS_WEB_IDENTITY_TOKEN_FILE"])
    role_arn = env.get("AWS_ROLE_ARN", "")
    if not role_arn:
        raise BackendConfigError("AWS_WEB_IDENTITY_TOKEN_FILE is set but AWS_ROLE_ARN is not")
    session = env.get("AWS_ROLE_SESSION_NAME") or f"kms-plugin-{int(time.time())}"
    suffix = "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"
    endpoint = env.get("AWS_ENDPOINT_URL_STS") or f"https://sts.{region}.{suffix}"
    where = f"STS AssumeRoleWithWebIdentity at {endpoint}"

    def fetch() -> TemporaryCredentials:
        try:
            token = token_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise BackendUnavailable(
                f"web identity token file {token_file} unreadable ({type(exc).__name__})"
            ) from None
        body = urlencode({
            "Action": "AssumeRoleWithWebIdentity", "Version": "2011-06-15",
            "RoleArn": role_arn, "RoleSessionName": session, "WebIdentityToken": token,
        }).encode()
        data = _request(endpoint.rstrip("/") + "/", "POST",
                        {"Content-Type": "application/x-www-form-urlencoded"}, body, where=where)
        try:
            root = ET.fromstring(data)
            node = root.find(f"{_STS_NS}AssumeRoleWithWebIdentityResult/{_STS_NS}Credentials")
            if node is None:
                raise ValueError("no Credentials")

            def text(name: str) -> str:
                value = node.findtext(f"{_STS_NS}{name}")  # type: ignore[union-attr]
                if not value:
                    raise ValueError(name)
                return value

            creds = AwsCredentials(text("AccessKeyId"), text("SecretAccessKey"),
                                   text("SessionToken"), source="web-identity")
            return TemporaryCredentials(creds, _parse_time(text("Expiration"), where))
        except (ET.ParseError, ValueError):
            raise BackendUnavailable(f"{where}: malformed answer") from None

    return RefreshingCredentials(f"web-identity:{role_arn}", fetch)


# --- container credentials ----------------------------------------------------------------


def container(env: Mapping[str, str]) -> RefreshingCredentials:
    relative = env.get("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")
    url = ECS_HOST + relative if relative else env["AWS_CONTAINER_CREDENTIALS_FULL_URI"]
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or (
        parts.scheme == "http" and (parts.hostname or "") not in _CONTAINER_HTTP_HOSTS
    ):
        raise BackendConfigError(
            "AWS_CONTAINER_CREDENTIALS_FULL_URI must be https, or http to loopback or the "
            "container credentials link-local address"
        )
    token_file = env.get("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE")
    static_token = env.get("AWS_CONTAINER_AUTHORIZATION_TOKEN")
    where = f"container credentials at {parts.scheme}://{parts.netloc}"

    def fetch() -> TemporaryCredentials:
        headers: dict[str, str] = {}
        if token_file:
            try:
                headers["Authorization"] = Path(token_file).read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as exc:
                raise BackendUnavailable(
                    f"container authorization token file unreadable ({type(exc).__name__})"
                ) from None
        elif static_token:
            headers["Authorization"] = static_token
        return _from_json(_request(url, headers=headers, where=where), "container")

    return RefreshingCredentials(f"container:{parts.netloc}", fetch)


# --- credential_process (shared config file) ----------------------------------------------


def default_config_file(env: Mapping[str, str]) -> Path:
    return shared_file(env, "AWS_CONFIG_FILE", "config")


def configured_process(env: Mapping[str, str], profile: str) -> str | None:
    """The ``credential_process`` of ``profile`` in the shared config file, or None (no file,
    no such profile, or no credential_process in it)."""
    path = default_config_file(env)
    if not path.is_file():
        return None
    parser = configparser.ConfigParser(interpolation=None, default_section="\0none")
    try:
        with path.open(encoding="utf-8") as fh:
            parser.read_file(fh)
    except (OSError, UnicodeDecodeError, configparser.Error) as exc:
        line = getattr(exc, "lineno", None)  # never the line itself: it may hold a secret
        raise BackendConfigError(
            f"AWS config file {path} unreadable or malformed"
            + (f" (line {line})" if line else f" ({type(exc).__name__})")
        ) from None
    names = ["default", "profile default"] if profile == "default" else [f"profile {profile}"]
    for name in names:
        if parser.has_section(name):
            command = parser[name].get("credential_process", "").strip()
            return command or None
    return None


def credential_process(command: str, env: Mapping[str, str]) -> RefreshingCredentials:
    try:
        argv = shlex.split(command)
    except ValueError:
        raise BackendConfigError("credential_process: unbalanced quotes in the command") from None
    if not argv:
        raise BackendConfigError("credential_process is empty")
    where = f"credential_process {argv[0]}"
    child_env = dict(env)

    def fetch() -> TemporaryCredentials:
        try:
            done = subprocess.run(
                argv, stdin=subprocess.DEVNULL, capture_output=True, env=child_env,
                timeout=PROCESS_TIMEOUT, check=False,
            )
        except subprocess.TimeoutExpired:
            raise BackendUnavailable(
                f"{where} did not finish within {PROCESS_TIMEOUT:.0f} s"
            ) from None
        except OSError as exc:
            raise BackendUnavailable(f"{where} could not run ({exc.strerror})") from None
        if done.returncode != 0:
            raise BackendUnavailable(f"{where} exited with status {done.returncode}")
        return _from_process_output(done.stdout, where)

    return RefreshingCredentials(f"process:{argv[0]}", fetch)


def _from_process_output(data: bytes, where: str) -> TemporaryCredentials:
    try:
        if len(data) > PROCESS_OUTPUT_MAX:
            raise ValueError("too long")
        doc = json.loads(data)
        if doc.get("Version") != 1:
            raise BackendUnavailable(f"{where}: output Version is not 1")
        creds = AwsCredentials(
            str(doc["AccessKeyId"]), str(doc["SecretAccessKey"]),
            str(doc["SessionToken"]) if doc.get("SessionToken") else None, source="process",
        )
        expiration = doc.get("Expiration")
        expires = _parse_time(str(expiration), where) if expiration else math.inf
    except (ValueError, KeyError, TypeError, AttributeError):
        raise BackendUnavailable(f"{where}: malformed output (not the SDKs' JSON)") from None
    if not creds.access_key_id or not creds.secret_access_key:
        raise BackendUnavailable(f"{where}: empty credentials")
    return TemporaryCredentials(creds, expires)


# --- IMDSv2 -------------------------------------------------------------------------------


def instance_metadata(env: Mapping[str, str]) -> RefreshingCredentials:
    base = (env.get("AWS_EC2_METADATA_SERVICE_ENDPOINT") or IMDS_DEFAULT).rstrip("/")
    where = f"instance metadata (IMDSv2) at {base}"

    def fetch() -> TemporaryCredentials:
        token = _request(
            f"{base}/latest/api/token", "PUT",
            {"X-aws-ec2-metadata-token-ttl-seconds": "21600"}, where=where,
        ).decode("ascii", "replace").strip()
        headers = {"X-aws-ec2-metadata-token": token}
        roles = _request(f"{base}/latest/meta-data/iam/security-credentials/",
                         headers=headers, where=where).decode("utf-8", "replace").split()
        if not roles:
            raise BackendUnavailable(f"{where}: the instance has no IAM role")
        data = _request(f"{base}/latest/meta-data/iam/security-credentials/{roles[0]}",
                        headers=headers, where=where)
        return _from_json(data, "imds")

    return RefreshingCredentials(f"imds:{base}", fetch)


def metadata_disabled(env: Mapping[str, str]) -> bool:
    return env.get("AWS_EC2_METADATA_DISABLED", "").strip().lower() == "true"


__all__ = [
    "PROCESS_TIMEOUT",
    "REFRESH_BEFORE",
    "RefreshingCredentials",
    "TemporaryCredentials",
    "configured_process",
    "container",
    "credential_process",
    "default_config_file",
    "instance_metadata",
    "metadata_disabled",
    "web_identity",
]
