"""KMS plugin rigs: one interface over every backend the suite runs on.

``backend_rig`` is parametrized over ``local`` (keyring file), ``pkcs11`` (SoftHSM2),
``awskms-fake`` (our fake AWS KMS) and ``awskms-moto`` (moto's server).  A rig knows how to
configure the plugin for its backend, how to rotate and disable the root key for real, and
how to make a fresh backend object.  ``start_plugin`` runs a plugin in process on a real unix
socket (stopped at teardown).
"""

from __future__ import annotations

import dataclasses
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from kms_plugin.backends import local
from kms_plugin.backends.base import KeyBackend
from kms_plugin.config import PluginConfig
from kms_plugin.plugin import Plugin

try:  # the AWS rigs belong to KMS-AWS; their params skip cleanly if the file is missing
    from tests.kms.awskms_rig import FAST_RETRIES, fake_kms, isolated_env, moto_kms  # noqa: F401

    HAVE_AWS_RIG = True
except ImportError:  # pragma: no cover
    HAVE_AWS_RIG = False

# Background work off by default: tests drive probes and refreshes explicitly, or lower these.
QUIET: dict[str, Any] = {
    "health_interval": 3600.0,
    "refresh_interval": 3600.0,
    "retry_interval": 3600.0,
    "metrics_port": -1,
    "log_format": "text",
}


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short directory for unix sockets (paths must stay under 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="kmst-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@dataclass
class BackendRig:
    name: str  # test id
    backend: str  # backend name in the config
    options: dict[str, Any]  # PluginConfig fields for this backend
    make_backend: Callable[[], KeyBackend]
    rotate: Callable[[], None]
    disable: Callable[[], None]
    enable: Callable[[], None]
    env: dict[str, str] = field(default_factory=dict)  # for plugin subprocesses
    extra: dict[str, Any] = field(default_factory=dict)

    def config(self, endpoint: str = "unix:///@unused", **overrides: Any) -> PluginConfig:
        values: dict[str, Any] = {**QUIET, "backend": self.backend, **self.options}
        values.update(overrides)
        values["endpoint"] = endpoint
        return PluginConfig(**_coerce(values))


def _coerce(values: dict[str, Any]) -> dict[str, Any]:
    from kms_plugin.config import LogFormat

    if isinstance(values.get("log_format"), str):
        values["log_format"] = LogFormat(values["log_format"])
    return values


def _discard(_value: object) -> None:
    return None


def local_rig(tmp_path: Path) -> BackendRig:
    ring = tmp_path / "keyring.json"
    local.keygen(ring, "test-ring")

    def disable() -> None:
        local.set_state(ring, local.load_keyring(ring).primary.version, "disabled")

    def enable() -> None:
        local.set_state(ring, local.load_keyring(ring).primary.version, "enabled")

    return BackendRig(
        name="local",
        backend="local",
        options={"local_keyring": str(ring)},
        make_backend=lambda: local.LocalBackend(ring),
        rotate=lambda: _discard(local.rotate(ring)),
        disable=disable,
        enable=enable,
        extra={"keyring": ring},
    )


def pkcs11_rig(tmp_path: Path, hsm: Any) -> BackendRig:
    from kms_plugin.backends.pkcs11 import Pkcs11Backend

    pin_file = tmp_path / "pin"
    pin_file.write_text(hsm.user_pin + "\n")
    pin_file.chmod(0o600)
    options = {
        "module": hsm.module,
        "token_label": hsm.token_label,
        "key_label": f"kms-test-{secrets.token_hex(4)}",
        "pin_file": str(pin_file),
    }
    admin = Pkcs11Backend.from_options(options)
    admin.create_key_version(first=True)

    def set_enabled(flag: bool) -> None:
        admin.set_enabled(admin.current_key().version, flag)

    return BackendRig(
        name="pkcs11",
        backend="pkcs11",
        options={f"pkcs11_{k}": v for k, v in options.items()},
        make_backend=lambda: Pkcs11Backend.from_options(options),
        rotate=lambda: _discard(admin.create_key_version(first=False)),
        disable=lambda: set_enabled(False),
        enable=lambda: set_enabled(True),
        env=dict(hsm.env),
        extra={"admin": admin},
    )


def _aws_config_fields(options: dict[str, object]) -> dict[str, Any]:
    return {f"awskms_{k}": v for k, v in options.items()}


def fake_kms_rig(rig: Any) -> BackendRig:
    from kms_plugin.backends.awskms import AwsKmsBackend, AwsKmsOptions

    options = rig.backend_options()
    return BackendRig(
        name="awskms-fake",
        backend="awskms",
        options=_aws_config_fields(options),
        make_backend=lambda: AwsKmsBackend(AwsKmsOptions.parse(options), env=isolated_env()),
        rotate=lambda: _discard(rig.rotate_key()),
        disable=rig.disable_key,
        enable=rig.enable_key,
        env=isolated_env(),
        extra={"fake": rig},
    )


def moto_rig(moto: Any) -> BackendRig:
    from kms_plugin.backends.awskms import AwsKmsBackend, AwsKmsOptions

    key_arn = moto.create_key("kms plugin contract test")  # a key of its own per test
    options = moto.backend_options(key_id=key_arn)
    return BackendRig(
        name="awskms-moto",
        backend="awskms",
        options=_aws_config_fields(options),
        make_backend=lambda: AwsKmsBackend(AwsKmsOptions.parse(options), env=isolated_env()),
        rotate=lambda: moto.rotate_key(key_arn),
        disable=lambda: moto.disable_key(key_arn),
        enable=lambda: moto.enable_key(key_arn),
        env=isolated_env(),
        # moto reports a disabled key in DescribeKey but still encrypts and decrypts with it
        extra={"moto": moto, "key_arn": key_arn, "backend_enforces_disable": False},
    )


ALL_BACKENDS = ["local", "pkcs11", "awskms-fake", "awskms-moto"]


def make_rig(name: str, request: pytest.FixtureRequest, tmp_path: Path) -> BackendRig:
    if name == "local":
        return local_rig(tmp_path)
    if name == "pkcs11":
        return pkcs11_rig(tmp_path, request.getfixturevalue("softhsm"))
    if not HAVE_AWS_RIG:
        pytest.skip("tests/kms/awskms_rig.py (KMS-AWS) is not there yet")
    if name == "awskms-fake":
        return fake_kms_rig(request.getfixturevalue("fake_kms"))
    if name == "awskms-moto":
        return moto_rig(request.getfixturevalue("moto_kms"))
    raise ValueError(name)


@pytest.fixture(params=ALL_BACKENDS)
def backend_rig(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BackendRig]:
    rig = make_rig(request.param, request, tmp_path)
    yield rig
    admin = rig.extra.get("admin")
    if admin is not None:
        admin.close()


@pytest.fixture
def local_backend_rig(tmp_path: Path) -> BackendRig:
    return local_rig(tmp_path)


@dataclass
class RunningPlugin:
    plugin: Plugin
    endpoint: str

    @property
    def calls(self) -> dict[str, int]:
        """Backend calls so far, by operation (the instrumented backend's tally)."""
        return dict(self.plugin.backend.tally)

    def stop(self) -> None:
        self.plugin.stop(grace=1.0)


StartPlugin = Callable[..., RunningPlugin]


@pytest.fixture
def start_plugin(sock_dir: Path) -> Iterator[StartPlugin]:
    """start_plugin(rig, backend=None, **config_overrides) -> RunningPlugin (in process)."""
    running: list[RunningPlugin] = []

    def start(
        rig: BackendRig,
        *,
        backend: KeyBackend | None = None,
        audit_stream: Any = None,
        **overrides: Any,
    ) -> RunningPlugin:
        endpoint = overrides.pop("endpoint", None) or (
            f"unix://{sock_dir}/kms-{len(running)}-{secrets.token_hex(3)}.sock"
        )
        config = rig.config(endpoint, **overrides)
        plugin = Plugin.create(
            config, backend=backend or rig.make_backend(), audit_stream=audit_stream
        )
        plugin.start()
        rp = RunningPlugin(plugin, endpoint)
        running.append(rp)
        return rp

    yield start
    for rp in running:
        rp.stop()


def replace_config(config: PluginConfig, **changes: Any) -> PluginConfig:
    return dataclasses.replace(config, **changes)
