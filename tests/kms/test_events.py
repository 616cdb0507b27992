"""The optional Kubernetes Event when the root key becomes unusable (and when it recovers)."""

from __future__ import annotations

from typing import Any

from edge_common.kubeapi import ClusterConfig, KubeClient
from kms_plugin.events import KubeEventNotifier
from tests.kms.conftest import BackendRig, StartPlugin


def test_a_disabled_root_key_records_one_warning_event_and_recovery_a_normal_one(
    local_backend_rig: BackendRig, start_plugin: StartPlugin, fake_kube: Any
):
    client = KubeClient(ClusterConfig(server=fake_kube.url))
    notifier = KubeEventNotifier(client, "kube-system", "kms-plugin-cp1", "cp1")
    rp = start_plugin(local_backend_rig)
    rp.plugin.monitor.notifier = notifier
    local_backend_rig.disable()
    for _ in range(3):
        rp.plugin.monitor.probe()
    warnings = fake_kube.events("kube-system", reason="RootKeyUnusable",
                                involved_name="kms-plugin-cp1")
    assert len(warnings) == 1  # logs repeat on every probe; the Event is recorded once
    assert warnings[0]["type"] == "Warning" and "disabled" in warnings[0]["message"]
    local_backend_rig.enable()
    rp.plugin.monitor.probe()
    assert len(fake_kube.events("kube-system", reason="RootKeyUsable")) == 1


def test_a_failing_event_api_does_not_break_the_plugin(
    local_backend_rig: BackendRig, start_plugin: StartPlugin
):
    class Broken:
        def root_key_unusable(self, reason: str, message: str) -> None:
            raise RuntimeError("apiserver down")

        def root_key_usable(self) -> None:
            raise RuntimeError("apiserver down")

    rp = start_plugin(local_backend_rig)
    rp.plugin.monitor.notifier = Broken()
    local_backend_rig.disable()
    assert rp.plugin.monitor.probe().root_key_problem == "disabled"
    local_backend_rig.enable()
    assert rp.plugin.monitor.probe().state == "ok"
