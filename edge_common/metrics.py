"""The local HTTP endpoint every service exposes: /metrics, /healthz (process) and /readyz."""

from __future__ import annotations

import logging
import socketserver
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

log = logging.getLogger(__name__)

# A check answers (ok, detail); detail is shown to the operator, so it says what is wrong.
Check = Callable[[], tuple[bool, str]]


@dataclass
class HealthChecks:
    live: dict[str, Check] = field(default_factory=dict)
    ready: dict[str, Check] = field(default_factory=dict)


def parse_host_port(address: str) -> tuple[str, int]:
    """A metrics_address "host:port" or "[v6]:port" -> (host, port); no host: all addresses."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"metrics_address {address!r}: expected host:port")
    return host.strip("[]") or "0.0.0.0", int(port)


def run_checks(checks: Mapping[str, Check]) -> tuple[bool, str]:
    ok = True
    lines = []
    for name, check in checks.items():
        try:
            passed, detail = check()
        except Exception as exc:  # a crashing check is a failing check, never a crashing endpoint
            passed, detail = False, f"check raised {type(exc).__name__}"
        ok = ok and passed
        shown = detail or ("ok" if passed else "failed")
        lines.append(f"[{'+' if passed else '-'}] {name}: {shown}")
    lines.append("ok" if ok else "failed")
    return ok, "\n".join(lines) + "\n"


class _HttpServer(ThreadingHTTPServer):
    def server_bind(self) -> None:
        # HTTPServer.server_bind also looks up the host's FQDN (reverse DNS at start-up, and the
        # idna codec with unicodedata in memory for good) for SERVER_NAME, which only CGI reads
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)


class MetricsServer:
    """Serves /metrics, /healthz and /readyz on a local address in a daemon thread."""

    def __init__(self, address: str, port: int, *, registry: CollectorRegistry = REGISTRY,
                 checks: HealthChecks | None = None) -> None:
        self.registry = registry
        self.checks = checks or HealthChecks()
        handler = _make_handler(self)
        self._httpd = _HttpServer((address, port), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="metrics-http",
                                        daemon=True)

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def start(self) -> MetricsServer:
        self._thread.start()
        log.info("metrics endpoint listening",
                 extra={"address": f"{self._httpd.server_address[0]!s}:{self.port}"})
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def _make_handler(server: MetricsServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, generate_latest(server.registry), CONTENT_TYPE_LATEST)
            elif path in ("/healthz", "/livez"):
                ok, text = run_checks(server.checks.live)
                self._send(200 if ok else 503, text.encode(), "text/plain; charset=utf-8")
            elif path == "/readyz":
                ok, text = run_checks({**server.checks.live, **server.checks.ready})
                self._send(200 if ok else 503, text.encode(), "text/plain; charset=utf-8")
            else:
                self._send(404, b"not found\n", "text/plain; charset=utf-8")

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            return  # probes every few seconds would drown the service's own logs

    return Handler
