"""The PKCS#11 backend on SoftHSM2."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import pytest

from kms_plugin.backends.base import RootKeyVersion
from kms_plugin.backends.errors import (
    BackendConfigError,
    InvalidCiphertext,
    KeyDisabled,
    KeyNotFound,
)
from kms_plugin.backends.pkcs11 import Pkcs11Backend

CTX = {"purpose": "test"}


@pytest.fixture
def options(softhsm: Any, tmp_path: Path) -> dict[str, object]:
    pin = tmp_path / "pin"
    pin.write_text(softhsm.user_pin + "\n")
    pin.chmod(0o600)
    return {
        "module": softhsm.module,
        "token_label": softhsm.token_label,
        "key_label": f"unit-{secrets.token_hex(4)}",
        "pin_file": str(pin),
    }


@pytest.fixture
def backend(options: dict[str, object]):
    b = Pkcs11Backend.from_options(options)
    b.create_key_version(first=True)
    yield b
    b.close()


def test_keygen_then_rotate_make_increasing_versions_and_the_highest_is_current(backend):
    first = backend.current_key()
    assert first.version.startswith("00000001.")
    with pytest.raises(BackendConfigError):
        backend.create_key_version(first=True)
    second = backend.create_key_version(first=False)
    assert second.version.startswith("00000002.")
    assert backend.current_key() == second


def test_wrap_happens_in_the_hsm_bound_to_context_and_old_versions_still_unwrap(backend):
    old = backend.wrap(b"k" * 32, CTX)
    backend.create_key_version(first=False)
    backend.current_key()
    new = backend.wrap(b"n" * 32, CTX)
    assert new.key.version != old.key.version
    assert backend.unwrap(old.ciphertext, old.key, CTX) == b"k" * 32
    with pytest.raises(InvalidCiphertext):
        backend.unwrap(old.ciphertext, old.key, {"purpose": "other"})
    with pytest.raises(InvalidCiphertext):
        backend.unwrap(old.ciphertext, new.key, CTX)  # another key version


def test_a_lost_session_is_reopened_and_the_call_retried_once(backend):
    wrapped = backend.wrap(b"k" * 32, CTX)
    backend.drop_session()
    assert backend.unwrap(wrapped.ciphertext, wrapped.key, CTX) == b"k" * 32
    assert backend.reopens == 1
    backend.drop_session()
    assert backend.wrap(b"x" * 32, CTX).key == wrapped.key
    assert backend.reopens == 2


def test_another_backend_logging_out_the_token_does_not_break_this_one(backend, options):
    wrapped = backend.wrap(b"k" * 32, CTX)
    other = Pkcs11Backend.from_options(options)
    other.close()  # C_Logout: the login state is per application, so ours goes too
    assert backend.unwrap(wrapped.ciphertext, wrapped.key, CTX) == b"k" * 32


def test_disabled_and_unknown_versions(backend):
    wrapped = backend.wrap(b"k" * 32, CTX)
    backend.set_enabled(wrapped.key.version, False)
    with pytest.raises(KeyDisabled):
        backend.wrap(b"k" * 32, CTX)
    with pytest.raises(KeyDisabled):
        backend.unwrap(wrapped.ciphertext, wrapped.key, CTX)
    with pytest.raises(KeyNotFound):
        backend.unwrap(wrapped.ciphertext, RootKeyVersion(wrapped.key.key_ref, "0000ffff"), CTX)


@pytest.mark.parametrize("mode", [0o640, 0o644, 0o604])
def test_a_pin_file_readable_by_others_is_refused(options, mode):
    Path(str(options["pin_file"])).chmod(mode)
    with pytest.raises(BackendConfigError):
        Pkcs11Backend.from_options(options)


def test_a_wrong_token_or_pin_is_a_config_error(options, tmp_path: Path):
    with pytest.raises(BackendConfigError):
        Pkcs11Backend.from_options({**options, "token_label": "no-such-token"})
    bad_pin = tmp_path / "bad-pin"
    bad_pin.write_text("000000\n")
    bad_pin.chmod(0o600)
    with pytest.raises(BackendConfigError):
        Pkcs11Backend.from_options({**options, "pin_file": str(bad_pin)})
