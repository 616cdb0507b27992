"""The awskms backend against our fake KMS: round trips, key states, rotation, faults."""

from __future__ import annotations

import base64
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from fake_kms import TEST_ACCESS_KEY_ID, TEST_SECRET_ACCESS_KEY, FakeKms
from kms_plugin.backends import errors
from kms_plugin.backends.awskms import AwsKmsBackend, AwsKmsOptions
from kms_plugin.backends.awskms import backend as backend_module
from kms_plugin.backends.awskms.breaker import BreakerState
from kms_plugin.backends.base import RootKeyVersion
from kms_plugin.backends.registry import load_backend_class
from tests.kms.awskms_rig import FAST_RETRIES, FakeKmsRig, isolated_env

SEED = bytes(range(32))
CONTEXT = {"kms-plugin.example.com/key": "kek-1"}


def test_registry_loads_the_awskms_backend_by_name() -> None:
    assert load_backend_class("awskms") is AwsKmsBackend


def test_wrap_unwrap_round_trip(fake_kms: FakeKmsRig) -> None:
    backend = fake_kms.backend()
    wrapped = backend.wrap(SEED, CONTEXT)
    assert wrapped.key.key_ref == fake_kms.key_arn
    assert wrapped.ciphertext != SEED and SEED not in wrapped.ciphertext
    assert backend.unwrap(wrapped.ciphertext, wrapped.key, CONTEXT) == SEED
    assert fake_kms.calls["Encrypt"] == 1 and fake_kms.calls["Decrypt"] == 1


def test_current_key_names_the_arn_and_is_stable_while_unchanged(fake_kms: FakeKmsRig) -> None:
    backend = fake_kms.backend()
    first = backend.current_key()
    assert first.key_ref == fake_kms.key_arn
    assert first.version.startswith("m-")
    assert backend.current_key() == first


def test_alias_is_resolved_to_the_key_arn(fake_kms: FakeKmsRig) -> None:
    fake_kms.server.create_alias("alias/edge-root", fake_kms.key_arn)
    backend = fake_kms.backend(key_id="alias/edge-root")
    key = backend.current_key()
    assert key.key_ref == fake_kms.key_arn
    wrapped = backend.wrap(SEED, CONTEXT)
    assert backend.unwrap(wrapped.ciphertext, wrapped.key, CONTEXT) == SEED


def test_unwrap_with_another_context_is_invalid_ciphertext(fake_kms: FakeKmsRig) -> None:
    backend = fake_kms.backend()
    wrapped = backend.wrap(SEED, CONTEXT)
    with pytest.raises(errors.InvalidCiphertext):
        backend.unwrap(wrapped.ciphertext, wrapped.key, {"kms-plugin.example.com/key": "kek-2"})
    with pytest.raises(errors.InvalidCiphertext):
        backend.unwrap(wrapped.ciphertext, wrapped.key, {})


