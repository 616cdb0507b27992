"""The one place where the plugin's errors become gRPC status codes.

=====================================  ===================  ================================
error                                  gRPC code            meaning for kube-apiserver
=====================================  ===================  ================================
EnvelopeError (bad input, unknown id)  INVALID_ARGUMENT     never retry this input
InvalidCiphertext (backend refused)    INVALID_ARGUMENT     wrapped local KEK is not authentic
KeyDisabled, KeyNotFound               FAILED_PRECONDITION  the root key is unusable: loud
BackendThrottled                       RESOURCE_EXHAUSTED   try later
BackendUnavailable (incl. timeouts)    UNAVAILABLE          try later
any other BackendError                 INTERNAL             a bug or a broken backend
=====================================  ===================  ================================

Messages never contain key material or plaintext: envelope errors have one fixed message and
backend messages are written not to contain any.
"""

from __future__ import annotations

from edge_common.errors import (
    FailedPrecondition,
    Internal,
    InvalidArgument,
    ResourceExhausted,
    ServiceError,
    Unavailable,
)
from kms_plugin.backends.errors import (
    BackendError,
    BackendThrottled,
    BackendUnavailable,
    InvalidCiphertext,
    KeyDisabled,
    KeyNotFound,
)
from kms_plugin.envelope import EnvelopeError


def to_service_error(exc: BaseException) -> ServiceError:
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, EnvelopeError):
        return InvalidArgument(EnvelopeError.MESSAGE)
    if isinstance(exc, InvalidCiphertext):
        return InvalidArgument(f"{EnvelopeError.MESSAGE}: the backend refused the wrapped key")
    if isinstance(exc, KeyDisabled):
        return FailedPrecondition(f"root key disabled: {exc}")
    if isinstance(exc, KeyNotFound):
        return FailedPrecondition(f"root key not found: {exc}")
    if isinstance(exc, BackendThrottled):
        return ResourceExhausted(f"backend throttled: {exc}")
    if isinstance(exc, BackendUnavailable):
        return Unavailable(f"backend unavailable: {exc}")
    if isinstance(exc, BackendError):
        return Internal(f"backend error: {exc}")
    return Internal(f"internal error: {type(exc).__name__}")


__all__ = ["to_service_error"]
