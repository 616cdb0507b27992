"""SoftHSM2 rig: a private SOFTHSM2_CONF and token directory per test session.

    def test_x(softhsm):
        lib = pkcs11.lib(softhsm.module)
        token = lib.get_token(token_label=softhsm.token_label)
        with token.open(user_pin=softhsm.user_pin) as session: ...

The fixture exports SOFTHSM2_CONF into os.environ for the whole session (restored at the end)
so that the module loaded in-process and any subprocess find the private token; use
``softhsm.env`` to pass it explicitly.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from edge_common.commands import run

MODULE_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
    "/usr/lib/pkcs11/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)


def find_softhsm_module() -> str | None:
    """SOFTHSM2_MODULE if set, else the first installed libsofthsm2.so."""
    override = os.environ.get("SOFTHSM2_MODULE")
    if override:
        return override if os.path.exists(override) else None
    return next((p for p in MODULE_CANDIDATES if os.path.exists(p)), None)


@dataclass(frozen=True)
class SoftHsm:
    module: str  # path of libsofthsm2.so (the PKCS#11 module)
    token_label: str
    user_pin: str
    so_pin: str
    conf_path: Path  # the private softhsm2.conf
    token_dir: Path

    @property
    def env(self) -> dict[str, str]:
        return {"SOFTHSM2_CONF": str(self.conf_path)}

    def init_token(self, label: str | None = None) -> str:
        """Initialise one more token (same PINs) in the free slot; returns its label."""
        label = label or f"edge-test-{secrets.token_hex(4)}"
        init_token(self.conf_path, label, so_pin=self.so_pin, user_pin=self.user_pin)
        return label


def write_conf(directory: Path) -> tuple[Path, Path]:
    token_dir = directory / "tokens"
    token_dir.mkdir(parents=True, exist_ok=True)
    conf = directory / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {token_dir}\n"
        "objectstore.backend = file\n"
        "log.level = ERROR\n"
        "slots.removable = false\n"
    )
    return conf, token_dir


def init_token(conf: Path, label: str, *, so_pin: str, user_pin: str) -> None:
    run(
        [
            "softhsm2-util", "--init-token", "--free",
            "--label", label, "--so-pin", so_pin, "--pin", user_pin,
        ],
        timeout=60,
        env={"SOFTHSM2_CONF": str(conf)},
    )  # fmt: skip


@pytest.fixture(scope="session")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftHsm]:
    module = find_softhsm_module()
    if module is None:
        pytest.fail(
            "libsofthsm2.so not found (install softhsm2, or set SOFTHSM2_MODULE)", pytrace=False
        )
    conf, token_dir = write_conf(tmp_path_factory.mktemp("softhsm"))
    hsm = SoftHsm(
        module=module,
        token_label=f"edge-test-{secrets.token_hex(4)}",
        user_pin="".join(secrets.choice("0123456789") for _ in range(8)),
        so_pin="".join(secrets.choice("0123456789") for _ in range(8)),
        conf_path=conf,
        token_dir=token_dir,
    )
    init_token(conf, hsm.token_label, so_pin=hsm.so_pin, user_pin=hsm.user_pin)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SOFTHSM2_CONF", str(conf))
        yield hsm
