"""The background monitor: probe-triggered refresh, Status from the snapshot."""

from __future__ import annotations

from kms_plugin.backends import local
from tests.kms.apiserver import FakeApiserver
from tests.kms.conftest import BackendRig, StartPlugin


def test_a_probe_that_sees_a_new_root_version_triggers_the_refresh_at_once(
    local_backend_rig: BackendRig, start_plugin: StartPlugin
):
    rp = start_plugin(local_backend_rig)  # refresh_interval 3600 s: only the probe can notice
    before = rp.plugin.keys.status_key_id()
    local.rotate(local_backend_rig.extra["keyring"])
    assert rp.plugin.keys.status_key_id() == before  # nothing polls the backend by itself
    rp.plugin.monitor.probe()
    rp.plugin.monitor.run_once()
    assert rp.plugin.keys.status_key_id() != before


def test_status_costs_no_backend_call_in_any_health_state(
    local_backend_rig: BackendRig, start_plugin: StartPlugin
):
    rp = start_plugin(local_backend_rig)
    local_backend_rig.disable()
    rp.plugin.monitor.probe()
    calls = sum(rp.calls.values())
    with FakeApiserver(rp.endpoint) as api:
        for _ in range(50):
            assert "disabled" in api.status().healthz
    assert sum(rp.calls.values()) == calls
