"""The awskms backend and the plugin against the other AWS KMS emulators' behaviour.

Our fake answers like AWS by default; with a profile it answers like nsmithuk/local-kms,
LocalStack (current and mid-2025) or an older moto server (see
``fake_kms/profiles.py`` for what each one does differently and where that was
read).  The same backend must work on all of them: find a key version with whatever the
endpoint offers, ask an operation the endpoint lacks once only, never mistake "not
implemented" for an outage (retries, circuit breaker) or an unexpected answer for success,
and keep the key_id-never-repeats property.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import pytest

from fake_kms import FakeKms
from fake_kms.cli import build_parser
from fake_kms.profiles import PROFILES, get_profile
from kms_plugin.backends import errors
from kms_plugin.backends.awskms import AwsKmsBackend, AwsKmsOptions, sigv4
from kms_plugin.backends.awskms.backend import STATIC_VERSION
from kms_plugin.backends.awskms.breaker import BreakerState
from kms_plugin.backends.awskms.client import (
    UnsupportedOperation,
    aws_error_type,
    classify_error,
    parse_error,
)
from kms_plugin.backends.awskms.credentials import AwsCredentials
from kms_plugin.backends.base import RootKeyVersion
from kms_plugin.cli import main as plugin_main
from kms_plugin.envelope import derive_key_id
from tests.kms.apiserver import FakeApiserver
from tests.kms.awskms_rig import FAST_RETRIES, isolated_env
from tests.kms.conftest import BackendRig, StartPlugin

SEED = bytes(range(7, 39))
CONTEXT = {"kms-plugin.edge.io/purpose": "compat", "kms-plugin.edge.io/kek-id": "00ff"}
PROFILE_NAMES = ["aws", "local-kms", "localstack", "localstack-legacy", "moto-legacy"]
# How each emulator's key version is found.
SCHEME = {
    "aws": "m-",  # CurrentKeyMaterialId
    "local-kms": STATIC_VERSION,  # neither CurrentKeyMaterialId nor ListKeyRotations
    "localstack": "m-",  # CurrentKeyMaterialId (not updated by on-demand rotations)
    "localstack-legacy": STATIC_VERSION,
    "moto-legacy": STATIC_VERSION,
}
# Does a rotation show in the version (and so in the key_id)?
ROTATION_VISIBLE = {"aws": True}
# LocalStack derives the account from the access key; "test" is what its docs use.
ACCESS_KEY = {"localstack": "test", "localstack-legacy": "test"}


@dataclass
class Emulator:
    """A fake KMS answering like one emulator, with one key, and backends on it."""

    profile: str
    fake: FakeKms
    key_arn: str
    access_key_id: str
    secret_access_key: str
    _backends: list[AwsKmsBackend] = field(default_factory=list)

    def options(self, **overrides: object) -> dict[str, object]:
        options: dict[str, object] = {
            "key_id": self.key_arn,
            "endpoint_url": self.fake.endpoint,
            "region": self.fake.region,
            "access_key_id": self.access_key_id,
            "secret_access_key": self.secret_access_key,
            **FAST_RETRIES,
        }
        options.update(overrides)
        return {k: v for k, v in options.items() if v is not None}

    def backend(self, **overrides: object) -> AwsKmsBackend:
        backend = AwsKmsBackend(AwsKmsOptions.parse(self.options(**overrides)), env=isolated_env())
        self._backends.append(backend)
        return backend

    def calls(self, operation: str) -> int:
        return self.fake.call_count(operation)

    def rotate(self) -> None:
        self.fake.rotate_key(self.key_arn)

    def close(self) -> None:
        for backend in self._backends:
            backend.close()
        self.fake.stop()


def start_emulator(profile: str) -> Emulator:
    access_key = ACCESS_KEY.get(profile, "AKIDCOMPATTEST000001")
    secret = "compat-secret"
    # local-kms authenticates nothing; the others get their signatures checked as well
    credentials = None if profile == "local-kms" else {access_key: secret}
    fake = FakeKms(profile=profile, credentials=credentials).start()
    return Emulator(profile, fake, fake.create_key("compat"), access_key, secret)


@pytest.fixture(params=PROFILE_NAMES)
def emulator(request: pytest.FixtureRequest) -> Iterator[Emulator]:
    emu = start_emulator(request.param)
    try:
        yield emu
    finally:
        emu.close()


@pytest.fixture
def local_kms() -> Iterator[Emulator]:
    emu = start_emulator("local-kms")
    try:
        yield emu
    finally:
        emu.close()


def assert_no_value_returns(values: list[str]) -> None:
    """Consecutive repeats are fine (stable); going back to an earlier value is not."""
    collapsed = [v for i, v in enumerate(values) if i == 0 or v != values[i - 1]]
    assert len(collapsed) == len(set(collapsed)), values


def wait_for(predicate: Callable[[], bool], timeout: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what or predicate}")


# -- the wire: what each profile answers -----------------------------------------------------


def raw(
    emu: Emulator, operation: str, payload: dict[str, Any], *, sign: bool = True
) -> tuple[int, dict[str, str], bytes]:
    url = urlsplit(emu.fake.endpoint)
    body = json.dumps(payload).encode()
    headers = {
        "Host": url.netloc,
        "Content-Type": "application/x-amz-json-1.1",
        "X-Amz-Target": f"TrentService.{operation}",
    }
    if sign:
        signed = sigv4.sign(
            method="POST",
            path="/",
            headers=headers,
            body=body,
            credentials=AwsCredentials(emu.access_key_id, emu.secret_access_key),
            region=emu.fake.region,
            service="kms",
            now=datetime.now(UTC),
        )
        headers = dict(signed.headers)
    conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=10)
    try:
        conn.request("POST", "/", body=body, headers=headers)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


@pytest.mark.parametrize(
    ("profile", "status", "content_type", "check"),
    [
        ("aws", 400, "application/x-amz-json-1.1", b'"UnknownOperationException"'),
        ("local-kms", 501, "application/x-amz-json-1.1", b"is not implemented"),
        ("localstack", 501, "application/x-amz-json-1.1", b'"InternalFailure"'),
        ("moto-legacy", 500, "text/html; charset=utf-8", b"<title>500"),
    ],
)
def test_each_profile_answers_an_unimplemented_operation_its_own_way(
    profile: str, status: int, content_type: str, check: bytes
) -> None:
    emu = start_emulator(profile)
    try:
        operation = "ListKeyRotations" if profile != "aws" else "MakeCoffee"
        got_status, headers, body = raw(emu, operation, {"KeyId": emu.key_arn})
        assert (got_status, headers["content-type"]) == (status, content_type)
        assert check in body
        error_type, _, aws_error = parse_error(body, headers.get("x-amzn-errortype", ""))
        assert aws_error == (profile in ("aws", "localstack"))
        named = {"aws": "UnknownOperationException", "localstack": "InternalFailure"}
        assert error_type == named.get(profile, "")
    finally:
        emu.close()


def test_local_kms_profile_wire_format(local_kms: Emulator) -> None:
    # unauthenticated requests are served
    status, headers, body = raw(local_kms, "DescribeKey", {"KeyId": local_kms.key_arn}, sign=False)
    meta = json.loads(body)["KeyMetadata"]
    assert status == 200
    assert meta["Arn"].startswith("arn:aws:kms:eu-west-2:111122223333:key/")
    assert "CurrentKeyMaterialId" not in meta and "KeySpec" not in meta
    assert meta["Description"] == "compat" and isinstance(meta["CreationDate"], int)
    # errors: no x-amzn-ErrorType header, AccessDenied with a capital-M Message,
    # InvalidCiphertext with no message at all
    other = local_kms.fake.create_key()
    _, _, blob = raw(local_kms, "Encrypt", {"KeyId": local_kms.key_arn, "Plaintext": "c2VlZA=="})
    ciphertext = json.loads(blob)["CiphertextBlob"]
    status, headers, body = raw(
        local_kms, "Decrypt", {"KeyId": other, "CiphertextBlob": ciphertext}
    )
    answer = json.loads(body)
    assert status == 400 and "x-amzn-errortype" not in headers
    assert answer["__type"] == "AccessDeniedException" and "Message" in answer
    status, _, body = raw(
        local_kms,
        "Decrypt",
        {"CiphertextBlob": ciphertext, "EncryptionContext": {"other": "context"}},
    )
    assert (status, json.loads(body)) == (400, {"__type": "InvalidCiphertextException"})
    # operations without a result answer an empty body; rotation status is just the flag
    status, _, body = raw(local_kms, "EnableKeyRotation", {"KeyId": local_kms.key_arn})
    assert (status, body) == (200, b"")
    _, _, body = raw(local_kms, "GetKeyRotationStatus", {"KeyId": local_kms.key_arn})
    assert json.loads(body) == {"KeyRotationEnabled": True}


def test_localstack_profile_keeps_the_material_id_over_on_demand_rotations() -> None:
    emu = start_emulator("localstack")
    try:
        _, _, body = raw(emu, "DescribeKey", {"KeyId": emu.key_arn})
        before = json.loads(body)["KeyMetadata"]["CurrentKeyMaterialId"]
        assert emu.key_arn.startswith("arn:aws:kms:us-east-1:000000000000:key/")
        for _ in range(10):
            assert raw(emu, "RotateKeyOnDemand", {"KeyId": emu.key_arn})[0] == 200
        status, _, body = raw(emu, "RotateKeyOnDemand", {"KeyId": emu.key_arn})
        assert (status, json.loads(body)["__type"]) == (400, "LimitExceededException")
        _, _, body = raw(emu, "DescribeKey", {"KeyId": emu.key_arn})
        assert json.loads(body)["KeyMetadata"]["CurrentKeyMaterialId"] == before
    finally:
        emu.close()


def test_fake_kms_command_takes_a_profile() -> None:
    args = build_parser().parse_args(["--profile", "local-kms"])
    assert args.profile == "local-kms" and args.region is None
    assert set(PROFILE_NAMES) <= set(PROFILES)
    with pytest.raises(ValueError, match="unknown fake KMS profile"):
        get_profile("vault")


# -- error parsing and classification ---------------------------------------------------


NOT_IMPLEMENTED_TEXT = "X-Amz-Target (TrentService.X) is not implemented"


@pytest.mark.parametrize(
    ("body", "header", "expected"),
    [
        (b'{"__type":"NotFoundException","message":"gone"}', "", ("NotFoundException", "gone")),
        (
            b'{"__type":"com.amazonaws.kms#DisabledException","Message":"off"}',
            "",
            ("DisabledException", "off"),
        ),
        (b'{"code":"ThrottlingException"}', "", ("ThrottlingException", "")),
        (
            b'{"Error":{"Code":"KMSInvalidStateException","Message":"pending"}}',
            "",
            ("KMSInvalidStateException", "pending"),
        ),
        (b"", "IncorrectKeyException:http://internal.amazon.com/", ("IncorrectKeyException", "")),
        (b"AccessDeniedException", "", ("AccessDeniedException", "")),
        (NOT_IMPLEMENTED_TEXT.encode(), "", ("", NOT_IMPLEMENTED_TEXT)),
        (b"<html><h1>Internal   Server Error</h1></html>", "", ("", "Internal Server Error")),
    ],
)
def test_error_answers_are_parsed_tolerantly(
    body: bytes, header: str, expected: tuple[str, str]
) -> None:
    error_type, message, _ = parse_error(body, header)
    assert (error_type, message) == expected


@pytest.mark.parametrize(
    ("status", "error_type", "message", "optional"),
    [
        (501, "", "X-Amz-Target (TrentService.ListKeyRotations) is not implemented", False),
        (501, "UnsupportedOperationException", "Passed X-Amz-Target is not implemented", False),
        (501, "InternalFailure", "action ListKeyRotations is not yet implemented", False),
        (400, "UnknownOperationException", "", False),
        (500, "", "The ListKeyRotations action has not been implemented", False),
        (500, "", "Internal Server Error", True),  # a bare page, for an optional call
    ],
)
def test_not_implemented_answers_are_unsupported_not_outages(
    status: int, error_type: str, message: str, optional: bool
) -> None:
    failure = classify_error(
        "ListKeyRotations", status, error_type, message, optional=optional, aws_error=False
    )
    assert isinstance(failure.error, UnsupportedOperation)
    assert not failure.retryable and not failure.breaker_failure


@pytest.mark.parametrize(
    ("status", "error_type", "message", "optional", "expected"),
    [
        (500, "", "Internal Server Error", False, errors.BackendUnavailable),  # not optional
        (500, "InternalFailure", "database on fire", True, errors.BackendUnavailable),
        (503, "", "", True, errors.BackendUnavailable),
        (400, "UnsupportedOperationException", "custom key store", True, errors.BackendError),
        (400, "AccessDeniedException", "not implemented for you", True, errors.BackendError),
    ],
)
def test_real_failures_are_not_mistaken_for_missing_operations(
    status: int, error_type: str, message: str, optional: bool, expected: type[Exception]
) -> None:
    failure = classify_error(
        "ListKeyRotations",
        status,
        error_type,
        message,
        optional=optional,
        aws_error=bool(error_type),
    )
    assert type(failure.error) is expected
    assert not isinstance(failure.error, UnsupportedOperation)
    if error_type:
        assert aws_error_type(failure.error) == error_type


# -- the backend on every profile ---------------------------------------------------------


def test_backend_round_trip_on_every_emulator(emulator: Emulator) -> None:
    backend = emulator.backend()
    key = backend.current_key()
    assert key.key_ref == emulator.key_arn
    assert key.version.startswith(SCHEME[emulator.profile])
    wrapped = backend.wrap(SEED, CONTEXT)
    assert wrapped.key == key and SEED not in wrapped.ciphertext
    assert backend.unwrap(wrapped.ciphertext, wrapped.key, CONTEXT) == SEED
    other_context = {**CONTEXT, "kms-plugin.edge.io/kek-id": "01"}
    with pytest.raises(errors.InvalidCiphertext):
        backend.unwrap(wrapped.ciphertext, wrapped.key, other_context)
    tampered = bytearray(wrapped.ciphertext)
    tampered[-1] ^= 0x80
    with pytest.raises(errors.InvalidCiphertext):
        backend.unwrap(bytes(tampered), wrapped.key, CONTEXT)


def test_an_operation_the_endpoint_lacks_is_asked_once_and_never_trips_the_breaker(
    emulator: Emulator,
) -> None:
    backend = emulator.backend()
    versions = [backend.current_key().version for _ in range(6)]
    assert len(set(versions)) == 1
    assert emulator.calls("DescribeKey") == 6
    if SCHEME[emulator.profile] == STATIC_VERSION:
        assert emulator.calls("ListKeyRotations") == 1
        assert emulator.calls("GetKeyRotationStatus") == 1
    else:
        assert emulator.calls("ListKeyRotations") == 0
    assert backend.breaker.state is BreakerState.CLOSED
    assert backend.breaker.consecutive_failures == 0
    assert backend.client.attempts == emulator.fake.total_calls  # nothing was retried


def test_rotation_keeps_old_blobs_readable_and_never_brings_a_key_id_back(
    emulator: Emulator,
) -> None:
    backend = emulator.backend()
    blobs = []
    key_ids = []
    for _ in range(4):
        key = backend.current_key()
        key_ids.append(derive_key_id("awskms", key))
        blobs.append(backend.wrap(SEED, CONTEXT))
        emulator.rotate()
    final = backend.current_key()
    key_ids.append(derive_key_id("awskms", final))
    assert_no_value_returns(key_ids)
    if ROTATION_VISIBLE.get(emulator.profile):
        assert len(set(key_ids)) == len(key_ids)
    else:  # the rotation is invisible: the key_id stays, nothing breaks
        assert len(set(key_ids)) == 1
    for wrapped in blobs:
        assert backend.unwrap(wrapped.ciphertext, wrapped.key, CONTEXT) == SEED
        assert backend.unwrap(wrapped.ciphertext, final, CONTEXT) == SEED  # same key_ref


def test_a_disabled_root_key_is_reported_disabled_on_every_emulator(emulator: Emulator) -> None:
    backend = emulator.backend()
    wrapped = backend.wrap(SEED, CONTEXT)
    emulator.fake.disable_key(emulator.key_arn)
    with pytest.raises(errors.KeyDisabled):
        backend.current_key()  # what the health probe asks: loud on every emulator
    if emulator.profile == "moto-legacy":  # still decrypts with a disabled key
        assert backend.unwrap(wrapped.ciphertext, wrapped.key, CONTEXT) == SEED
    else:
        with pytest.raises(errors.KeyDisabled):
            backend.unwrap(wrapped.ciphertext, wrapped.key, CONTEXT)
    emulator.fake.enable_key(emulator.key_arn)
    assert backend.current_key().key_ref == emulator.key_arn


def test_a_blob_named_with_another_key_is_refused_on_every_emulator(emulator: Emulator) -> None:
    other_arn = emulator.fake.create_key("other")
    with pytest.raises(errors.KeyNotFound, match="previous_key_arns"):  # refused by us first
        emulator.backend().unwrap(b"x" * 64, RootKeyVersion(other_arn, "v"), CONTEXT)
    backend = emulator.backend(previous_key_arns=other_arn)  # allowed: the emulator refuses
    wrapped = backend.wrap(SEED, CONTEXT)
    other = RootKeyVersion(other_arn, wrapped.key.version)
    with pytest.raises(errors.BackendError) as caught:
        backend.unwrap(wrapped.ciphertext, other, CONTEXT)
    expected = "AccessDeniedException" if emulator.profile == "local-kms" else "IncorrectKey"
    assert expected in str(caught.value)


def test_an_unknown_key_is_key_not_found_on_every_emulator(emulator: Emulator) -> None:
    missing = emulator.key_arn.rsplit("/", 1)[0] + "/00000000-0000-4000-8000-000000000000"
    backend = emulator.backend(key_id=missing)
    with pytest.raises(errors.KeyNotFound):
        backend.current_key()


def test_localstack_key_in_another_region_than_the_signing_scope_is_not_found(
    caplog: pytest.LogCaptureFixture,
) -> None:
    emu = start_emulator("localstack")
    try:
        with caplog.at_level(logging.WARNING, logger="kms_plugin.backends.awskms.backend"):
            backend = emu.backend(region="eu-central-1")
        assert "another region" in caplog.text
        with pytest.raises(errors.KeyNotFound, match="Invalid arn"):
            backend.current_key()
    finally:
        emu.close()


def test_key_ids_answered_as_bare_ids_are_accepted_and_other_keys_refused(
    local_kms: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = local_kms.backend()
    key = backend.current_key()
    real_call = backend.client.call
    answer_key: list[object] = [key.key_ref.rsplit("/", 1)[1]]

    def call(operation: str, payload: Any, **kwargs: Any) -> dict[str, Any]:
        answer = real_call(operation, payload, **kwargs)
        if operation in ("Encrypt", "Decrypt"):
            answer["KeyId"] = answer_key[0]
        return answer

    monkeypatch.setattr(backend.client, "call", call)
    wrapped = backend.wrap(SEED, CONTEXT)  # bare id of our key: fine
    assert backend.unwrap(wrapped.ciphertext, key, CONTEXT) == SEED
    answer_key[0] = None  # no KeyId at all: the request named the key
    assert backend.unwrap(wrapped.ciphertext, key, CONTEXT) == SEED
    for wrong in (local_kms.fake.create_key(), "00000000-0000-4000-8000-000000000000", 42):
        answer_key[0] = wrong
        with pytest.raises(errors.BackendError, match="another key"):
            backend.wrap(SEED, CONTEXT)
        with pytest.raises(errors.InvalidCiphertext):
            backend.unwrap(wrapped.ciphertext, key, CONTEXT)


def test_a_transient_failure_while_probing_is_not_remembered_as_unsupported(
    local_kms: Emulator,
) -> None:
    backend = local_kms.backend()
    local_kms.fake.inject_server_error(503, ops="ListKeyRotations", count=3)
    with pytest.raises(errors.BackendUnavailable):
        backend.current_key()
    assert backend.current_key().version == STATIC_VERSION  # asked again, now it is a 501
    assert local_kms.calls("ListKeyRotations") == 4
    backend.current_key()
    assert local_kms.calls("ListKeyRotations") == 4


def test_a_version_scheme_that_worked_is_never_silently_replaced() -> None:
    # CurrentKeyMaterialId vanishing is an error, not a switch to another scheme (whose
    # versions could bring back a key_id used before)
    emu = start_emulator("aws")
    try:
        backend = emu.backend()
        assert backend.current_key().version.startswith("m-")
        emu.fake.store.report_key_material_id = False
        with pytest.raises(errors.BackendError, match="CurrentKeyMaterialId"):
            backend.current_key()
        emu.fake.store.report_key_material_id = True
        assert backend.current_key().version.startswith("m-")
    finally:
        emu.close()
    # ListKeyRotations answering "not implemented" after it worked is a fault
    fake = FakeKms(report_key_material_id=False).start()
    emu = Emulator("aws", fake, fake.create_key(), "AKIDCOMPATTEST000001", "compat-secret")
    try:
        backend = emu.backend()
        assert backend.current_key().version == "r0"
        fake.inject_error("UnsupportedOperationException", status=501, ops="ListKeyRotations")
        with pytest.raises(UnsupportedOperation):
            backend.current_key()
        fake.clear_faults()
        assert backend.current_key().version == "r0"
    finally:
        emu.close()


def test_automatic_rotation_that_cannot_be_seen_is_logged_once(
    local_kms: Emulator, caplog: pytest.LogCaptureFixture
) -> None:
    local_kms.fake.store.enable_key_rotation({"KeyId": local_kms.key_arn})
    backend = local_kms.backend()
    with caplog.at_level(logging.WARNING, logger="kms_plugin.backends.awskms.backend"):
        for _ in range(3):
            assert backend.current_key().version == STATIC_VERSION
    messages = [r.getMessage() for r in caplog.records]
    assert sum("automatic rotation" in m for m in messages) == 1
    assert sum("'static'" in m for m in messages) == 1
    assert local_kms.calls("GetKeyRotationStatus") == 1


def test_unexpected_key_states_are_never_taken_for_an_enabled_key(
    local_kms: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    # local-kms metadata lacks KeySpec (read with AWS's default); a state outside AWS's
    # usable set, or Enabled=false beside KeyState Enabled, is not a usable key
    backend = local_kms.backend()
    key = local_kms.fake.store.get(local_kms.key_arn)
    assert backend.current_key().version == STATIC_VERSION
    key.state = "Unavailable"
    with pytest.raises(errors.BackendUnavailable, match="Unavailable"):
        backend.current_key()
    key.state = "Enabled"
    original = local_kms.fake.store._metadata

    def enabled_false(k: Any) -> dict[str, Any]:
        meta = original(k)
        meta["Enabled"] = False
        return meta

    monkeypatch.setattr(local_kms.fake.store, "_metadata", enabled_false)
    with pytest.raises(errors.KeyDisabled):
        backend.current_key()


# -- the plugin on every profile ----------------------------------------------------------


def emulator_rig(emu: Emulator) -> BackendRig:
    options = emu.options()
    return BackendRig(
        name=f"awskms-{emu.profile}",
        backend="awskms",
        options={f"awskms_{k}": v for k, v in options.items()},
        make_backend=lambda: AwsKmsBackend(AwsKmsOptions.parse(options), env=isolated_env()),
        rotate=emu.rotate,
        disable=lambda: emu.fake.disable_key(emu.key_arn),
        enable=lambda: emu.fake.enable_key(emu.key_arn),
        env=isolated_env(),
    )


def test_plugin_serves_the_apiserver_on_every_emulator(
    emulator: Emulator, start_plugin: StartPlugin
) -> None:
    rig = emulator_rig(emulator)
    rp = start_plugin(rig, refresh_interval=0.05)
    with FakeApiserver(rp.endpoint) as api:
        first = api.sync()
        stored = {f"/registry/secrets/compat/s{i}": b"value-%d" % i for i in range(3)}
        values = {k: api.write(k, v) for k, v in stored.items()}
        emulator.rotate()
        describes = emulator.calls("DescribeKey")
        wait_for(lambda: emulator.calls("DescribeKey") >= describes + 5, what="5 refreshes")
        if ROTATION_VISIBLE.get(emulator.profile):
            wait_for(lambda: api.status().key_id != first.key_id, what="the new key_id")
        else:
            assert api.status().key_id == first.key_id
        second = api.sync()
        values["/registry/secrets/compat/after"] = api.write(
            "/registry/secrets/compat/after", b"after"
        )
        stored["/registry/secrets/compat/after"] = b"after"
    with FakeApiserver(rp.endpoint) as cold:  # a second apiserver: must Decrypt
        for key, value in values.items():
            assert cold.read(key, value) == stored[key]
        assert cold.status().key_id == second.key_id
    # the refresh loop never kept asking for what the endpoint lacks
    assert emulator.calls("ListKeyRotations") <= 1
    assert emulator.calls("GetKeyRotationStatus") <= 1


@pytest.mark.parametrize("profile", PROFILE_NAMES)
def test_selftest_command_passes_against_every_emulator(
    profile: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    emu = start_emulator(profile)
    try:
        argv = ["selftest", "--backend", "awskms", "--json"]
        for name, value in emu.options().items():
            if name in ("access_key_id", "secret_access_key", "session_token"):
                # secrets are never flags: the environment (or the config file) only
                monkeypatch.setenv(f"KMS_PLUGIN_AWSKMS_{name.upper()}", str(value))
            else:
                argv += [f"--awskms-{name.replace('_', '-')}", str(value)]
        code = plugin_main(argv)
        out = capsys.readouterr().out
        assert code == 0, out
        assert json.loads(out)["result"] == "ok"
    finally:
        emu.close()


def test_unwrapped_blob_never_leaks_into_errors(local_kms: Emulator) -> None:
    backend = local_kms.backend()
    secret = b"top-secret-plaintext-bytes-0123"
    wrapped = backend.wrap(secret, CONTEXT)
    for context in ({}, {"x": "y"}):
        with pytest.raises(errors.BackendError) as caught:
            backend.unwrap(wrapped.ciphertext, wrapped.key, context)
        text = str(caught.value)
        assert secret.decode() not in text
        assert base64.b64encode(secret).decode() not in text
