"""The circuit breaker's state machine, on a manual clock; and the AWS error mapping table."""

from __future__ import annotations

import pytest

from kms_plugin.backends import errors
from kms_plugin.backends.awskms.breaker import BreakerState, CircuitBreaker
from kms_plugin.backends.awskms.client import aws_error_type, classify_error, error_type_of


class ManualClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_threshold_consecutive_failures_only() -> None:
    clock = ManualClock()
    breaker = CircuitBreaker(3, 10.0, clock=clock)
    breaker.record_failure()
    breaker.record_failure()
    breaker.record_success()  # resets the run
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.state is BreakerState.CLOSED and breaker.allow()
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    assert not breaker.allow()
    assert breaker.retry_in() == pytest.approx(10.0)
    assert breaker.times_opened == 1


def test_breaker_half_open_lets_exactly_one_probe_through() -> None:
    clock = ManualClock()
    breaker = CircuitBreaker(1, 5.0, clock=clock)
    breaker.record_failure()
    clock.now += 5.0
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.allow()
    assert not breaker.allow()  # a second caller while the probe is out


def test_breaker_probe_success_closes_it() -> None:
    clock = ManualClock()
    breaker = CircuitBreaker(1, 5.0, clock=clock)
    breaker.record_failure()
    clock.now += 6.0
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED
    assert breaker.allow() and breaker.allow()


def test_breaker_probe_failure_reopens_it_for_another_period() -> None:
    clock = ManualClock()
    breaker = CircuitBreaker(2, 5.0, clock=clock)
    breaker.record_failure()
    breaker.record_failure()
    clock.now += 5.0
    assert breaker.allow()
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    assert breaker.retry_in() == pytest.approx(5.0)
    clock.now += 4.9
    assert not breaker.allow()


def test_breaker_release_frees_the_probe_slot_without_a_verdict() -> None:
    clock = ManualClock()
    breaker = CircuitBreaker(1, 1.0, clock=clock)
    breaker.record_failure()
    clock.now += 1.0
    assert breaker.allow()
    breaker.release()
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.allow()


def test_breaker_rejects_nonsense_settings() -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(0, 1.0)
    with pytest.raises(ValueError):
        CircuitBreaker(1, -1.0)


@pytest.mark.parametrize(
    ("aws_type", "status", "expected", "retryable"),
    [
        ("DisabledException", 400, errors.KeyDisabled, False),
        ("KMSInvalidStateException", 400, errors.KeyDisabled, False),
        ("NotFoundException", 400, errors.KeyNotFound, False),
        ("ThrottlingException", 400, errors.BackendThrottled, True),
        ("LimitExceededException", 400, errors.BackendThrottled, True),
        ("InvalidCiphertextException", 400, errors.InvalidCiphertext, False),
        ("IncorrectKeyException", 400, errors.InvalidCiphertext, False),
        ("KMSInternalException", 500, errors.BackendUnavailable, True),
        ("DependencyTimeoutException", 503, errors.BackendUnavailable, True),
        ("", 502, errors.BackendUnavailable, True),
        ("", 429, errors.BackendThrottled, True),
    ],
)
def test_aws_error_types_map_to_backend_errors(
    aws_type: str, status: int, expected: type[errors.BackendError], retryable: bool
) -> None:
    failure = classify_error("Encrypt", status, aws_type, "details")
    assert type(failure.error) is expected
    assert failure.retryable is retryable
    assert "Encrypt" in str(failure.error)
    if aws_type:
        assert aws_type in str(failure.error)
        assert aws_error_type(failure.error) == aws_type


@pytest.mark.parametrize(
    "aws_type",
    [
        "AccessDeniedException",
        "UnrecognizedClientException",
        "ValidationException",
        "InvalidSignatureException",
        "InvalidKeyUsageException",
    ],
)
def test_other_4xx_errors_are_plain_backend_errors_naming_the_aws_type(aws_type: str) -> None:
    failure = classify_error("Decrypt", 400, aws_type, "no")
    assert type(failure.error) is errors.BackendError
    assert aws_type in str(failure.error)
    assert not failure.retryable and not failure.breaker_failure


def test_error_type_prefixes_and_suffixes_are_stripped() -> None:
    assert error_type_of("com.amazonaws.kms#NotFoundException") == "NotFoundException"
    assert error_type_of("AccessDeniedException:http://internal.amazon.com/x") == (
        "AccessDeniedException"
    )
