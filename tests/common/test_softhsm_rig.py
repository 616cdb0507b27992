"""The SoftHSM2 rig: a private configuration and an initialised token, usable via PKCS#11."""

from __future__ import annotations

import os
from typing import Any

import pkcs11
import pytest
from pkcs11 import exceptions as p11_errors

from edge_common.commands import run
from tests.rigs.softhsm import SoftHsm


def test_softhsm_conf_is_private_to_this_session(softhsm: SoftHsm) -> None:
    assert os.environ["SOFTHSM2_CONF"] == str(softhsm.conf_path)
    assert softhsm.env == {"SOFTHSM2_CONF": str(softhsm.conf_path)}
    assert f"directories.tokendir = {softhsm.token_dir}" in softhsm.conf_path.read_text()
    assert softhsm.token_dir.parent == softhsm.conf_path.parent
    assert any(softhsm.token_dir.iterdir())  # the token lives in our temp dir


def test_token_is_listed_by_softhsm2_util(softhsm: SoftHsm) -> None:
    out = run(["softhsm2-util", "--show-slots"], timeout=30, env=softhsm.env).stdout_text
    assert softhsm.token_label in out


def test_user_pin_opens_a_session_and_can_make_a_key(softhsm: SoftHsm) -> None:
    lib = pkcs11.lib(softhsm.module)
    token = lib.get_token(token_label=softhsm.token_label)
    with token.open(user_pin=softhsm.user_pin, rw=True) as session:
        key: Any = session.generate_key(pkcs11.KeyType.AES, 256, label="rig-check", store=False)
        iv = session.generate_random(128)
        data = b"sixteen byte msg"
        assert key.decrypt(key.encrypt(data, mechanism_param=iv), mechanism_param=iv) == data


def test_wrong_pin_is_refused(softhsm: SoftHsm) -> None:
    lib = pkcs11.lib(softhsm.module)
    token = lib.get_token(token_label=softhsm.token_label)
    with pytest.raises(p11_errors.PinIncorrect):
        with token.open(user_pin="0" + softhsm.user_pin):
            pass


def test_init_token_adds_another_token(softhsm: SoftHsm) -> None:
    label = softhsm.init_token()
    out = run(["softhsm2-util", "--show-slots"], timeout=30, env=softhsm.env).stdout_text
    assert label in out and softhsm.token_label in out
