"""The fake AWS KMS HTTP server (stdlib ``http.server``, one thread per connection).

Speaks the AWS JSON 1.1 protocol: ``POST /`` with ``X-Amz-Target: TrentService.<Op>`` and
``Content-Type: application/x-amz-json-1.1``; errors are ``{"__type", "message"}`` with a 4xx
or 5xx status.  Every request must carry a well-formed SigV4 ``Authorization`` header scoped
to service ``kms`` and the server's region; when the server knows credentials
(``credentials={access_key_id: secret}``) it also verifies the signature.

``profile=`` (:mod:`fake_kms.profiles`) makes it answer like another emulator
instead of AWS: ``local-kms``, ``localstack``, ``localstack-legacy``, ``moto-legacy``.

Control, in process (methods of :class:`FakeKms`) or over HTTP (no auth; bind to loopback):

    GET    /_fake/calls                 {"calls": {op: n}}
    POST   /_fake/calls/reset
    GET    /_fake/faults                {"faults": [...]}
    POST   /_fake/faults                {"kind": "latency|error|drop", "ops": [...],
                                         "count": n, "seconds": s, "error_type": "...",
                                         "status": n, "message": "..."}  -> {"id": n}
    DELETE /_fake/faults
    POST   /_fake/keys                  {"description": "..."} -> {"arn": "..."}
    POST   /_fake/keys/<ref>/<action>   action: rotate, disable, enable, schedule-deletion,
                                        cancel-deletion, delete (purge now)
"""

from __future__ import annotations

import collections
import json
import logging
import socket
import ssl
import threading
import time
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

from fake_kms.faults import Fault, FaultKind, FaultPlan
from fake_kms.profiles import (
    EmulationProfile,
    ScopeRegion,
    UnsupportedStyle,
    get_profile,
)
from fake_kms.store import OPERATIONS, KeyStore, KmsApiError
from kms_plugin.backends.awskms import sigv4

log = logging.getLogger(__name__)

TARGET_PREFIX = "TrentService."
CONTENT_TYPE = "application/x-amz-json-1.1"
MAX_BODY = 1 << 20
MAX_SKEW_SECONDS = 15 * 60
ADMIN_PREFIX = "/_fake/"

