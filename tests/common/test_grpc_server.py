"""edge_common.server: unix sockets, stale-socket rules, error mapping, graceful shutdown."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry

from edge_common.errors import NotFound
from edge_common.metrics import HealthChecks, MetricsServer
from edge_common.server import (
    EndpointError,
    GrpcServer,
    RpcMetrics,
    parse_endpoint,
    unix_channel,
)

SERVICE = "test.Echo"


def _echo_service(behaviour: dict[str, object]) -> object:
    def echo(request: bytes, context: grpc.ServicerContext) -> bytes:
        if request == b"missing":
            raise NotFound("volume vg/x not found")
        if request == b"crash":
            raise RuntimeError("secret-material-123")
        if request == b"slow":
            behaviour["started"].set()  # type: ignore[attr-defined]
            time.sleep(1.0)
        return b"echo:" + request

    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {"Echo": grpc.unary_unary_rpc_method_handler(
            echo, request_deserializer=lambda b: b, response_serializer=lambda b: b)},
    )
    return lambda server: server.add_generic_rpc_handlers((handler,))


def _call(endpoint: str, payload: bytes, timeout: float = 5.0) -> bytes:
    with unix_channel(endpoint) as channel:
        stub = channel.unary_unary(f"/{SERVICE}/Echo", request_serializer=lambda b: b,
                                   response_deserializer=lambda b: b)
        return stub(payload, timeout=timeout)  # type: ignore[no-any-return]


@pytest.fixture
def sock(tmp_path: Path) -> Path:
    return tmp_path / "s" / "plugin.sock"


def test_parse_endpoint_spellings() -> None:
    assert parse_endpoint("unix:///csi/csi.sock").path == Path("/csi/csi.sock")
    assert parse_endpoint("unix:/csi/csi.sock").grpc_address == "unix:/csi/csi.sock"
    assert parse_endpoint("/csi/csi.sock").path == Path("/csi/csi.sock")
    abstract = parse_endpoint("unix:///@kms-plugin")
    assert abstract.path is None and abstract.grpc_address == "unix-abstract:kms-plugin"
    for bad in ("tcp://1.2.3.4:5", "unix://relative/path", "unix:///@", "/" + "x" * 200):
        with pytest.raises(EndpointError):
            parse_endpoint(bad)


def test_socket_is_created_owner_only_and_serves(sock: Path) -> None:
    server = GrpcServer(f"unix://{sock}", [_echo_service({})])  # type: ignore[list-item]
    server.start()
    try:
        mode = stat.S_IMODE(sock.stat().st_mode)
        assert mode == 0o600
        assert _call(f"unix://{sock}", b"hi") == b"echo:hi"
    finally:
        server.stop(1)
    assert not sock.exists()


def test_socket_group_and_mode_are_configurable(sock: Path) -> None:
    server = GrpcServer(f"unix://{sock}", [_echo_service({})],  # type: ignore[list-item]
                        socket_mode=0o660, socket_group=os.getgid())
    server.start()
    try:
        st = sock.stat()
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == os.getgid()
    finally:
        server.stop(1)


def test_stale_socket_is_replaced_but_live_one_and_regular_file_are_not(sock: Path) -> None:
    sock.parent.mkdir(parents=True)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sock))
    stale.close()  # file left behind, nobody listening
    first = GrpcServer(f"unix://{sock}", [_echo_service({})])  # type: ignore[list-item]
    first.start()
    try:
        second = GrpcServer(f"unix://{sock}", [_echo_service({})])  # type: ignore[list-item]
        with pytest.raises(EndpointError, match="already listening"):
            second.start()
        assert _call(f"unix://{sock}", b"still") == b"echo:still"
    finally:
        first.stop(1)
    sock.write_text("not a socket")
    with pytest.raises(EndpointError, match="not a socket"):
        GrpcServer(f"unix://{sock}", [_echo_service({})]).start()  # type: ignore[list-item]
    assert sock.read_text() == "not a socket"


def test_abstract_socket_serves() -> None:
    endpoint = f"unix:///@edge-test-{uuid.uuid4().hex[:8]}"
    server = GrpcServer(endpoint, [_echo_service({})])  # type: ignore[list-item]
    server.start()
    try:
        assert _call(endpoint, b"a") == b"echo:a"
    finally:
        server.stop(1)


def test_domain_errors_map_to_codes_and_crashes_hide_details(sock: Path) -> None:
    registry = CollectorRegistry()
    server = GrpcServer(f"unix://{sock}", [_echo_service({})],  # type: ignore[list-item]
                        metrics=RpcMetrics("t", registry))
    server.start()
    try:
        with pytest.raises(grpc.RpcError) as missing:
            _call(f"unix://{sock}", b"missing")
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        assert "vg/x not found" in (missing.value.details() or "")
        with pytest.raises(grpc.RpcError) as crash:
            _call(f"unix://{sock}", b"crash")
        assert crash.value.code() == grpc.StatusCode.INTERNAL
        assert "secret-material" not in (crash.value.details() or "")
        _call(f"unix://{sock}", b"ok")
    finally:
        server.stop(1)
    value = registry.get_sample_value
    assert value("t_grpc_requests_total", {"method": "Echo", "code": "NOT_FOUND"}) == 1
    assert value("t_grpc_requests_total", {"method": "Echo", "code": "INTERNAL"}) == 1
    assert value("t_grpc_requests_total", {"method": "Echo", "code": "OK"}) == 1
    assert value("t_grpc_request_duration_seconds_count", {"method": "Echo"}) == 3


def test_stop_lets_in_flight_call_finish(sock: Path) -> None:
    behaviour: dict[str, object] = {"started": threading.Event()}
    server = GrpcServer(f"unix://{sock}", [_echo_service(behaviour)])  # type: ignore[list-item]
    server.start()
    result: dict[str, bytes] = {}
    caller = threading.Thread(target=lambda: result.update(r=_call(f"unix://{sock}", b"slow")))
    caller.start()
    assert behaviour["started"].wait(5)  # type: ignore[attr-defined]
    server.stop(grace=5)
    caller.join(5)
    assert result.get("r") == b"echo:slow"


def test_sigterm_finishes_in_flight_call_then_exits(tmp_path: Path) -> None:
    sock = tmp_path / "sig.sock"
    script = textwrap.dedent(f"""
        import time, grpc
        from edge_common.server import GrpcServer
        def echo(req, ctx):
            time.sleep(1.0)
            return b"done"
        h = grpc.method_handlers_generic_handler("{SERVICE}", {{"Echo":
            grpc.unary_unary_rpc_method_handler(echo, lambda b: b, lambda b: b)}})
        s = GrpcServer("unix://{sock}", [lambda srv: srv.add_generic_rpc_handlers((h,))])
        s.start()
        print("ready", flush=True)
        s.run_until_signal(grace=5)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        result: dict[str, bytes] = {}
        caller = threading.Thread(target=lambda: result.update(r=_call(f"unix://{sock}", b"x")))
        caller.start()
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        caller.join(10)
        assert result.get("r") == b"done"
        assert proc.wait(10) == 0
        assert not sock.exists()
    finally:
        proc.kill()
        proc.wait()


def test_metrics_endpoint_serves_metrics_and_health() -> None:
    import urllib.error
    import urllib.request

    registry = CollectorRegistry()
    RpcMetrics("m", registry).requests.labels("X", "OK").inc()
    state = {"ready": False}
    checks = HealthChecks(live={"process": lambda: (True, "")},
                          ready={"backend": lambda: (state["ready"], "backend unreachable")})
    server = MetricsServer("127.0.0.1", 0, registry=registry, checks=checks).start()
    base = f"http://127.0.0.1:{server.port}"
    try:
        body = urllib.request.urlopen(f"{base}/metrics", timeout=5).read().decode()
        assert 'm_grpc_requests_total{code="OK",method="X"} 1.0' in body
        assert urllib.request.urlopen(f"{base}/healthz", timeout=5).status == 200
        with pytest.raises(urllib.error.HTTPError) as not_ready:
            urllib.request.urlopen(f"{base}/readyz", timeout=5)
        assert not_ready.value.code == 503
        assert "backend unreachable" in not_ready.value.read().decode()
        state["ready"] = True
        assert urllib.request.urlopen(f"{base}/readyz", timeout=5).status == 200
    finally:
        server.stop()
