# ruff: noqa: F811  (pytest fixtures imported from the sibling test module)
"""pkcs11 hardening (issue 14 points 1, 2, 7): genuine root keys only, key_ids that name
one key, the module lock bounded by the caller's deadline, a refused PIN not hammered."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pkcs11
import pytest
from pkcs11 import Attribute, KeyType, ObjectClass

from kms_plugin.backends.base import RootKeyVersion
from kms_plugin.backends.errors import BackendUnavailable, CredentialsRefused
from kms_plugin.backends.pkcs11 import Pkcs11Backend, module_lock
from tests.kms.test_pkcs11_backend import backend, options  # noqa: F401 - shared fixtures

CTX = {"purpose": "test"}


@contextlib.contextmanager
def _session(backend: Pkcs11Backend) -> Iterator[Any]:
    """An admin's session on the token (the process is logged in already)."""
    lib = pkcs11.lib(backend.module)
    with lib.get_token(token_label=backend.token_label).open(rw=True) as session:
        yield session


def test_an_imported_key_with_a_higher_id_is_ignored_logged_and_counted(
    backend, softhsm, caplog
):
    genuine = backend.current_key()
    with _session(backend) as s, caplog.at_level(logging.WARNING):
        # anyone with the PIN can import a key they know, with a higher CKA_ID
        s.create_object({
            Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES,
            Attribute.VALUE: b"k" * 32, Attribute.LABEL: backend.key_label,
            Attribute.ID: b"\x00\x00\x00\x09", Attribute.TOKEN: True, Attribute.PRIVATE: True,
            Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
            Attribute.ENCRYPT: True, Attribute.DECRYPT: True,
        })
        # generated in the token, but extractable: it may have left the HSM
        s.generate_key(KeyType.AES, 256, id=b"\x00\x00\x00\x0a", label=backend.key_label,
                       store=True, template={Attribute.EXTRACTABLE: True,
                                             Attribute.SENSITIVE: False})
        assert backend.current_key() == genuine
    assert backend.rejected_keys == 2
    assert backend.wrap(b"x" * 32, CTX).key == genuine
    assert "not generated inside the token or once extractable" in caplog.text
    assert "00000009" in caplog.text and "0000000a" in caplog.text


def test_root_keys_are_local_never_extractable_and_have_only_encrypt_and_decrypt(
    backend, softhsm
):
    version = backend.create_key_version(first=False).version
    with _session(backend) as s:
        (obj,) = [o for o in s.get_objects({Attribute.LABEL: backend.key_label,
                                            Attribute.ID: bytes.fromhex(version[:8])})]
        for attr in (Attribute.LOCAL, Attribute.NEVER_EXTRACTABLE, Attribute.ALWAYS_SENSITIVE,
                     Attribute.SENSITIVE, Attribute.ENCRYPT, Attribute.DECRYPT):
            assert obj[attr] is True, attr
        for attr in (Attribute.EXTRACTABLE, Attribute.WRAP, Attribute.UNWRAP, Attribute.SIGN,
                     Attribute.VERIFY, Attribute.DERIVE):
            assert obj[attr] is False, attr


