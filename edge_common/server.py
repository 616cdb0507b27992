"""The one gRPC server bootstrap for the CSI driver and the KMS plugin: unix sockets only.

- `unix:///path/to/sock` (file socket: created 0600, optional group; a stale file is replaced only
  when nothing listens on it) and `unix:///@name` (Linux abstract socket: no file, no permissions).
- Domain errors (ServiceError) become their status code in one interceptor, which also counts
  and times every call.
- SIGTERM/SIGINT stop the server gracefully: in-flight calls finish, new ones are refused.
"""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import signal
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import grpc
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram

from edge_common.errors import ServiceError
from edge_common.log import log_context
from edge_common.workers import IdleExitThreadPool

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
                    30, 60)


class EndpointError(Exception):
    """The endpoint cannot be served: bad syntax, in use, or not a socket."""


@dataclass(frozen=True)
class Endpoint:
    grpc_address: str  # what grpc binds: unix:/abs/path or unix-abstract:name
    path: Path | None  # the socket file, None for abstract sockets
    abstract_name: str | None = None

    def __str__(self) -> str:
        return f"unix:///@{self.abstract_name}" if self.abstract_name else f"unix://{self.path}"


def parse_endpoint(endpoint: str) -> Endpoint:
    """Accept unix:///abs/path, unix:/abs/path, /abs/path and unix:///@abstract-name."""
    rest = endpoint.strip()
    if rest.startswith("unix://"):
        rest = rest[len("unix://"):]
    elif rest.startswith("unix:"):
        rest = rest[len("unix:"):]
    elif "://" in rest:
        raise EndpointError(f"endpoint {endpoint!r}: only unix sockets are supported (unix:///path)")
    if rest.startswith("/@"):
        name = rest[2:]
        if not name:
            raise EndpointError(f"endpoint {endpoint!r}: empty abstract socket name")
        return Endpoint(f"unix-abstract:{name}", None, name)
    if not rest.startswith("/"):
        raise EndpointError(f"endpoint {endpoint!r}: the socket path must be absolute")
    if len(rest.encode()) > 107:
        raise EndpointError(f"endpoint {endpoint!r}: socket path longer than 107 bytes")
    return Endpoint(f"unix:{rest}", Path(rest))


