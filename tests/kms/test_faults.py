"""The fault policy of docs/kms-plugin.md ("Faults"), pinned.

Unreachable, throttling and slow backends are injected around the real local backend
(tests/kms/faulty.py) and inside our fake AWS KMS; a disabled root key is disabled for real
on every backend.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from edge_common.server import unix_channel
from edge_proto.kms.v2 import service_pb2, service_pb2_grpc
from kms_plugin.backends import local
from kms_plugin.backends.base import KeyBackend
from kms_plugin.backends.errors import BackendThrottled, BackendUnavailable
from tests.kms.apiserver import FakeApiserver
from tests.kms.conftest import BackendRig, RunningPlugin, StartPlugin, make_rig
from tests.kms.test_apiserver_contract import secret_key, wait_for


@dataclass
class FaultRig:
    rig: BackendRig
    backend: Callable[[], KeyBackend]  # the (breakable) backend for the plugin under test
    unreachable: Callable[[], None]
    throttled: Callable[[], None]
    slow_unwrap: Callable[[float], None]
    heal: Callable[[], None]


@pytest.fixture(params=["local", "awskms-fake"])
def fault_rig(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[FaultRig]:
    rig = make_rig(request.param, request, tmp_path)
    if request.param == "local":
        from tests.kms.faulty import FaultyBackend

        faulty = FaultyBackend(rig.make_backend())

        def slow(seconds: float) -> None:
            faulty.latency["unwrap"] = seconds

        yield FaultRig(
            rig,
            lambda: faulty,
            lambda: faulty.break_with(lambda: BackendUnavailable("connection refused")),
            lambda: faulty.break_with(lambda: BackendThrottled("rate exceeded")),
            slow,
            faulty.heal,
        )
    else:
        fake = rig.extra["fake"]
        from kms_plugin.backends.awskms import AwsKmsBackend, AwsKmsOptions
        from tests.kms.awskms_rig import isolated_env

        options = fake.backend_options(breaker_reset_seconds=0.05, max_attempts=2)
        yield FaultRig(
            rig,
            lambda: AwsKmsBackend(AwsKmsOptions.parse(options), env=isolated_env()),
            lambda: fake.inject_drop(),
            lambda: fake.inject_throttling(),
            lambda s: fake.inject_latency(s, ops="Decrypt") and None,
            fake.clear_faults,
        )


def metric(rp: RunningPlugin, name: str, **labels: str) -> float | None:
    return rp.plugin.metrics.registry.get_sample_value(name, labels)


def decrypt(endpoint: str, ct: bytes, key_id: str, ann: dict[str, bytes],
            timeout: float = 3.0) -> bytes:
    with unix_channel(endpoint) as ch:
        stub = service_pb2_grpc.KeyManagementServiceStub(ch)
        req = service_pb2.DecryptRequest(ciphertext=ct, key_id=key_id, annotations=ann, uid="f")
        return bytes(stub.Decrypt(req, timeout=timeout).plaintext)


def encrypt(endpoint: str, seed: bytes) -> service_pb2.EncryptResponse:
    with unix_channel(endpoint) as ch:
        stub = service_pb2_grpc.KeyManagementServiceStub(ch)
        return stub.Encrypt(service_pb2.EncryptRequest(plaintext=seed, uid="f"), timeout=3)


def code_of(fn: Callable[[], object]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value.code()


def seed_from_elsewhere(rig: BackendRig, start_plugin: StartPlugin):
    """A seed wrapped by another plugin instance: its local KEK is not cached by ours."""
    other = start_plugin(rig)
    with FakeApiserver(other.endpoint) as api:
        state = api.sync()
    other.stop()
    return state


def test_unreachable_backend_keeps_encrypt_and_cached_decrypt_working_and_health_degraded(
    fault_rig: FaultRig, start_plugin: StartPlugin, caplog: pytest.LogCaptureFixture
):
    foreign = seed_from_elsewhere(fault_rig.rig, start_plugin)
    rp = start_plugin(fault_rig.rig, backend=fault_rig.backend())
    with FakeApiserver(rp.endpoint) as api:
        state = api.sync()
        stored = api.write(secret_key(1), b"cached")
    fault_rig.unreachable()
    caplog.set_level(logging.WARNING, logger="kms_plugin.monitor")
    snap = rp.plugin.monitor.probe()
    assert snap.state == "degraded" and "unreachable" in snap.reason
    assert metric(rp, "kms_plugin_backend_reachable") == 0
    assert metric(rp, "kms_plugin_health_state", state="degraded") == 1
    assert any("degraded" in r.getMessage() for r in caplog.records)
    assert rp.plugin.ready_check()[0] is True
    with FakeApiserver(rp.endpoint) as api:
        assert api.status().healthz == "ok"  # we still serve: do not take the apiserver out
        assert api.sync().key_id == state.key_id  # Encrypt of a fresh seed works
        assert api.read(secret_key(1), stored) == b"cached"  # cold apiserver, cached KEK
    assert code_of(lambda: decrypt(rp.endpoint, foreign.ciphertext, foreign.key_id,
                                   foreign.annotations)) == grpc.StatusCode.UNAVAILABLE
    fault_rig.heal()
    wait_for(lambda: rp.plugin.monitor.probe().state == "ok", what="healthy again")
    assert decrypt(rp.endpoint, foreign.ciphertext, foreign.key_id,
                   foreign.annotations) == foreign.seed


def test_report_degraded_puts_the_reason_into_status(fault_rig: FaultRig,
                                                      start_plugin: StartPlugin):
    rp = start_plugin(fault_rig.rig, backend=fault_rig.backend(), report_degraded=True)
    fault_rig.unreachable()
    rp.plugin.monitor.probe()
    with FakeApiserver(rp.endpoint) as api:
        healthz = api.status().healthz
    assert healthz != "ok" and healthz.startswith("backend unreachable")
    assert len(healthz) <= 200


def test_throttling_is_resource_exhausted_for_uncached_keys_and_degrades_health(
    fault_rig: FaultRig, start_plugin: StartPlugin
):
    foreign = seed_from_elsewhere(fault_rig.rig, start_plugin)
    rp = start_plugin(fault_rig.rig, backend=fault_rig.backend())
    with FakeApiserver(rp.endpoint) as api:
        mine = api.sync()
    fault_rig.throttled()
    assert rp.plugin.monitor.probe().state == "degraded"
    assert "throttl" in rp.plugin.monitor.snapshot.reason
    assert code_of(lambda: decrypt(rp.endpoint, foreign.ciphertext, foreign.key_id,
                                   foreign.annotations)) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert decrypt(rp.endpoint, mine.ciphertext, mine.key_id, mine.annotations) == mine.seed


def test_slow_backend_is_unavailable_within_the_callers_deadline_and_status_stays_cheap(
    fault_rig: FaultRig, start_plugin: StartPlugin
):
    foreign = seed_from_elsewhere(fault_rig.rig, start_plugin)
    rp = start_plugin(fault_rig.rig, backend=fault_rig.backend())
    fault_rig.slow_unwrap(5.0)
    started = threading.Event()
    outcome: list[grpc.StatusCode] = []

    def slow_call() -> None:
        started.set()
        outcome.append(code_of(lambda: decrypt(rp.endpoint, foreign.ciphertext, foreign.key_id,
                                               foreign.annotations, timeout=2.0)))

    t = threading.Thread(target=slow_call)
    t.start()
    started.wait()
    with FakeApiserver(rp.endpoint) as api:
        assert api.status().healthz == "ok"  # answered from memory while the unwrap hangs
    t.join()
    assert outcome == [grpc.StatusCode.UNAVAILABLE]


def test_disabled_root_key_is_loud_refuses_encrypt_and_never_returns_wrong_plaintext(
    backend_rig: BackendRig, start_plugin: StartPlugin, caplog: pytest.LogCaptureFixture
):
    rp = start_plugin(backend_rig, metrics_port=0)
    with FakeApiserver(rp.endpoint) as api:
        mine = api.sync()
    backend_rig.disable()
    caplog.set_level(logging.ERROR, logger="kms_plugin.monitor")
    rp.plugin.monitor.probe()
    rp.plugin.monitor.probe()
    loud = [r for r in caplog.records if "ROOT KEY UNUSABLE" in r.getMessage()]
    assert len(loud) >= 2  # repeated on every probe, at ERROR
    assert all(r.levelno == logging.ERROR for r in loud)
    with FakeApiserver(rp.endpoint) as api:
        healthz = api.status().healthz
    assert healthz != "ok" and "disabled" in healthz
    assert metric(rp, "kms_plugin_root_key_unusable", reason="disabled") == 1
    assert metric(rp, "kms_plugin_health_state", state="unhealthy") == 1
    assert rp.plugin.ready_check()[0] is False
    assert code_of(lambda: encrypt(rp.endpoint, os.urandom(32))) == (
        grpc.StatusCode.FAILED_PRECONDITION
    )
    # reads the plugin can still serve from memory keep the cluster up; the rest fail loudly
    assert decrypt(rp.endpoint, mine.ciphertext, mine.key_id, mine.annotations) == mine.seed
    cold = start_plugin(backend_rig)
    if backend_rig.extra.get("backend_enforces_disable", True):
        assert code_of(lambda: decrypt(cold.endpoint, mine.ciphertext, mine.key_id,
                                       mine.annotations)) == grpc.StatusCode.FAILED_PRECONDITION
    else:  # the backend still unwraps: the plaintext must be the right one, or nothing
        try:
            assert decrypt(cold.endpoint, mine.ciphertext, mine.key_id,
                           mine.annotations) == mine.seed
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION
    backend_rig.enable()
    wait_for(lambda: rp.plugin.monitor.probe().state == "ok", what="key usable again")
    assert metric(rp, "kms_plugin_root_key_unusable", reason="disabled") == 0
    assert encrypt(rp.endpoint, os.urandom(32)).key_id == mine.key_id


def test_deleted_root_key_version_is_failed_precondition_not_found(
    local_backend_rig: BackendRig, start_plugin: StartPlugin
):
    rig = local_backend_rig
    writer = start_plugin(rig)
    with FakeApiserver(writer.endpoint) as api:
        old = api.sync()
    writer.stop()
    ring_path = rig.extra["keyring"]
    ring = local.rotate(ring_path)
    local.write_keyring(ring_path, local.Keyring(ring.name, ring.next_generation, ring.keys[:1]))
    rp = start_plugin(rig)
    with pytest.raises(grpc.RpcError) as info:
        decrypt(rp.endpoint, old.ciphertext, old.key_id, old.annotations)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "not found" in (info.value.details() or "")


def test_key_pending_deletion_in_aws_is_reported_as_unusable(
    request: pytest.FixtureRequest, tmp_path: Path, start_plugin: StartPlugin
):
    rig = make_rig("awskms-fake", request, tmp_path)
    rp = start_plugin(rig)
    rig.extra["fake"].schedule_deletion()
    snap = rp.plugin.monitor.probe()
    assert snap.state == "unhealthy" and snap.root_key_problem is not None
    assert code_of(lambda: encrypt(rp.endpoint, os.urandom(32))) == (
        grpc.StatusCode.FAILED_PRECONDITION
    )


def test_local_kek_rotation_that_fails_keeps_the_current_kek_and_retries(
    fault_rig: FaultRig, start_plugin: StartPlugin
):
    rp = start_plugin(fault_rig.rig, backend=fault_rig.backend(), kek_max_uses=3)
    keys = rp.plugin.keys
    first = keys.current
    assert first is not None
    fault_rig.unreachable()
    for _ in range(5):  # past the use limit: rotation is due but cannot happen
        encrypt(rp.endpoint, os.urandom(32))
    rp.plugin.monitor.run_once()
    assert keys.current is first
    fault_rig.heal()
    rp.plugin.monitor._next_rotation_try = 0.0  # retry now instead of after retry_interval
    rp.plugin.monitor.run_once()
    assert keys.current is not first
    assert keys.current is not None and keys.current.key_id == first.key_id


def test_backend_down_at_start_reports_no_key_then_recovers(
    fault_rig: FaultRig, start_plugin: StartPlugin
):
    backend = fault_rig.backend()
    fault_rig.unreachable()
    rp = start_plugin(fault_rig.rig, backend=backend, retry_interval=0.05)
    with FakeApiserver(rp.endpoint) as api:
        status = api.status()
        assert status.healthz.startswith("no root key yet")
        assert status.key_id == ""
        assert code_of(lambda: encrypt(rp.endpoint, os.urandom(32))) == (
            grpc.StatusCode.UNAVAILABLE
        )
        fault_rig.heal()
        wait_for(lambda: api.status().healthz == "ok", what="recovery")
        assert api.sync().key_id
