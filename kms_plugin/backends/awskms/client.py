"""A small AWS KMS JSON-protocol client: SigV4-signed POSTs over keep-alive HTTP(S).

Every call runs inside a deadline (absolute ``time.monotonic()`` value).  Within it the
client retries throttling, 5xx answers, timeouts and connection errors with exponential
backoff and full jitter; it never retries other 4xx answers (auth, validation, key state).
A :class:`~kms_plugin.backends.awskms.breaker.CircuitBreaker` counts consecutive
transport/5xx failures and, once open, makes calls fail at once with
:class:`BackendUnavailable` instead of waiting for timeouts.

Errors are the backend errors of :mod:`kms_plugin.backends.errors`; their messages carry the
operation and the AWS error type, never request or response bodies (which hold plaintext).

Emulators of AWS KMS answer an operation they do not implement in their own ways:
nsmithuk/local-kms with HTTP 501 and a plain-text body, LocalStack with HTTP 501
``InternalFailure`` "... not yet implemented ...", AWS itself with HTTP 400
``UnknownOperationException``, moto's server with a bare HTTP 500 HTML page.  All of these
become :class:`UnsupportedOperation` (never retried, never counted by the circuit breaker: the
service did answer); the bare 500 only for calls made with ``optional=True``, where the
caller can do without the operation.  Error answers are parsed tolerantly: ``__type`` with or
without a namespace (``com.amazonaws.kms#X``) or a ``:http://...`` suffix, ``code``/``Code``
or a nested ``Error`` object, ``message``/``Message``, the ``x-amzn-ErrorType`` header, or a
plain-text body naming the exception.
"""

from __future__ import annotations

import http.client
import json
import logging
import random
import re
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from edge_common.version import project_version
from kms_plugin.backends.awskms import sigv4
from kms_plugin.backends.awskms.breaker import CircuitBreaker
from kms_plugin.backends.awskms.credentials import CredentialsProvider
from kms_plugin.backends.errors import (
    BackendConfigError,
    BackendError,
    BackendThrottled,
    BackendUnavailable,
    InvalidCiphertext,
    KeyDisabled,
    KeyNotFound,
)

log = logging.getLogger(__name__)

SERVICE = "kms"  # the SigV4 scope service name; moto routes requests by it
TARGET_PREFIX = "TrentService."
CONTENT_TYPE = "application/x-amz-json-1.1"
MAX_RESPONSE_BYTES = 1 << 20
_POOL_SIZE = 8

# AWS error types -> backend error class.  Anything not listed is a plain BackendError.
_ERROR_CLASSES: dict[str, type[BackendError]] = {
    "DisabledException": KeyDisabled,
    "KMSInvalidStateException": KeyDisabled,
    "NotFoundException": KeyNotFound,
    "ThrottlingException": BackendThrottled,
    "LimitExceededException": BackendThrottled,
    "InvalidCiphertextException": InvalidCiphertext,
    "IncorrectKeyException": InvalidCiphertext,
    "KMSInternalException": BackendUnavailable,
    "DependencyTimeoutException": BackendUnavailable,
    "KeyUnavailableException": BackendUnavailable,
    "CustomKeyStoreInvalidStateException": BackendUnavailable,
    "InternalFailure": BackendUnavailable,
    "ServiceUnavailable": BackendUnavailable,
    "ServiceUnavailableException": BackendUnavailable,
}
_THROTTLE_TYPES = frozenset({"ThrottlingException", "LimitExceededException"})
# The operation itself is unknown to the endpoint (not: the key cannot do it).
_UNKNOWN_OPERATION_TYPES = frozenset(
    {
        "UnknownOperationException",
        "UnknownOperation",
        "InvalidAction",
        "NotImplemented",
        "NotImplementedException",
        "NotImplementedError",
    }
)
# Generic error types whose message decides whether the operation is simply not implemented.
_GENERIC_TYPES = frozenset(
    {
        "",
        "InternalFailure",
        "InternalFailureException",
        "InternalError",
        "InternalServerError",
        "ServiceException",
    }
)
_NOT_IMPLEMENTED = re.compile(
    r"not\s+(yet\s+)?implemented|has\s+not\s+been\s+implemented|not\s+yet\s+been\s+emulated"
    r"|not\s+available\s+in\s+your\s+current\s+license",
    re.IGNORECASE,
)
_BARE_TYPE = re.compile(r"^[A-Za-z][A-Za-z0-9_.#:]{2,127}$")
_TAG = re.compile(r"<[^>]*>")


