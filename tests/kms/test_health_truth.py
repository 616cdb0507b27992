"""Health tells the truth and revocation stops writes (issue 14 points 5 and 6).

kube-apiserver's KMS v2 write path (read from its published source, staging/src/k8s.io/
apiserver/pkg/server/options/encryptionconfig): every Status poll whose key_id equals the
key_id of its cached seed moves that seed's expiry 3 minutes ahead, whatever healthz says; a
different key_id makes it call Encrypt, and when that fails it keeps the old seed without
extending it, so writes fail once it expires.  ``WritePath`` below models exactly that.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from edge_common.server import unix_channel
from edge_proto.kms.v2 import service_pb2, service_pb2_grpc
from kms_plugin.backends.errors import BackendUnavailable
from kms_plugin.keys import UNUSABLE_SUFFIX
from tests.kms.conftest import BackendRig, StartPlugin
from tests.kms.faulty import FaultyBackend

SEED_TTL = 180.0  # kmsv2PluginWriteDEKSourceMaxTTL


@dataclass
class WritePath:
    """kube-apiserver's cached-seed state machine, on a clock of our own."""

    endpoint: str
    key_id: str = ""
    expires: float = 0.0

    def _stub(self, channel: grpc.Channel) -> service_pb2_grpc.KeyManagementServiceStub:
        return service_pb2_grpc.KeyManagementServiceStub(channel)

    def poll(self, now: float) -> None:
        with unix_channel(self.endpoint) as channel:
            stub = self._stub(channel)
            status = stub.Status(service_pb2.StatusRequest(), timeout=5)
            if status.key_id == self.key_id:
                self.expires = now + SEED_TTL
                return
            try:
                resp = stub.Encrypt(service_pb2.EncryptRequest(plaintext=os.urandom(32),
                                                               uid="poll"), timeout=5)
            except grpc.RpcError:
                return  # coast on the old seed until it expires
            if resp.key_id == status.key_id:
                self.key_id, self.expires = resp.key_id, now + SEED_TTL

    def can_write(self, now: float) -> bool:
        return bool(self.key_id) and now <= self.expires


def status(endpoint: str) -> service_pb2.StatusResponse:
    with unix_channel(endpoint) as channel:
        return service_pb2_grpc.KeyManagementServiceStub(channel).Status(
            service_pb2.StatusRequest(), timeout=5
        )


def test_a_disabled_root_key_stops_the_apiservers_writes_within_the_seed_ttl(
    backend_rig: BackendRig, start_plugin: StartPlugin
):
    rp = start_plugin(backend_rig)
    api = WritePath(rp.endpoint)
    api.poll(0.0)
    original = api.key_id
    assert api.can_write(0.0)
    backend_rig.disable()
    rp.plugin.monitor.probe()
    revoked = status(rp.endpoint)
    assert revoked.healthz != "ok"
    assert revoked.key_id == original + UNUSABLE_SUFFIX  # changed: the seed is not extended
    for now in (60.0, 120.0, 180.0, 240.0):  # the apiserver polls every minute
        api.poll(now)
    assert not api.can_write(240.0)  # writes stopped (3 minutes after the last good poll)
    backend_rig.enable()
    rp.plugin.monitor.probe()
    assert status(rp.endpoint).key_id == original
    api.poll(300.0)
    assert api.can_write(300.0) and api.key_id == original


@pytest.fixture
def faulty_local(local_backend_rig: BackendRig) -> FaultyBackend:
    return FaultyBackend(local_backend_rig.make_backend())