def test_two_tokens_with_the_same_key_id_report_different_key_ids(backend, options, softhsm):
    other_token = softhsm.init_token()  # a fresh process sees the new token: use the CLI
    out = subprocess.run(
        [sys.executable, "-m", "kms_plugin", "keygen", "--backend", "pkcs11",
         "--pkcs11-module", str(options["module"]), "--pkcs11-token-label", other_token,
         "--pkcs11-key-label", str(options["key_label"]),
         "--pkcs11-pin-file", str(options["pin_file"])],
        env={**os.environ, **softhsm.env}, capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    other_version = out.stdout.rsplit("version ", 1)[1].strip()
    mine = backend.current_key().version
    assert other_version[:8] == mine[:8] == "00000001"
    assert other_version != mine  # the fingerprint, computed by each token, tells them apart


def test_two_concurrent_rotations_to_the_same_id_stay_apart_and_all_agree_on_current(
    backend, options, softhsm
):
    with _session(backend) as s:  # two rotations both chose ID 2
        for _ in range(2):
            s.generate_key(KeyType.AES, 256, id=b"\x00\x00\x00\x02", label=backend.key_label,
                           store=True, template={Attribute.EXTRACTABLE: False,
                                                 Attribute.SENSITIVE: True})
    other = Pkcs11Backend.from_options(options)
    try:
        current = backend.current_key()
        assert current.version.startswith("00000002.")
        assert other.current_key() == current  # a deterministic tie-break
        versions = {v for v in backend._scan() if v.startswith("00000002.")}
        assert len(versions) == 2
        # a record naming the bare ID (written before fingerprints) is ambiguous now
        with pytest.raises(Exception, match="names 2 keys"):
            backend.unwrap(b"\x01" + b"\x00" * 40, RootKeyVersion(backend.key_label,
                                                                 "00000002"), CTX)
    finally:
        other.close()


def test_a_record_naming_a_bare_id_still_unwraps(backend):
    from pkcs11 import Mechanism
    from pkcs11.mechanisms import GCMParams

    from kms_plugin.backends.base import wrap_aad
    from kms_plugin.backends.pkcs11 import _AAD_DOMAIN

    legacy = RootKeyVersion(backend.key_label, "00000001")
    nonce = b"n" * 12
    obj = backend._key(backend.current_key().version)
    sealed = obj.encrypt(b"k" * 32, mechanism=Mechanism.AES_GCM,
                         mechanism_param=GCMParams(nonce, wrap_aad(_AAD_DOMAIN, legacy, CTX),
                                                   128))
    assert backend.unwrap(b"\x01" + nonce + bytes(sealed), legacy, CTX) == b"k" * 32


def test_the_module_lock_is_waited_for_only_until_the_callers_deadline(backend):
    lock = module_lock(backend.module)
    held, release = threading.Event(), threading.Event()

    def hog() -> None:
        with lock:
            held.set()
            release.wait(10)

    t = threading.Thread(target=hog)
    t.start()
    held.wait(5)
    try:
        started = time.monotonic()
        with pytest.raises(BackendUnavailable, match="busy"):
            backend.wrap(b"k" * 32, CTX, deadline=time.monotonic() + 0.2)
        assert time.monotonic() - started < 2.0  # not the 10 s the hog holds it
    finally:
        release.set()
        t.join()
    assert backend.wrap(b"k" * 32, CTX).key == backend.current_key()


def test_a_refused_pin_is_not_retried_on_every_call_and_a_fixed_pin_file_is_used_at_once(
    backend, options
):
    pin_file = Path(str(options["pin_file"]))
    good = pin_file.read_text()
    pin_file.write_text("999999\n")
    backend._pin = "999999"  # the token's PIN changed under the running plugin
    backend.drop_session()  # the only session: the login is gone with it
    before = backend.login_attempts
    with pytest.raises(CredentialsRefused):
        backend.wrap(b"k" * 32, CTX)
    assert backend.login_attempts == before + 1
    for _ in range(5):
        with pytest.raises(CredentialsRefused, match="not trying it again"):
            backend.wrap(b"k" * 32, CTX)
    assert backend.login_attempts == before + 1  # backed off: no more C_Login
    pin_file.write_text(good)  # the operator fixes the PIN file
    assert backend.wrap(b"k" * 32, CTX).key == backend.current_key()
    assert backend.login_attempts == before + 2


def _import_known_key(backend: Pkcs11Backend, obj_id: bytes) -> None:
    with _session(backend) as s:
        s.create_object({
            Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES,
            Attribute.VALUE: b"k" * 32, Attribute.LABEL: backend.key_label,
            Attribute.ID: obj_id, Attribute.TOKEN: True, Attribute.PRIVATE: True,
            Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
            Attribute.ENCRYPT: True, Attribute.DECRYPT: True,
        })


def test_a_running_plugin_keeps_its_key_id_and_counts_the_imported_key_in_a_metric(
    request: pytest.FixtureRequest, tmp_path: Path, start_plugin: Any
):
    from edge_common.server import unix_channel
    from edge_proto.kms.v2 import service_pb2, service_pb2_grpc
    from tests.kms.conftest import make_rig

    rig = make_rig("pkcs11", request, tmp_path)
    admin = rig.extra["admin"]
    try:
        rp = start_plugin(rig)
        with unix_channel(rp.endpoint) as ch:
            before = service_pb2_grpc.KeyManagementServiceStub(ch).Status(
                service_pb2.StatusRequest(), timeout=5).key_id
        _import_known_key(admin, b"\x00\x00\x01\x00")
        rp.plugin.monitor.refresh()
        rp.plugin.monitor.probe()
        with unix_channel(rp.endpoint) as ch:
            after = service_pb2_grpc.KeyManagementServiceStub(ch).Status(
                service_pb2.StatusRequest(), timeout=5)
        assert after.key_id == before and after.healthz == "ok"
        value = rp.plugin.metrics.registry.get_sample_value("kms_plugin_backend_rejected_keys")
        assert value == 1
    finally:
        admin.close()


def test_a_refused_pin_makes_the_running_plugin_unhealthy_and_is_counted(
    request: pytest.FixtureRequest, tmp_path: Path, start_plugin: Any
):
    from tests.kms.conftest import make_rig

    rig = make_rig("pkcs11", request, tmp_path)
    admin = rig.extra["admin"]
    try:
        rp = start_plugin(rig)
        admin.close()  # the test's admin session goes: the plugin's is the only one
        inner = rp.plugin.backend.inner
        Path(rig.options["pkcs11_pin_file"]).write_text("999999\n")
        inner._pin = "999999"  # the token's PIN changed, the PIN file was not updated
        inner.drop_session()
        snap = rp.plugin.monitor.probe()
        assert snap.state == "unhealthy" and "refuses the credentials" in snap.reason
        value = rp.plugin.metrics.registry.get_sample_value(
            "kms_plugin_backend_calls_total",
            {"backend": "pkcs11", "operation": "current_key", "outcome": "credentials_refused"})
        assert value == 1
        attempts = inner.login_attempts
        rp.plugin.monitor.probe()
        assert inner.login_attempts == attempts  # backed off
    finally:
        admin.close()