class UnsupportedOperation(BackendError):
    """The endpoint does not implement this operation (an emulator with a partial API)."""


@dataclass(frozen=True)
class ClientSettings:
    endpoint: str
    region: str
    connect_timeout: float = 1.0
    request_timeout: float = 2.0
    max_attempts: int = 3
    retry_base_seconds: float = 0.05
    retry_max_seconds: float = 1.0
    ca_bundle: str | None = None

    @property
    def default_budget(self) -> float:
        """The time a call may take when the caller gives no deadline."""
        return (self.connect_timeout + self.request_timeout) * self.max_attempts + (
            self.retry_max_seconds * (self.max_attempts - 1)
        )


@dataclass
class _Failure:
    """One failed attempt: the error to raise if it is the last, and how to treat it."""

    error: BackendError
    retryable: bool
    breaker_failure: bool  # counts towards opening the circuit breaker
    reached: bool = True  # the service answered (proves it is up)


def _tag(error: BackendError, error_type: str) -> None:
    setattr(error, "aws_error_type", error_type or None)  # noqa: B010 - ad-hoc attribute


def aws_error_type(exc: BaseException) -> str | None:
    """The AWS error type (``NotFoundException`` ...) an error came from, if any."""
    value = getattr(exc, "aws_error_type", None)
    return value if isinstance(value, str) else None


def error_type_of(raw: str) -> str:
    """Normalise ``__type`` values: ``com.amazonaws.kms#X`` and ``X:http://...`` -> ``X``."""
    name = raw.rsplit("#", 1)[-1]
    return name.split(":", 1)[0].strip()


def _clean_message(message: object) -> str:
    text = str(message) if message is not None else ""
    text = "".join(ch if ch.isprintable() else " " for ch in text)
    return " ".join(text.split())[:300]


def is_unsupported_answer(
    status: int, error_type: str, message: str, *, optional: bool = False, aws_error: bool = True
) -> bool:
    """Does this error answer say "operation not implemented" (rather than a failure)?

    ``aws_error`` is false when the body was no AWS error document at all (HTML, empty);
    such a bare HTTP 500 counts only for ``optional`` calls (moto's server answers an
    unimplemented operation that way, and so could a broken proxy).
    """
    if status == 501 or error_type in _UNKNOWN_OPERATION_TYPES:
        return True
    if status >= 400 and error_type in _GENERIC_TYPES and _NOT_IMPLEMENTED.search(message):
        return True
    return optional and status == 500 and not aws_error and not error_type


def classify_error(
    operation: str,
    status: int,
    error_type: str,
    message: str,
    *,
    optional: bool = False,
    aws_error: bool = True,
) -> _Failure:
    """Map one AWS error answer to the backend error and the retry/breaker verdict."""
    if is_unsupported_answer(
        status, error_type, message, optional=optional, aws_error=aws_error
    ):
        label = error_type or f"HTTP {status}"
        detail = f": {message}" if message else ""
        unsupported = UnsupportedOperation(
            f"AWS KMS {operation} is not supported by this endpoint ({label}{detail})"
        )
        _tag(unsupported, error_type)
        return _Failure(unsupported, retryable=False, breaker_failure=False)
    cls = _ERROR_CLASSES.get(error_type)
    if cls is None:
        cls = BackendUnavailable if status >= 500 else BackendError
    detail = f": {message}" if message else ""
    label = error_type or f"HTTP {status}"
    throttled = error_type in _THROTTLE_TYPES or status == 429
    if throttled:
        cls = BackendThrottled
    error = cls(f"AWS KMS {operation} failed: {label}{detail}")
    _tag(error, error_type)
    if throttled:
        return _Failure(error, retryable=True, breaker_failure=False)
    if status >= 500 or cls is BackendUnavailable:
        return _Failure(error, retryable=True, breaker_failure=True)
    return _Failure(error, retryable=False, breaker_failure=False)