def test_one_transient_error_after_a_disable_does_not_lift_the_block(
    local_backend_rig: BackendRig, start_plugin: StartPlugin, faulty_local: FaultyBackend
):
    rp = start_plugin(local_backend_rig, backend=faulty_local)
    local_backend_rig.disable()
    rp.plugin.monitor.probe()
    assert rp.plugin.keys.encrypt_blocked is not None
    local_backend_rig.enable()  # the key comes back, but the probe does not get through
    faulty_local.break_with(lambda: BackendUnavailable("connection reset"))
    snap = rp.plugin.monitor.probe()
    assert snap.state == "unhealthy" and snap.root_key_problem == "disabled"
    assert "connection reset" in snap.reason
    assert rp.plugin.keys.encrypt_blocked is not None
    assert status(rp.endpoint).healthz != "ok"
    with unix_channel(rp.endpoint) as channel, pytest.raises(grpc.RpcError) as info:
        service_pb2_grpc.KeyManagementServiceStub(channel).Encrypt(
            service_pb2.EncryptRequest(plaintext=b"s" * 32, uid="u"), timeout=5
        )
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    faulty_local.heal()
    assert rp.plugin.monitor.probe().state == "ok"  # a real round trip: now it lifts
    assert rp.plugin.keys.encrypt_blocked is None
    assert status(rp.endpoint).healthz == "ok"


def test_an_unexpected_exception_in_a_probe_makes_health_not_ok(
    local_backend_rig: BackendRig, start_plugin: StartPlugin, faulty_local: FaultyBackend
):
    rp = start_plugin(local_backend_rig, backend=faulty_local)
    assert status(rp.endpoint).healthz == "ok"
    faulty_local.break_with(
        lambda: UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad")  # type: ignore[arg-type,return-value]
    )
    rp.plugin.monitor.probe()
    healthz = status(rp.endpoint).healthz
    assert healthz != "ok" and "UnicodeDecodeError" in healthz


def test_an_unexpected_exception_in_a_refresh_keeps_health_not_ok_though_probes_pass(
    local_backend_rig: BackendRig, start_plugin: StartPlugin, faulty_local: FaultyBackend
):
    rp = start_plugin(local_backend_rig, backend=faulty_local)
    faulty_local.break_with(lambda: ValueError("bug"), ops={"current_key"})  # type: ignore[arg-type,return-value]
    rp.plugin.monitor.refresh()
    assert "ValueError" in status(rp.endpoint).healthz
    faulty_local.break_with(lambda: ValueError("bug"), ops={"never"})  # type: ignore[arg-type,return-value]
    # the probe passes, but the last refresh did not: still not ok
    assert rp.plugin.monitor.probe().state == "unhealthy"
    rp.plugin.monitor.refresh()
    assert rp.plugin.monitor.probe().state == "ok"


def test_a_keyring_that_is_not_utf8_makes_the_running_plugin_unhealthy(
    local_backend_rig: BackendRig, start_plugin: StartPlugin
):
    rp = start_plugin(local_backend_rig)
    ring: Path = local_backend_rig.extra["keyring"]
    ring.write_bytes(b"\xff\xfe{}")
    rp.plugin.monitor.probe()
    healthz = status(rp.endpoint).healthz
    assert healthz != "ok" and "not UTF-8" in healthz


def test_a_credentials_file_that_is_not_utf8_is_a_clear_backend_error(tmp_path: Path):
    from kms_plugin.backends.awskms.credentials import read_credentials_file
    from kms_plugin.backends.errors import BackendConfigError

    creds = tmp_path / "credentials"
    creds.write_bytes(b"[default]\naws_access_key_id = \xff\xfe\n")
    with pytest.raises(BackendConfigError, match="not UTF-8"):
        read_credentials_file(creds, "default")


def test_a_credentials_file_turned_non_utf8_makes_the_awskms_plugin_unhealthy(
    request: pytest.FixtureRequest, tmp_path: Path, start_plugin: StartPlugin
):
    from tests.kms.conftest import make_rig

    rig = make_rig("awskms-fake", request, tmp_path)
    fake = rig.extra["fake"]
    creds = tmp_path / "credentials"
    creds.write_text(f"[default]\naws_access_key_id = {fake.access_key_id}\n"
                     f"aws_secret_access_key = {fake.secret_access_key}\n")
    backend = fake.backend(access_key_id=None, secret_access_key=None,
                           credentials_file=str(creds))
    rp = start_plugin(rig, backend=backend)
    assert status(rp.endpoint).healthz == "ok"
    creds.write_bytes(b"[default]\naws_access_key_id = \xff\xfe\n")
    rp.plugin.monitor.probe()
    healthz = status(rp.endpoint).healthz
    assert healthz != "ok" and "not UTF-8" in healthz