def test_tampered_blob_is_invalid_ciphertext(fake_kms: FakeKmsRig) -> None:
    backend = fake_kms.backend()
    wrapped = backend.wrap(SEED, CONTEXT)
    for index in (0, len(wrapped.ciphertext) // 2, len(wrapped.ciphertext) - 1):
        blob = bytearray(wrapped.ciphertext)
        blob[index] ^= 0x01
        with pytest.raises(errors.InvalidCiphertext):
            backend.unwrap(bytes(blob), wrapped.key, CONTEXT)
    with pytest.raises(errors.InvalidCiphertext):
        backend.unwrap(b"", wrapped.key, CONTEXT)


def test_a_record_naming_another_key_is_refused_unless_that_key_is_allowed(
    fake_kms: FakeKmsRig,
) -> None:
    backend = fake_kms.backend()
    wrapped = backend.wrap(SEED, CONTEXT)
    other_arn = fake_kms.create_key()
    other = RootKeyVersion(key_ref=other_arn, version=wrapped.key.version)
    decrypts = fake_kms.calls.get("Decrypt", 0)
    with pytest.raises(errors.KeyNotFound, match="previous_key_arns"):
        backend.unwrap(wrapped.ciphertext, other, CONTEXT)
    assert fake_kms.calls.get("Decrypt", 0) == decrypts  # the stored ARN never reached AWS
    allowing = fake_kms.backend(previous_key_arns=other_arn)
    with pytest.raises(errors.InvalidCiphertext):  # allowed: AWS itself refuses the blob
        allowing.unwrap(wrapped.ciphertext, other, CONTEXT)
    assert fake_kms.calls.get("Decrypt", 0) == decrypts + 1


def test_rotation_changes_the_version_and_old_blobs_still_unwrap(fake_kms: FakeKmsRig) -> None:
    backend = fake_kms.backend()
    before = backend.current_key()
    old = backend.wrap(SEED, CONTEXT)
    fake_kms.rotate_key()
    after = backend.current_key()
    assert after.key_ref == before.key_ref
    assert after.version != before.version
    new = backend.wrap(b"new seed", CONTEXT)
    assert new.key == after
    assert backend.unwrap(old.ciphertext, old.key, CONTEXT) == SEED
    assert backend.unwrap(new.ciphertext, new.key, CONTEXT) == b"new seed"


def test_rotation_version_from_list_key_rotations_when_material_id_is_absent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Older KMS (and moto) report no CurrentKeyMaterialId: the version comes from the list of
    # completed rotations, read page by page.
    monkeypatch.setattr(backend_module, "_ROTATION_PAGE", 2)
    credentials = {TEST_ACCESS_KEY_ID: TEST_SECRET_ACCESS_KEY}
    with FakeKms(credentials=credentials, report_key_material_id=False) as fake:
        arn = fake.create_key()
        backend = AwsKmsBackend(
            AwsKmsOptions.parse(
                {
                    "key_id": arn,
                    "endpoint_url": fake.endpoint,
                    "region": fake.region,
                    "access_key_id": TEST_ACCESS_KEY_ID,
                    "secret_access_key": TEST_SECRET_ACCESS_KEY,
                    **FAST_RETRIES,
                }
            ),
            env=isolated_env(),
        )
        try:
            seen = [backend.current_key().version]
            old = backend.wrap(SEED, CONTEXT)
            for _ in range(5):
                fake.rotate_key(arn)
                seen.append(backend.current_key().version)
            assert seen[0] == "r0"
            assert [v.split("-")[0] for v in seen] == ["r0", "r1", "r2", "r3", "r4", "r5"]
            assert len(set(seen)) == len(seen)
            assert fake.calls["ListKeyRotations"] >= 1 + 3  # 5 rotations: 3 pages of 2
            assert backend.unwrap(old.ciphertext, old.key, CONTEXT) == SEED
        finally:
            backend.close()


@pytest.mark.parametrize("operation", ["current_key", "wrap", "unwrap"])
def test_disabled_key_is_key_disabled(fake_kms: FakeKmsRig, operation: str) -> None:
    backend = fake_kms.backend()
    wrapped = backend.wrap(SEED, CONTEXT)
    fake_kms.disable_key()
    with pytest.raises(errors.KeyDisabled):
        _run(backend, operation, wrapped.ciphertext, wrapped.key)
    fake_kms.enable_key()
    _run(backend, operation, wrapped.ciphertext, wrapped.key)


@pytest.mark.parametrize("operation", ["current_key", "wrap", "unwrap"])
def test_key_pending_deletion_is_key_disabled(fake_kms: FakeKmsRig, operation: str) -> None:
    backend = fake_kms.backend()
    wrapped = backend.wrap(SEED, CONTEXT)
    fake_kms.schedule_deletion()
    with pytest.raises(errors.KeyDisabled):
        _run(backend, operation, wrapped.ciphertext, wrapped.key)


@pytest.mark.parametrize("operation", ["current_key", "wrap", "unwrap"])
def test_deleted_key_is_key_not_found(fake_kms: FakeKmsRig, operation: str) -> None:
    backend = fake_kms.backend()
    wrapped = backend.wrap(SEED, CONTEXT)
    fake_kms.delete_key()
    with pytest.raises(errors.KeyNotFound):
        _run(backend, operation, wrapped.ciphertext, wrapped.key)


def _run(backend: AwsKmsBackend, operation: str, blob: bytes, key: RootKeyVersion) -> None:
    if operation == "current_key":
        backend.current_key()
    elif operation == "wrap":
        backend.wrap(SEED, CONTEXT)
    else:
        assert backend.unwrap(blob, key, CONTEXT) == SEED


def test_throttling_is_retried_then_succeeds(fake_kms: FakeKmsRig) -> None:
    backend = fake_kms.backend(max_attempts=3)
    backend.current_key()
    fake_kms.inject_throttling(ops="Encrypt", count=2)
    wrapped = backend.wrap(SEED, CONTEXT)
    assert backend.unwrap(wrapped.ciphertext, wrapped.key, CONTEXT) == SEED
    assert fake_kms.calls["Encrypt"] == 3


def test_persistent_throttling_is_backend_throttled_after_max_attempts(
    fake_kms: FakeKmsRig,
) -> None:
    backend = fake_kms.backend(max_attempts=4, breaker_failure_threshold=1)
    backend.current_key()
    fake_kms.inject_throttling(ops="Encrypt")
    with pytest.raises(errors.BackendThrottled, match="ThrottlingException"):
        backend.wrap(SEED, CONTEXT)
    assert fake_kms.calls["Encrypt"] == 4
    # Throttling proves the service is up: it never opens the breaker.
    assert backend.breaker.state is BreakerState.CLOSED


def test_limit_exceeded_is_backend_throttled(fake_kms: FakeKmsRig) -> None:
    backend = fake_kms.backend(max_attempts=2)
    fake_kms.inject_error("LimitExceededException", ops="DescribeKey")
    with pytest.raises(errors.BackendThrottled, match="LimitExceededException"):
        backend.current_key()
    assert fake_kms.calls["DescribeKey"] == 2


def test_server_error_is_retried_then_succeeds(fake_kms: FakeKmsRig) -> None:
    backend = fake_kms.backend(max_attempts=3)
    fake_kms.inject_server_error(500, ops="DescribeKey", count=1)
    fake_kms.inject_server_error(503, ops="DescribeKey", count=1, error_type="ServiceUnavailable")
    assert backend.current_key().key_ref == fake_kms.key_arn
    assert fake_kms.calls["DescribeKey"] == 3


def test_persistent_server_errors_are_backend_unavailable(fake_kms: FakeKmsRig) -> None:
    backend = fake_kms.backend(max_attempts=3, breaker_failure_threshold=10)
    fake_kms.inject_server_error(500, ops="DescribeKey")
    with pytest.raises(errors.BackendUnavailable, match="KMSInternalException"):
        backend.current_key()
    assert fake_kms.calls["DescribeKey"] == 3


def test_dropped_connection_is_retried(fake_kms: FakeKmsRig) -> None:
    backend = fake_kms.backend(max_attempts=3)
    backend.current_key()
    fake_kms.inject_drop(ops="Encrypt", count=1)
    wrapped = backend.wrap(SEED, CONTEXT)
    assert backend.unwrap(wrapped.ciphertext, wrapped.key, CONTEXT) == SEED
    assert fake_kms.calls["Encrypt"] == 2


def test_client_errors_are_never_retried_and_name_the_aws_type(fake_kms: FakeKmsRig) -> None:
    backend = fake_kms.backend(max_attempts=5)
    backend.current_key()
    fake_kms.inject_error("AccessDeniedException", ops="Encrypt", message="not allowed")
    with pytest.raises(errors.BackendError, match="AccessDeniedException") as caught:
        backend.wrap(SEED, CONTEXT)
    assert type(caught.value) is errors.BackendError
    assert fake_kms.calls["Encrypt"] == 1


def test_key_state_errors_are_not_retried(fake_kms: FakeKmsRig) -> None:
    backend = fake_kms.backend(max_attempts=5)
    backend.current_key()
    fake_kms.disable_key()
    with pytest.raises(errors.KeyDisabled):
        backend.wrap(SEED, CONTEXT)
    assert fake_kms.calls["Encrypt"] == 1


@pytest.mark.timeout(30)  # waiting out the fake's 600 s latency would trip this
def test_latency_beyond_the_deadline_is_backend_unavailable_at_the_deadline(
    fake_kms: FakeKmsRig,
) -> None:
    backend = fake_kms.backend(max_attempts=3, request_timeout=60.0)
    backend.current_key()
    fake_kms.inject_latency(600, ops="Encrypt")
    with pytest.raises(errors.BackendUnavailable, match="timed out"):
        backend.wrap(SEED, CONTEXT, deadline=time.monotonic() + 1.0)
    # The deadline left no room for a second attempt.
    assert fake_kms.calls["Encrypt"] == 1


def test_expired_deadline_makes_no_call(fake_kms: FakeKmsRig) -> None:
    backend = fake_kms.backend()
    with pytest.raises(errors.BackendUnavailable, match="deadline"):
        backend.current_key(deadline=time.monotonic() - 1)
    assert fake_kms.total_calls == 0


def test_breaker_opens_after_consecutive_failures_and_then_costs_no_calls(
    fake_kms: FakeKmsRig,
) -> None:
    backend = fake_kms.backend(max_attempts=1, breaker_failure_threshold=3)
    backend.current_key()
    fake_kms.inject_drop(ops="Encrypt")
    for _ in range(3):
        with pytest.raises(errors.BackendUnavailable, match="cannot reach"):
            backend.wrap(SEED, CONTEXT)
    assert backend.breaker.state is BreakerState.OPEN
    for _ in range(5):
        with pytest.raises(errors.BackendUnavailable, match="circuit breaker open"):
            backend.wrap(SEED, CONTEXT)
    assert fake_kms.calls["Encrypt"] == 3


def test_breaker_closes_again_after_a_successful_probe(fake_kms: FakeKmsRig) -> None:
    backend = fake_kms.backend(
        max_attempts=1, breaker_failure_threshold=2, breaker_reset_seconds=0.2
    )
    backend.current_key()
    fake_kms.inject_server_error(500, ops="Encrypt")
    for _ in range(2):
        with pytest.raises(errors.BackendUnavailable):
            backend.wrap(SEED, CONTEXT)
    assert backend.breaker.state is BreakerState.OPEN
    time.sleep(backend.breaker.retry_in() + 0.05)  # let the reset period pass
    # A failing probe opens it again, without a second call.
    with pytest.raises(errors.BackendUnavailable, match="KMSInternalException"):
        backend.wrap(SEED, CONTEXT)
    with pytest.raises(errors.BackendUnavailable, match="circuit breaker open"):
        backend.wrap(SEED, CONTEXT)
    assert fake_kms.calls["Encrypt"] == 3
    fake_kms.clear_faults()
    time.sleep(backend.breaker.retry_in() + 0.05)
    wrapped = backend.wrap(SEED, CONTEXT)
    assert backend.breaker.state is BreakerState.CLOSED
    assert backend.unwrap(wrapped.ciphertext, wrapped.key, CONTEXT) == SEED


def test_concurrent_unwraps_share_the_connection_pool(fake_kms: FakeKmsRig) -> None:
    backend = fake_kms.backend()
    blobs = [backend.wrap(bytes([i]) * 32, CONTEXT) for i in range(32)]
    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(lambda w: backend.unwrap(w.ciphertext, w.key, CONTEXT), blobs * 2))
    assert results == [bytes([i]) * 32 for i in range(32)] * 2
    assert fake_kms.calls["Decrypt"] == 64