class _Endpoint:
    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise BackendConfigError(f"endpoint_url must be http(s)://host[:port]: {url!r}")
        if parts.query or parts.fragment:
            raise BackendConfigError(f"endpoint_url must not carry a query: {url!r}")
        self.url = url
        self.scheme = parts.scheme
        self.host = parts.hostname
        try:
            explicit_port = parts.port
        except ValueError:
            raise BackendConfigError(f"endpoint_url has a bad port: {url!r}") from None
        default_port = 443 if self.scheme == "https" else 80
        self.port = explicit_port or default_port
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = host if self.port == default_port else f"{host}:{self.port}"
        self.path = parts.path or "/"


class KmsClient:
    """Thread-safe client for the AWS KMS JSON API (``TrentService``)."""

    def __init__(
        self,
        settings: ClientSettings,
        credentials: CredentialsProvider,
        breaker: CircuitBreaker | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        rng: Callable[[], float] = random.random,
    ) -> None:
        if settings.max_attempts < 1:
            raise BackendConfigError("max_attempts must be at least 1")
        if settings.connect_timeout <= 0 or settings.request_timeout <= 0:
            raise BackendConfigError("connect_timeout and request_timeout must be positive")
        self.settings = settings
        self.endpoint = _Endpoint(settings.endpoint)
        self.credentials = credentials
        self.breaker = breaker or CircuitBreaker()
        self._clock = clock
        self._wall_clock = wall_clock
        self._rng = rng
        self._pool: list[http.client.HTTPConnection] = []
        self._pool_lock = threading.Lock()
        self._closed = threading.Event()
        self._ssl_context: ssl.SSLContext | None = None
        if self.endpoint.scheme == "https":
            self._ssl_context = ssl.create_default_context(cafile=settings.ca_bundle)
        self.attempts = 0  # total HTTP attempts made (for diagnostics and tests)

    # -- public -----------------------------------------------------------------------------

    def call(
        self,
        operation: str,
        payload: Mapping[str, Any],
        *,
        deadline: float | None = None,
        optional: bool = False,
    ) -> dict[str, Any]:
        """Call ``TrentService.<operation>`` and return the decoded JSON answer.

        ``optional``: the caller can do without this operation, so an answer that can only
        mean "not implemented here" in an emulator (a bare HTTP 500 page) raises
        :class:`UnsupportedOperation` at once instead of being retried as an outage.
        """
        if self._closed.is_set():
            raise BackendUnavailable("AWS KMS client is closed")
        if deadline is None:
            deadline = self._clock() + self.settings.default_budget
        body = json.dumps(payload, separators=(",", ":")).encode("utf-8")
        last: _Failure | None = None
        for attempt in range(self.settings.max_attempts):
            remaining = deadline - self._clock()
            if remaining <= 0:
                break
            if not self.breaker.allow():
                cause = f"; last error: {last.error}" if last else ""
                raise BackendUnavailable(
                    f"AWS KMS {operation} not attempted: circuit breaker open after "
                    f"{self.breaker.failure_threshold} consecutive failures, next probe in "
                    f"{self.breaker.retry_in():.1f}s{cause}"
                )
            outcome = self._attempt(operation, body, remaining, optional)
            if not isinstance(outcome, _Failure):
                self.breaker.record_success()
                return outcome
            if outcome.breaker_failure:
                self.breaker.record_failure()
            elif outcome.retryable or not outcome.reached:
                self.breaker.release()  # throttled, or never sent: no verdict
            else:
                self.breaker.record_success()  # it answered: reachable
            last = outcome
            if not outcome.retryable or attempt + 1 >= self.settings.max_attempts:
                raise outcome.error
            delay = self._backoff(attempt)
            if self._clock() + delay >= deadline:
                break  # no time left for another attempt: fail now, not at the deadline
            if self._closed.wait(delay):
                raise BackendUnavailable("AWS KMS client is closed")
        if last is not None:
            raise last.error
        raise BackendUnavailable(f"AWS KMS {operation} not attempted: deadline exceeded")

    def close(self) -> None:
        self._closed.set()
        with self._pool_lock:
            pool, self._pool = self._pool, []
        for conn in pool:
            conn.close()

    # -- internals --------------------------------------------------------------------------

    def _backoff(self, attempt: int) -> float:
        """Full jitter: uniform in [0, min(cap, base * 2**attempt)]."""
        ceiling = min(
            self.settings.retry_max_seconds, self.settings.retry_base_seconds * (2**attempt)
        )
        return ceiling * self._rng()

    def _new_connection(self, connect_timeout: float) -> http.client.HTTPConnection:
        ep = self.endpoint
        if self._ssl_context is not None:
            return http.client.HTTPSConnection(
                ep.host, ep.port, timeout=connect_timeout, context=self._ssl_context
            )
        return http.client.HTTPConnection(ep.host, ep.port, timeout=connect_timeout)

    def _take_connection(self) -> http.client.HTTPConnection | None:
        with self._pool_lock:
            while self._pool:
                conn = self._pool.pop()
                sock = conn.sock
                if sock is not None and not _peer_closed(sock):
                    return conn
                conn.close()
        return None

    def _give_back(self, conn: http.client.HTTPConnection) -> None:
        if self._closed.is_set():
            conn.close()
            return
        with self._pool_lock:
            if len(self._pool) < _POOL_SIZE:
                self._pool.append(conn)
                return
        conn.close()

    def _signed_headers(self, operation: str, body: bytes) -> dict[str, str]:
        creds = self.credentials.get()
        signed = sigv4.sign(
            method="POST",
            path=self.endpoint.path,
            headers={
                "Host": self.endpoint.host_header,
                "Content-Type": CONTENT_TYPE,
                "X-Amz-Target": TARGET_PREFIX + operation,
            },
            body=body,
            credentials=creds,
            region=self.settings.region,
            service=SERVICE,
            now=self._wall_clock(),
        )
        headers = dict(signed.headers)
        headers["Content-Length"] = str(len(body))
        headers["User-Agent"] = f"edge-kms-plugin/{project_version()}"
        return headers

    def _attempt(
        self, operation: str, body: bytes, remaining: float, optional: bool = False
    ) -> dict[str, Any] | _Failure:
        with self._pool_lock:
            self.attempts += 1
        try:
            headers = self._signed_headers(operation, body)
        except BackendError as exc:  # credentials file vanished or broke
            return _Failure(exc, retryable=False, breaker_failure=False, reached=False)
        conn = self._take_connection()
        read_timeout = min(self.settings.request_timeout, remaining)
        try:
            if conn is None:
                conn = self._new_connection(min(self.settings.connect_timeout, remaining))
                conn.connect()
            assert conn.sock is not None
            conn.sock.settimeout(read_timeout)
            conn.request("POST", self.endpoint.path, body=body, headers=headers)
            response = conn.getresponse()
            data = response.read(MAX_RESPONSE_BYTES + 1)
            status = response.status
            error_header = response.getheader("x-amzn-ErrorType", "") or ""
            reusable = not response.will_close and len(data) <= MAX_RESPONSE_BYTES
        except TimeoutError:
            _discard(conn)
            return _Failure(
                BackendUnavailable(f"AWS KMS {operation} timed out after {read_timeout:.2f}s"),
                retryable=True,
                breaker_failure=True,
            )
        except ssl.SSLCertVerificationError as exc:
            _discard(conn)
            return _Failure(  # not transient: retrying cannot help
                BackendUnavailable(
                    f"AWS KMS {operation} failed: TLS certificate of {self.endpoint.url} not "
                    f"trusted ({exc.verify_message}); see the ca_bundle option"
                ),
                retryable=False,
                breaker_failure=True,
            )
        except (OSError, http.client.HTTPException) as exc:
            _discard(conn)
            reason = type(exc).__name__
            if isinstance(exc, OSError) and exc.strerror:
                reason = f"{reason}: {exc.strerror}"
            return _Failure(
                BackendUnavailable(
                    f"AWS KMS {operation} failed: cannot reach {self.endpoint.url} ({reason})"
                ),
                retryable=True,
                breaker_failure=True,
            )
        if reusable:
            self._give_back(conn)
        else:
            conn.close()
        if len(data) > MAX_RESPONSE_BYTES:
            return _Failure(
                BackendError(f"AWS KMS {operation} answer larger than {MAX_RESPONSE_BYTES} bytes"),
                retryable=False,
                breaker_failure=False,
            )
        if status == 200:
            try:
                decoded = json.loads(data) if data.strip() else {}
            except ValueError:
                decoded = []
            if decoded is None:  # some servers (moto) answer `null` for empty results
                decoded = {}
            if not isinstance(decoded, dict):
                return _Failure(
                    BackendError(f"AWS KMS {operation} answer is not a JSON object"),
                    retryable=False,
                    breaker_failure=False,
                )
            return decoded
        error_type, message, aws_error = parse_error(data, error_header)
        return classify_error(
            operation, status, error_type, message, optional=optional, aws_error=aws_error
        )