# A credential the tests (and `python -m fake_kms --verify-signatures`) use.
TEST_ACCESS_KEY_ID = "AKIAFAKEKMS000000001"
TEST_SECRET_ACCESS_KEY = "fake-kms-secret-key-for-tests-only"


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], fake: FakeKms) -> None:
        self.fake = fake
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Failed TLS handshakes and vanished clients are normal for a test server: no
        # tracebacks on stderr.
        log.debug("fake-kms: connection from %s ended with an error", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeKMS/1"
    timeout = 60  # idle keep-alive connections end after this
    server: _HttpServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("fake-kms %s", format % args)

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in two writes: without NODELAY, Nagle + delayed ACK
        # would add ~40 ms to every answer.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.fake._track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.fake._track(self.connection, False)

    # -- plumbing ---------------------------------------------------------------------------

    def _read_body(self) -> bytes | None:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit() or int(length) > MAX_BODY:
            self._send_json(411 if length is None else 413, {"message": "bad Content-Length"})
            return None
        return self.rfile.read(int(length))

    def _send_json(
        self,
        status: int,
        payload: Mapping[str, Any] | None,
        extra: Mapping[str, str] | None = None,
        *,
        raw: bytes | None = None,
        content_type: str = CONTENT_TYPE,
    ) -> None:
        if raw is not None:
            data = raw
        else:
            data = json.dumps(payload, separators=(",", ":")).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("x-amzn-RequestId", self.server.fake._request_id())
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, err: KmsApiError) -> None:
        profile = self.server.fake.profile
        error_type = profile.error_type_prefix + err.error_type
        body: dict[str, Any] = {"__type": error_type}
        if err.message or not profile.omit_empty_message:
            key = "Message" if err.error_type in profile.capital_message_types else "message"
            body[key] = err.message
        extra = {"x-amzn-ErrorType": error_type} if profile.error_type_header else {}
        self._send_json(err.status, body, extra)

    def _send_unsupported(self, target: str, operation: str) -> None:
        """Answer an operation the emulated server does not implement, in its way."""
        style = self.server.fake.profile.unsupported_style
        if style is UnsupportedStyle.PLAIN_501:  # plain text under a JSON content type
            text = f"X-Amz-Target {target} is not implemented by this server"
            self._send_json(501, None, raw=text.encode("utf-8"))
        elif style is UnsupportedStyle.INTERNAL_FAILURE_501:
            message = f"KMS action {operation} is not yet implemented by this emulator"
            self._send_json(501, {"__type": "InternalFailure", "message": message})
        elif style is UnsupportedStyle.HTML_500:
            page = b"<!doctype html><title>500 Internal Server Error</title><h1>Error</h1>"
            self._send_json(500, None, raw=page, content_type="text/html; charset=utf-8")
        else:
            self._send_error(KmsApiError("UnknownOperationException", f"unknown target {target!r}"))

    def _drop(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # -- verbs ------------------------------------------------------------------------------

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        self._admin("GET", b"")

    def do_DELETE(self) -> None:  # noqa: N802
        self._admin("DELETE", b"")

    def do_POST(self) -> None:  # noqa: N802
        body = self._read_body()
        if body is None:
            return
        if self.path.startswith(ADMIN_PREFIX):
            self._admin("POST", body)
            return
        fake = self.server.fake
        target = self.headers.get("X-Amz-Target", "")
        operation = target[len(TARGET_PREFIX) :] if target.startswith(TARGET_PREFIX) else ""
        fake._count(operation or "<unknown>")
        verdict = fake.faults.decide(operation)
        if verdict.delay > 0 and fake._stopping.wait(verdict.delay):
            self._drop()
            return
        if verdict.drop:
            self._drop()
            return
        profile = fake.profile
        try:
            scope_region = self._check_auth(body)
            if verdict.error is not None:
                fault: Fault = verdict.error
                raise KmsApiError(fault.error_type, fault.message, fault.status)
            handler = OPERATIONS.get(operation)
            if handler is None or operation in profile.unsupported_ops:
                self._send_unsupported(target, operation)
                return
            content_type = self.headers.get("Content-Type", "").split(";")[0].strip()
            if content_type != CONTENT_TYPE:
                raise KmsApiError("SerializationException", f"Content-Type must be {CONTENT_TYPE}")
            try:
                params = json.loads(body) if body else {}
            except ValueError:
                raise KmsApiError("SerializationException", "body is not JSON") from None
            if not isinstance(params, dict):
                raise KmsApiError("SerializationException", "body is not a JSON object")
            if (
                scope_region is not None
                and scope_region != fake.store.region
                and any(params.get(k) for k in ("KeyId", "TargetKeyId"))
            ):
                # LocalStack/moto keep one store per region: the key is not in that one.
                raise KmsApiError("NotFoundException", f"Invalid arn {fake.store.region}")
            answer = handler(fake.store, params)
        except KmsApiError as err:
            self._send_error(err)
            return
        except Exception:  # a bug in the fake: answer like AWS's internal error
            log.exception("fake-kms: %s failed", operation)
            self._send_error(KmsApiError("KMSInternalException", "internal error", 500))
            return
        if not answer and profile.empty_body_for_empty_result:
            self._send_json(200, None, raw=b"")
            return
        self._send_json(200, answer)

    def _check_auth(self, body: bytes) -> str | None:
        """Check the SigV4 header as the emulated server does; its scope region if kept."""
        fake = self.server.fake
        profile = fake.profile
        if not profile.authenticate and fake.credentials is None:
            return None  # local-kms: requests are not authenticated at all
        header = self.headers.get("Authorization")
        if not header:
            raise KmsApiError("MissingAuthenticationTokenException", "Missing Authentication Token")
        parsed = sigv4.parse_authorization(header)
        if parsed is None:
            raise KmsApiError("IncompleteSignatureException", "malformed Authorization header")
        fake._record_auth(parsed)
        if parsed.service != "kms":
            raise KmsApiError(
                "InvalidSignatureException", "Credential should be scoped to correct service: 'kms'"
            )
        scope_region: str | None = None
        if profile.scope_region is ScopeRegion.NOT_FOUND:
            scope_region = parsed.region
        elif profile.scope_region is ScopeRegion.REJECT and parsed.region != fake.store.region:
            raise KmsApiError(
                "InvalidSignatureException",
                f"Credential should be scoped to a valid region: {fake.store.region!r}",
            )
        if "host" not in parsed.signed_headers or "x-amz-date" not in parsed.signed_headers:
            raise KmsApiError("IncompleteSignatureException", "host and x-amz-date must be signed")
        stamp = self.headers.get("X-Amz-Date", "")
        try:
            when = datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
        except ValueError:
            raise KmsApiError("IncompleteSignatureException", "bad X-Amz-Date") from None
        if abs((datetime.now(UTC) - when).total_seconds()) > MAX_SKEW_SECONDS:
            raise KmsApiError("InvalidSignatureException", "Signature expired")
        if fake.credentials is None:
            return scope_region
        secret = fake.credentials.get(parsed.access_key_id)
        if secret is None:
            raise KmsApiError(
                "UnrecognizedClientException",
                "The security token included in the request is invalid.",
            )
        split = urlsplit(self.path)
        query = [
            (unquote(k), unquote(v))
            for k, _, v in (p.partition("=") for p in split.query.split("&") if p)
        ]
        ok = sigv4.verify(
            method=self.command,
            path=unquote(split.path),
            query=query,
            headers=list(self.headers.items()),
            body=body,
            secret_access_key=secret,
            parsed=parsed,
        )
        if not ok:
            raise KmsApiError(
                "InvalidSignatureException",
                "The request signature we calculated does not match the signature you provided.",
            )
        return scope_region

    # -- admin ------------------------------------------------------------------------------

    def _admin(self, method: str, body: bytes) -> None:
        fake = self.server.fake
        path = urlsplit(self.path).path
        if not path.startswith(ADMIN_PREFIX):
            self._send_json(404, {"message": "not found"})
            return
        parts = [unquote(p) for p in path[len(ADMIN_PREFIX) :].split("/") if p]
        try:
            spec = json.loads(body) if body else {}
            if not isinstance(spec, dict):
                raise ValueError("body must be a JSON object")
            status, payload = fake._admin(method, parts, spec)
        except KmsApiError as err:
            self._send_error(err)
            return
        except (ValueError, TypeError) as exc:
            status, payload = 400, {"message": str(exc)}
        self._send_json(status, payload)


class FakeKms:
    """A running fake AWS KMS.  Use as a context manager or call :meth:`start`/:meth:`stop`."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        region: str | None = None,
        account_id: str | None = None,
        credentials: Mapping[str, str] | None = None,
        report_key_material_id: bool | None = None,
        tls: ssl.SSLContext | None = None,
        profile: EmulationProfile | str = "aws",
    ) -> None:
        self.profile = get_profile(profile)
        self.store = KeyStore(
            region or self.profile.region,
            account_id or self.profile.account_id,
            report_key_material_id=(
                self.profile.report_key_material_id
                if report_key_material_id is None
                else report_key_material_id
            ),
            profile=self.profile,
        )
        self.tls = tls
        self.faults = FaultPlan()
        self.credentials = dict(credentials) if credentials is not None else None
        self._host = host
        self._port = port
        self._httpd: _HttpServer | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._calls: collections.Counter[str] = collections.Counter()
        self._connections: set[socket.socket] = set()
        self._request_ids = 0
        self.scopes_seen: collections.Counter[str] = collections.Counter()

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> FakeKms:
        if self._httpd is not None:
            return self
        self._httpd = _HttpServer((self._host, self._port), self)
        if self.tls is not None:
            # The handshake runs on first read, in the connection's own thread.
            self._httpd.socket = self.tls.wrap_socket(
                self._httpd.socket, server_side=True, do_handshake_on_connect=False
            )
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="fake-kms",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        self._stopping.set()
        httpd.shutdown()
        httpd.server_close()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:  # end idle keep-alive and delayed requests
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FakeKms:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def address(self) -> tuple[str, int]:
        if self._httpd is None:
            raise RuntimeError("fake KMS is not running")
        host, port = self._httpd.server_address[:2]
        return str(host), int(port)

    @property
    def endpoint(self) -> str:
        host, port = self.address
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://{host}:{port}"

    @property
    def region(self) -> str:
        return self.store.region

    # -- keys -------------------------------------------------------------------------------

    def create_key(self, description: str = "") -> str:
        """Create a symmetric key; return its ARN."""
        arn: str = self.store.create_key({"Description": description})["KeyMetadata"]["Arn"]
        return arn

    def rotate_key(self, key: str) -> str:
        """Rotate (new key material); return the new key material id.

        On demand where the profile has RotateKeyOnDemand; otherwise the way the emulated
        server rotates by itself (local-kms: yearly, or several seeded backing keys).
        """
        if "RotateKeyOnDemand" in self.profile.unsupported_ops:
            return self.store.rotate(self.store.get(key), "AUTOMATIC")
        self.store.rotate_key_on_demand({"KeyId": key})
        return self.store.get(key).current_material_id

    def disable_key(self, key: str) -> None:
        self.store.disable_key({"KeyId": key})

    def enable_key(self, key: str) -> None:
        self.store.enable_key({"KeyId": key})

    def schedule_deletion(self, key: str, days: int = 7) -> None:
        self.store.schedule_key_deletion({"KeyId": key, "PendingWindowInDays": days})

    def cancel_deletion(self, key: str) -> None:
        self.store.cancel_key_deletion({"KeyId": key})

    def delete_key(self, key: str) -> None:
        """Finish deleting the key now: every later call naming it gets NotFoundException."""
        self.store.purge_key(key)

    def create_alias(self, alias: str, key: str) -> None:
        self.store.create_alias({"AliasName": alias, "TargetKeyId": key})

    def key_state(self, key: str) -> str:
        return self.store.get(key).state

    # -- faults -----------------------------------------------------------------------------

    def inject(
        self,
        kind: FaultKind | str,
        *,
        ops: Iterable[str] | str | None = None,
        count: int | None = None,
        seconds: float = 0.0,
        error_type: str = "",
        status: int | None = None,
        message: str = "",
    ) -> Fault:
        return self.faults.add(
            kind,
            ops=ops,
            count=count,
            seconds=seconds,
            error_type=error_type,
            status=status,
            message=message,
        )

    def inject_latency(
        self, seconds: float, *, ops: Iterable[str] | str | None = None, count: int | None = None
    ) -> Fault:
        return self.inject(FaultKind.LATENCY, ops=ops, count=count, seconds=seconds)

    def inject_error(
        self,
        error_type: str,
        *,
        status: int = 400,
        ops: Iterable[str] | str | None = None,
        count: int | None = None,
        message: str = "",
    ) -> Fault:
        return self.inject(
            FaultKind.ERROR,
            ops=ops,
            count=count,
            error_type=error_type,
            status=status,
            message=message,
        )

    def inject_throttling(
        self, *, ops: Iterable[str] | str | None = None, count: int | None = None
    ) -> Fault:
        return self.inject_error(
            "ThrottlingException", ops=ops, count=count, message="Rate exceeded"
        )

    def inject_server_error(
        self,
        status: int = 500,
        *,
        ops: Iterable[str] | str | None = None,
        count: int | None = None,
        error_type: str = "KMSInternalException",
    ) -> Fault:
        return self.inject_error(error_type, status=status, ops=ops, count=count)

    def inject_drop(
        self, *, ops: Iterable[str] | str | None = None, count: int | None = None
    ) -> Fault:
        return self.inject(FaultKind.DROP, ops=ops, count=count)

    def clear_faults(self) -> None:
        self.faults.clear()

    # -- counters ---------------------------------------------------------------------------

    @property
    def calls(self) -> dict[str, int]:
        """Requests received per operation (faulted ones included), as a snapshot."""
        with self._lock:
            return dict(self._calls)

    def call_count(self, operation: str) -> int:
        with self._lock:
            return self._calls[operation]

    @property
    def total_calls(self) -> int:
        with self._lock:
            return sum(self._calls.values())

    def reset_calls(self) -> None:
        with self._lock:
            self._calls.clear()

    # -- internals used by the handler ------------------------------------------------------

    def _count(self, operation: str) -> None:
        with self._lock:
            self._calls[operation] += 1

    def _record_auth(self, parsed: sigv4.ParsedAuthorization) -> None:
        with self._lock:
            self.scopes_seen[f"{parsed.region}/{parsed.service}"] += 1

    def _request_id(self) -> str:
        with self._lock:
            self._request_ids += 1
            return f"fake-{self._request_ids:08d}-{int(time.time())}"

    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._lock:
            if add:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)

    def _admin(
        self, method: str, parts: list[str], spec: Mapping[str, Any]
    ) -> tuple[int, dict[str, Any]]:
        if parts == ["calls"] and method == "GET":
            return 200, {"calls": self.calls}
        if parts == ["calls", "reset"] and method == "POST":
            self.reset_calls()
            return 200, {}
        if parts == ["faults"]:
            if method == "GET":
                return 200, {"faults": self.faults.list()}
            if method == "POST":
                return 200, {"id": self.faults.add_from_json(spec).id}
            if method == "DELETE":
                self.clear_faults()
                return 200, {}
        if parts == ["keys"] and method == "POST":
            return 200, {"arn": self.create_key(str(spec.get("description", "")))}
        if len(parts) >= 3 and parts[0] == "keys" and method == "POST":
            ref, action = "/".join(parts[1:-1]), parts[-1]  # an ARN contains a slash
            actions = {
                "rotate": lambda: {"key_material_id": self.rotate_key(ref)},
                "disable": lambda: self.disable_key(ref),
                "enable": lambda: self.enable_key(ref),
                "schedule-deletion": lambda: self.schedule_deletion(ref, int(spec.get("days", 7))),
                "cancel-deletion": lambda: self.cancel_deletion(ref),
                "delete": lambda: self.delete_key(ref),
            }
            if action in actions:
                result = actions[action]()
                return 200, result if isinstance(result, dict) else {}
        return 404, {"message": f"no admin route {method} /_fake/{'/'.join(parts)}"}


def serve(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    region: str | None = None,
    credentials: Mapping[str, str] | None = None,
    report_key_material_id: bool | None = None,
    tls: ssl.SSLContext | None = None,
    profile: EmulationProfile | str = "aws",
) -> FakeKms:
    """Start a fake KMS in background threads and return it (call ``.stop()`` when done)."""
    return FakeKms(
        host,
        port,
        region=region,
        credentials=credentials,
        report_key_material_id=report_key_material_id,
        tls=tls,
        profile=profile,
    ).start()


__all__ = ["TEST_ACCESS_KEY_ID", "TEST_SECRET_ACCESS_KEY", "FakeKms", "serve"]
