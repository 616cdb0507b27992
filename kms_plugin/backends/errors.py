"""Errors raised by key backends.

Each class maps to exactly one gRPC status code in the plugin core
(:mod:`kms_plugin.errors`).  Messages never contain key material or plaintext.
"""

from __future__ import annotations


class BackendError(Exception):
    """Base class of every error a key backend raises."""


class BackendUnavailable(BackendError):
    """The backend cannot be reached now (network, 5xx, timeout, circuit breaker open)."""


class CredentialsRefused(BackendUnavailable):
    """The backend refused our credentials (PKCS#11 PIN, cloud signature): not retried on
    every call, because real HSMs lock the PIN after a few failures."""


class BackendThrottled(BackendError):
    """The backend refused the call because of rate limiting."""


class KeyDisabled(BackendError):
    """The root key exists but is disabled or pending deletion."""


class KeyNotFound(BackendError):
    """The root key (or the requested version of it) does not exist (deleted or unknown)."""


class InvalidCiphertext(BackendError):
    """The wrapped blob failed its integrity check or was bound to another context."""


class BackendConfigError(BackendError):
    """The backend options are wrong; raised at startup, the process exits with the message."""


__all__ = [
    "BackendConfigError",
    "BackendError",
    "BackendThrottled",
    "BackendUnavailable",
    "CredentialsRefused",
    "InvalidCiphertext",
    "KeyDisabled",
    "KeyNotFound",
]