def parse_error(data: bytes, header_type: str = "") -> tuple[str, str, bool]:
    """``(error type, message, is an AWS error document)`` of an error answer's body.

    Accepts the JSON shapes emulators use (``__type``/``code``/``Code``/``Error.Code``,
    ``message``/``Message``/``Error.Message``) and plain-text bodies: a bare exception name
    (local-kms with IAM on) is the type, any other text the message (tags stripped).
    """
    error_type = error_type_of(header_type) if header_type else ""
    message = ""
    aws_error = bool(error_type)
    try:
        decoded = json.loads(data) if data.strip() else None
    except ValueError:
        decoded = None
    if isinstance(decoded, dict):
        nested = decoded.get("Error")
        sources: list[Mapping[str, Any]] = [decoded]
        if isinstance(nested, dict):
            sources.append(nested)
        for source in sources:
            raw_type = source.get("__type") or source.get("code") or source.get("Code")
            if isinstance(raw_type, str) and raw_type.strip():
                error_type = error_type_of(raw_type)
                aws_error = True
                break
        for source in sources:
            raw_message = source.get("message") or source.get("Message")
            if raw_message:
                message = _clean_message(raw_message)
                break
    elif decoded is None and data.strip():
        text = data.decode("utf-8", "replace").strip()
        if _BARE_TYPE.match(text):
            error_type = error_type or error_type_of(text)
            aws_error = True
        else:
            message = _clean_message(_TAG.sub(" ", text))
    return error_type, message, aws_error


def _peer_closed(sock: socket.socket) -> bool:
    """An idle keep-alive socket that is readable has been closed (or broken) by the peer."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


def _discard(conn: http.client.HTTPConnection | None) -> None:
    if conn is not None:
        try:
            conn.close()
        except OSError:
            pass


__all__ = [
    "CONTENT_TYPE",
    "SERVICE",
    "ClientSettings",
    "KmsClient",
    "UnsupportedOperation",
    "aws_error_type",
    "classify_error",
    "error_type_of",
    "is_unsupported_answer",
    "parse_error",
]