def test_unreachable_endpoint_is_backend_unavailable(fake_kms: FakeKmsRig) -> None:
    endpoint = fake_kms.endpoint
    fake_kms.server.stop()
    backend = fake_kms.backend(endpoint_url=endpoint, max_attempts=2)
    with pytest.raises(errors.BackendUnavailable, match="cannot reach"):
        backend.current_key()


def test_error_messages_never_contain_plaintext(fake_kms: FakeKmsRig) -> None:
    secret = b"TOP-SECRET-PLAINTEXT-0123456789!"
    encoded = base64.b64encode(secret).decode()
    backend = fake_kms.backend(max_attempts=1)
    wrapped = backend.wrap(secret, CONTEXT)
    failures: list[errors.BackendError] = []
    with pytest.raises(errors.InvalidCiphertext) as wrong_context:
        backend.unwrap(wrapped.ciphertext, wrapped.key, {"other": "ctx"})
    failures.append(wrong_context.value)
    fake_kms.inject_error("AccessDeniedException")
    with pytest.raises(errors.BackendError) as denied:
        backend.wrap(secret, CONTEXT)
    failures.append(denied.value)
    fake_kms.clear_faults()
    fake_kms.disable_key()
    with pytest.raises(errors.KeyDisabled) as disabled:
        backend.wrap(secret, CONTEXT)
    failures.append(disabled.value)
    for exc in failures:
        text = str(exc)
        assert secret.decode() not in text and encoded not in text
        assert base64.b64encode(wrapped.ciphertext).decode() not in text


