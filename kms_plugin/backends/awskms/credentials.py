"""AWS credentials, region and endpoint: the AWS SDKs' credential chain.

The order is the one the AWS SDKs use:

1. explicit options (``access_key_id`` + ``secret_access_key`` [+ ``session_token``]) from the
   config file or ``KMS_PLUGIN_AWSKMS_*`` environment (secrets are never flags);
2. the environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``);
3. the shared credentials file (``credentials_file`` option, ``AWS_SHARED_CREDENTIALS_FILE``,
   else ``~/.aws/credentials``), section ``profile`` (option, ``AWS_PROFILE``, else
   ``default``).  The file is re-read when its modification time changes, so credentials
   rotated on disk are picked up without a restart;
4. ``credential_process`` of that profile in the shared config file (``AWS_CONFIG_FILE``, else
   ``~/.aws/config``), when there is no credentials file;
5. web identity (IRSA), 6. container credentials, 7. IMDSv2: temporary credentials refreshed
   before they expire (:mod:`kms_plugin.backends.awskms.chain`).

SSO is not implemented (an SSO helper can be run as credential_process).  The KMS endpoint
must be https; plain ``http://`` is accepted only for loopback hosts unless ``allow_http`` says
otherwise.
"""

from __future__ import annotations

import configparser
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from kms_plugin.backends.errors import BackendConfigError, BackendError


@dataclass(frozen=True)
class AwsCredentials:
    """One set of AWS credentials.  The secret parts never appear in ``repr``."""

    access_key_id: str
    secret_access_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)
    source: str = "options"


class CredentialsProvider:
    """Hands out the current credentials; thread-safe."""

    def __init__(
        self,
        *,
        static: AwsCredentials | None = None,
        credentials_file: Path | None = None,
        profile: str = "default",
    ) -> None:
        if static is None and credentials_file is None:
            raise BackendConfigError("a credentials provider needs credentials or a file")
        self._static = static
        self._file = credentials_file
        self._profile = profile
        self._lock = threading.Lock()
        self._cached: AwsCredentials | None = None
        self._cached_stamp: tuple[int, int] | None = None

    @property
    def source(self) -> str:
        if self._static is not None:
            return self._static.source
        return f"file:{self._file} [{self._profile}]"

    def get(self) -> AwsCredentials:
        if self._static is not None:
            return self._static
        assert self._file is not None
        try:
            st = self._file.stat()
        except OSError as exc:
            raise BackendError(
                f"AWS shared credentials file {self._file} unreadable: {exc.strerror}"
            ) from None
        stamp = (st.st_mtime_ns, st.st_size)
        with self._lock:
            if self._cached is None or self._cached_stamp != stamp:
                self._cached = read_credentials_file(self._file, self._profile)
                self._cached_stamp = stamp
            return self._cached


def read_credentials_file(path: Path, profile: str) -> AwsCredentials:
    """Read one profile of an AWS shared credentials file (INI format)."""
    parser = configparser.ConfigParser(interpolation=None, default_section="\0none")
    try:
        with path.open(encoding="utf-8") as fh:
            parser.read_file(fh)
    except OSError as exc:
        raise BackendConfigError(
            f"AWS shared credentials file {path} unreadable: {exc.strerror}"
        ) from None
    except UnicodeDecodeError as exc:
        raise BackendConfigError(
            f"AWS shared credentials file {path} is not UTF-8 text (byte {exc.start})"
        ) from None
    except configparser.Error as exc:
        # The parser's message may quote a line of the file (a secret): name the line only.
        line = getattr(exc, "lineno", None)
        where = f" (line {line})" if line else ""
        raise BackendConfigError(
            f"AWS shared credentials file {path} is malformed{where}"
        ) from None
    if not parser.has_section(profile):
        raise BackendConfigError(f"profile {profile!r} not found in {path}")
    section = parser[profile]
    access = section.get("aws_access_key_id", "").strip()
    secret = section.get("aws_secret_access_key", "").strip()
    token = section.get("aws_session_token", "").strip() or None
    if not access or not secret:
        raise BackendConfigError(
            f"profile {profile!r} in {path} lacks aws_access_key_id or aws_secret_access_key"
        )
    return AwsCredentials(access, secret, token, source=f"file:{path} [{profile}]")


def shared_file(env: Mapping[str, str], variable: str, name: str) -> Path:
    """An AWS shared file: the path in ``variable``, else ``~/.aws/<name>``."""
    explicit = env.get(variable)
    if explicit:
        return Path(explicit).expanduser()
    home = env.get("HOME") or str(Path.home())
    return Path(home) / ".aws" / name


def default_credentials_file(env: Mapping[str, str]) -> Path:
    return shared_file(env, "AWS_SHARED_CREDENTIALS_FILE", "credentials")