def _is_listening(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except OSError:
            # Timeout or permission problem: someone may be there; do not take the socket away.
            return True
        return True


def prepare_socket_path(path: Path) -> None:
    """Remove a stale socket file; refuse if something listens or the path is not a socket."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise EndpointError(f"{path} exists and is not a socket; refusing to replace it")
    if _is_listening(path):
        raise EndpointError(f"{path}: another process is already listening on this socket")
    log.info("removing stale socket", extra={"socket": str(path)})
    path.unlink()


class RpcMetrics:
    """Per-service RPC counters and latency histograms (metric names carry the service prefix)."""

    def __init__(self, prefix: str, registry: CollectorRegistry = REGISTRY) -> None:
        self.requests = Counter(
            f"{prefix}_grpc_requests_total", "gRPC requests by method and status code",
            ["method", "code"], registry=registry,
        )
        self.latency = Histogram(
            f"{prefix}_grpc_request_duration_seconds", "gRPC request latency by method",
            ["method"], buckets=_LATENCY_BUCKETS, registry=registry,
        )


class ServiceInterceptor(grpc.ServerInterceptor):
    """Maps ServiceError to its status, hides unexpected errors behind INTERNAL, counts, times."""

    def __init__(self, metrics: RpcMetrics | None = None) -> None:
        self._metrics = metrics

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        method = str(handler_call_details.method).rsplit("/", 1)[-1]
        inner = handler.unary_unary
        metrics = self._metrics

        def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
            started = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                with log_context(rpc=method):
                    return inner(request, context)
            except ServiceError as exc:
                code = exc.code
                log.info("rpc failed", extra={"rpc": method, "code": code.name,
                                              "error": exc.message})
                context.abort(exc.code, exc.message)
            except Exception as exc:
                aborted = context.code() if hasattr(context, "code") else None
                if aborted not in (None, grpc.StatusCode.OK):
                    code = aborted  # the handler called context.abort itself
                    raise
                code = grpc.StatusCode.INTERNAL
                log.exception("rpc crashed", extra={"rpc": method})
                context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}")
            finally:
                if metrics is not None:
                    metrics.requests.labels(method, code.name).inc()
                    metrics.latency.labels(method).observe(time.perf_counter() - started)

        return grpc.unary_unary_rpc_method_handler(
            wrapped,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


RegisterFn = Callable[[grpc.Server], None]


class GrpcServer:
    """A gRPC server on one unix socket, with graceful shutdown."""

    def __init__(
        self,
        endpoint: str,
        register: Iterable[RegisterFn],
        *,
        socket_mode: int = 0o600,
        socket_group: str | int | None = None,
        max_workers: int = 8,
        metrics: RpcMetrics | None = None,
        interceptors: Sequence[grpc.ServerInterceptor] = (),
        options: Sequence[tuple[str, Any]] = (),
        map_errors: bool = True,
        idle_thread_seconds: float | None = None,
        keep_threads: int = 2,
        on_threads_shrink: Callable[[], None] | None = None,
    ) -> None:
        """``map_errors`` False: the services end failed calls themselves (context.abort) and
        count them; the per-call error interceptor (and its cost) is left out.

        ``idle_thread_seconds``: server threads idle that long exit (down to ``keep_threads``;
        ``on_threads_shrink`` runs after each exit), so a burst of concurrent calls does not
        leave its threads behind (edge_common.workers).  None: a ThreadPoolExecutor, whose
        threads stay."""
        self.endpoint = parse_endpoint(endpoint)
        self._register = list(register)
        self._socket_mode = socket_mode
        self._socket_group = socket_group
        self._max_workers = max_workers
        self._interceptors = [*([ServiceInterceptor(metrics)] if map_errors else []),
                              *interceptors]
        self._options = list(options)
        self._idle_thread_seconds = idle_thread_seconds
        self._keep_threads = keep_threads
        self._on_threads_shrink = on_threads_shrink
        self._server: grpc.Server | None = None
        self._stopped = threading.Event()

    def start(self) -> None:
        ep = self.endpoint
        if ep.path is not None:
            prepare_socket_path(ep.path)
        pool: futures.Executor
        if self._idle_thread_seconds is None:
            pool = futures.ThreadPoolExecutor(max_workers=self._max_workers,
                                              thread_name_prefix="grpc")
        else:
            pool = IdleExitThreadPool(
                self._max_workers, idle_seconds=self._idle_thread_seconds,
                keep=self._keep_threads, thread_name_prefix="grpc",
                on_shrink=self._on_threads_shrink,
            )
        server = grpc.server(
            pool,  # grpc only calls submit()
            interceptors=self._interceptors,
            options=self._options,
        )
        for register in self._register:
            register(server)
        # The socket is created at bind time: a tight umask means it is never briefly open to all.
        old_umask = os.umask(0o177)
        try:
            bound = server.add_insecure_port(ep.grpc_address)
        finally:
            os.umask(old_umask)
        if not bound:
            raise EndpointError(f"cannot listen on {ep}")
        if ep.path is not None:
            gid = _group_id(self._socket_group) if self._socket_group is not None else -1
            if gid != -1:
                os.chown(ep.path, -1, gid)
            os.chmod(ep.path, self._socket_mode)
        server.start()
        self._server = server
        log.info("serving", extra={"endpoint": str(ep)})

    def stop(self, grace: float = 10.0) -> None:
        """Refuse new calls, let in-flight ones finish (up to grace seconds), remove the socket."""
        if self._server is None or self._stopped.is_set():
            return
        self._stopped.set()
        self._server.stop(grace).wait(grace + 1)
        if self.endpoint.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.endpoint.path.unlink()
        log.info("stopped", extra={"endpoint": str(self.endpoint)})

    def wait(self) -> None:
        if self._server is not None:
            self._server.wait_for_termination()

    def run_until_signal(self, grace: float = 10.0,
                         on_stop: Callable[[], None] | None = None) -> None:
        """Serve until SIGTERM or SIGINT, then stop gracefully (main thread only)."""
        done = threading.Event()

        def _handle(signum: int, _frame: FrameType | None) -> None:
            log.info("signal received, shutting down", extra={"signal": signum})
            done.set()

        previous = {s: signal.signal(s, _handle) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            if self._server is None:
                self.start()
            done.wait()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            self.stop(grace)
            if on_stop is not None:
                on_stop()


def _group_id(group: str | int) -> int:
    if isinstance(group, int):
        return group
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise EndpointError(f"socket group {group!r} does not exist") from None


def unix_channel(endpoint: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
    """A client channel to a unix endpoint in any of the accepted spellings (tests, tools)."""
    return grpc.insecure_channel(parse_endpoint(endpoint).grpc_address, options=list(options))