def test_plaintext_size_limits_are_enforced_before_any_call(fake_kms: FakeKmsRig) -> None:
    backend = fake_kms.backend()
    backend.current_key()
    with pytest.raises(errors.BackendError):
        backend.wrap(b"", CONTEXT)
    with pytest.raises(errors.BackendError):
        backend.wrap(b"x" * 4097, CONTEXT)
    assert fake_kms.calls.get("Encrypt", 0) == 0


def test_unknown_option_is_a_config_error_naming_it() -> None:
    with pytest.raises(errors.BackendConfigError, match="bogus"):
        AwsKmsOptions.parse({"key_id": "alias/x", "bogus": 1})


def test_missing_key_id_is_a_config_error() -> None:
    with pytest.raises(errors.BackendConfigError, match="key_id"):
        AwsKmsOptions.parse({"region": "eu-west-1"})


def test_option_strings_from_flags_are_coerced_and_bad_values_refused() -> None:
    parsed = AwsKmsOptions.parse(
        {"key_id": "alias/x", "request_timeout": "2.5", "max_attempts": "4", "profile": None}
    )
    assert parsed.request_timeout == 2.5 and parsed.max_attempts == 4 and parsed.profile is None
    with pytest.raises(errors.BackendConfigError, match="max_attempts"):
        AwsKmsOptions.parse({"key_id": "alias/x", "max_attempts": "many"})
    with pytest.raises(errors.BackendConfigError, match="request_timeout"):
        AwsKmsOptions.parse({"key_id": "alias/x", "request_timeout": 0})
    with pytest.raises(errors.BackendConfigError, match="max_attempts"):
        AwsKmsOptions.parse({"key_id": "alias/x", "max_attempts": 0})


def test_options_repr_hides_secrets() -> None:
    parsed = AwsKmsOptions.parse(
        {"key_id": "alias/x", "secret_access_key": "s3cr3t-value", "session_token": "t0ken-value"}
    )
    assert "s3cr3t-value" not in repr(parsed) and "t0ken-value" not in repr(parsed)


def test_bad_endpoint_url_is_a_config_error() -> None:
    with pytest.raises(errors.BackendConfigError, match="endpoint_url"):
        AwsKmsBackend(
            AwsKmsOptions.parse(
                {
                    "key_id": "alias/x",
                    "region": "us-east-1",
                    "endpoint_url": "ftp://example.com",
                    "access_key_id": "a",
                    "secret_access_key": "b",
                }
            ),
            env=isolated_env(),
        )