def resolve_credentials(
    *,
    access_key_id: str | None,
    secret_access_key: str | None,
    session_token: str | None,
    credentials_file: str | None,
    profile: str | None,
    env: Mapping[str, str] | None = None,
    region: str = "us-east-1",
) -> CredentialsProvider:
    """Pick the credentials source by the documented precedence."""
    environ: Mapping[str, str] = os.environ if env is None else env
    if access_key_id or secret_access_key:
        if not (access_key_id and secret_access_key):
            raise BackendConfigError("access_key_id and secret_access_key must be given together")
        return CredentialsProvider(
            static=AwsCredentials(
                access_key_id, secret_access_key, session_token or None, source="options"
            )
        )
    # An explicitly chosen profile or file means "use the file", even if env keys exist.
    if not profile and not credentials_file:
        env_access = environ.get("AWS_ACCESS_KEY_ID")
        env_secret = environ.get("AWS_SECRET_ACCESS_KEY")
        if env_access or env_secret:
            if not (env_access and env_secret):
                raise BackendConfigError(
                    "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY must be set together"
                )
            return CredentialsProvider(
                static=AwsCredentials(
                    env_access,
                    env_secret,
                    environ.get("AWS_SESSION_TOKEN") or None,
                    source="environment",
                )
            )
    path = (
        Path(credentials_file).expanduser()
        if credentials_file
        else default_credentials_file(environ)
    )
    chosen_profile = profile or environ.get("AWS_PROFILE") or "default"
    if not path.exists():
        process = _process_source(environ, chosen_profile) if not credentials_file else None
        if process is not None:
            return process  # type: ignore[return-value]  # same get() / source
        if credentials_file or profile:
            raise BackendConfigError(f"AWS shared credentials file {path} does not exist")
        temporary = _temporary_source(environ, region)
        if temporary is not None:
            return temporary  # type: ignore[return-value]  # same get() / source
        raise BackendConfigError(
            "no AWS credentials: set access_key_id/secret_access_key, the AWS_ACCESS_KEY_ID/"
            f"AWS_SECRET_ACCESS_KEY environment, a shared credentials file ({path} missing), "
            "web identity (AWS_WEB_IDENTITY_TOKEN_FILE), container credentials, or allow "
            "instance metadata (AWS_EC2_METADATA_DISABLED is true)"
        )
    provider = CredentialsProvider(credentials_file=path, profile=chosen_profile)
    provider.get()  # validate now: a wrong profile is a startup error, not a runtime one
    return provider


def _process_source(environ: Mapping[str, str], profile: str) -> object | None:
    """credential_process of the profile in the shared config file (after the credentials
    file, before web identity, as in the SDKs' chain), or None."""
    from kms_plugin.backends.awskms import chain

    command = chain.configured_process(environ, profile)
    return chain.credential_process(command, environ) if command else None


def _temporary_source(environ: Mapping[str, str], region: str) -> object | None:
    """Web identity, container credentials or IMDSv2, in the SDKs' order."""
    from kms_plugin.backends.awskms import chain

    if environ.get("AWS_WEB_IDENTITY_TOKEN_FILE"):
        return chain.web_identity(environ, region)
    if environ.get("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI") or environ.get(
        "AWS_CONTAINER_CREDENTIALS_FULL_URI"
    ):
        return chain.container(environ)
    if not chain.metadata_disabled(environ):
        return chain.instance_metadata(environ)
    return None


_LOOPBACK = ("localhost", "127.0.0.1", "::1")


def check_endpoint_scheme(endpoint: str, allow_http: bool) -> None:
    """https always; plain http only to loopback (tests, a local proxy) unless allowed."""
    parts = urlsplit(endpoint)
    if parts.scheme == "https":
        return
    if parts.scheme != "http":
        raise BackendConfigError(f"awskms endpoint_url {endpoint!r} must be https://")
    host = parts.hostname or ""
    if host in _LOOPBACK or host.startswith("127.") or allow_http:
        return
    raise BackendConfigError(
        f"awskms endpoint_url {endpoint!r} is plain http to a non-loopback host: credentials "
        "signatures and wrapped keys would cross the network unprotected; use https, or set "
        "--awskms-allow-http if a trusted proxy is meant"
    )


def resolve_region(region: str | None, key_id: str, env: Mapping[str, str] | None = None) -> str:
    """Region from the option, ``AWS_REGION``, ``AWS_DEFAULT_REGION``, or the key ARN."""
    environ: Mapping[str, str] = os.environ if env is None else env
    if region:
        return region
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        if environ.get(name):
            return environ[name]
    parts = key_id.split(":")
    if key_id.startswith("arn:") and len(parts) >= 6 and parts[3]:
        return parts[3]
    raise BackendConfigError("no AWS region: set the region option, AWS_REGION, or use a key ARN")


def resolve_endpoint(
    endpoint_url: str | None, region: str, env: Mapping[str, str] | None = None
) -> str:
    """Endpoint from the option, ``AWS_ENDPOINT_URL_KMS``, ``AWS_ENDPOINT_URL``, or AWS's."""
    environ: Mapping[str, str] = os.environ if env is None else env
    for candidate in (
        endpoint_url,
        environ.get("AWS_ENDPOINT_URL_KMS"),
        environ.get("AWS_ENDPOINT_URL"),
    ):
        if candidate:
            return candidate
    suffix = "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"
    return f"https://kms.{region}.{suffix}"


__all__ = [
    "AwsCredentials",
    "CredentialsProvider",
    "check_endpoint_scheme",
    "default_credentials_file",
    "read_credentials_file",
    "resolve_credentials",
    "resolve_endpoint",
    "resolve_region",
]
