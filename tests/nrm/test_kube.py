"""The agent as a process against the fake API server: watches, status annotation, Events.

The resync period is an hour and udev is off unless a test turns it on, so every change below
takes effect through a watch (or a uevent), never through the periodic resync.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from edge_common.commands import run
from edge_common.loopdisk import device_fingerprint, write_signature
from node_resource_manager.config import DEFAULT_STATUS_ANNOTATION
from tests.nrm.conftest import ADMITTED, GATE, REPO, NrmRig, cli_env, entry, topology_text
from tests.rigs.fake_kube import FakeKubeServer

NODE = "edge-node-1"
NS, CM = "kube-system", "node-resource-topo"


def eventually(predicate: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Agent:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    fake: FakeKubeServer

    def status(self) -> dict[str, Any] | None:
        node = self.fake.node(NODE) or {}
        raw = (node.get("metadata", {}).get("annotations") or {}).get(DEFAULT_STATUS_ANNOTATION)
        return json.loads(raw) if raw else None

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        """Sum of the samples of ``name`` matching ``labels``; -1 when /metrics is down."""
        url = f"http://127.0.0.1:{self.port}/metrics"
        try:
            text = urllib.request.urlopen(url, timeout=5).read().decode()
        except OSError:
            return -1.0
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == name
            and all(sample.labels.get(k) == v for k, v in (labels or {}).items())
        )

    def reconciles(self) -> float:
        return self.metric("nrm_reconciles_total")

    def wait_status(self, predicate: Callable[[dict[str, Any]], bool], what: str) -> dict:
        def check() -> dict[str, Any] | None:
            status = self.status()
            return status if status is not None and predicate(status) else None

        return eventually(check, what)

    def events(self, reason: str) -> list[dict[str, Any]]:
        return self.fake.events(reason=reason, involved_kind="Node", involved_name=NODE)


@contextlib.contextmanager
def agent(nrm: NrmRig, fake: FakeKubeServer, *extra: str) -> Iterator[Agent]:
    kubeconfig = fake.write_kubeconfig(nrm.tmp / "kubeconfig")
    port = free_port()
    log = nrm.tmp / "agent.log"
    args = [
        "--node-name", NODE, "--kubeconfig", str(kubeconfig),
        "--state-dir", str(nrm.state_dir), "--dev-disk-dir", str(nrm.dev_disk),
        "--mount-tables", f"/proc/1/mountinfo,/proc/self/mountinfo,{nrm.extra_mountinfo}",
        "--resync-seconds", "3600", "--debounce-seconds", "0.1", "--no-udev",
        "--metrics-address", f"127.0.0.1:{port}", "--log-level", "DEBUG",
        "--watch-timeout-seconds", "60", *extra,
    ]
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "node_resource_manager", *args],
                                cwd=REPO, env=cli_env(), stdout=out, stderr=out)
    handle = Agent(proc, port, log, fake)
    try:
        eventually(lambda: handle.reconciles() >= 1 or proc.poll() is not None,
                   "the agent's first reconcile")
        assert proc.poll() is None, log.read_text()
        yield handle
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_configmap_change_builds_the_volume_group(nrm: NrmRig, fake_kube: FakeKubeServer) -> None:
    disks = nrm.disks(2)
    vg = nrm.vg_name()
    fake_kube.put_node(NODE, labels=ADMITTED)
    with agent(nrm, fake_kube) as a:
        a.wait_status(lambda s: s["result"] == "NoConfig", "status NoConfig")
        cm = fake_kube.set_configmap(NS, CM, {"volumegroup": topology_text(
            entry(vg, [d.device for d in disks]))})
        status = a.wait_status(lambda s: s["result"] == "Converged", "status Converged")
        assert status["config"]["generation"] == cm["metadata"]["resourceVersion"]
        (vg_status,) = status["volumeGroups"]
        assert vg_status["name"] == vg and vg_status["state"] == "Ready"
        assert sorted(vg_status["pvs"]) == sorted(d.device for d in disks)
        assert vg_status["size"] > 0 and vg_status["free"] == vg_status["size"]
        (event,) = a.events("VolumeGroupCreated")
        assert event["type"] == "Normal" and vg in event["message"]
        assert event["source"]["component"] == "node-resource-manager"
        assert event["involvedObject"]["uid"] == (fake_kube.node(NODE) or {})["metadata"]["uid"]
        assert a.metric("nrm_volume_group_size_bytes", {"vg": vg}) == vg_status["size"]

        # The agent's own annotation patches do not wake it up.
        settled = a.reconciles()
        time.sleep(1.5)
        assert a.reconciles() == settled


def test_label_change_at_runtime_selects_the_node(nrm: NrmRig, fake_kube: FakeKubeServer) -> None:
    (disk,) = nrm.disks(1)
    vg = nrm.vg_name()
    fake_kube.put_node(NODE, labels={GATE: "true"})
    fake_kube.set_configmap(NS, CM, {"volumegroup": topology_text(
        entry(vg, [disk.device], key="disktype", operator="In", value="fast"))})
    with agent(nrm, fake_kube) as a:
        a.wait_status(lambda s: s["result"] == "Converged" and s["volumeGroups"] == [],
                      "converged with no selected VG")
        assert nrm.pv_vg(disk.device) is None
        fake_kube.label_node(NODE, {"disktype": "fast"})
        eventually(lambda: nrm.pv_vg(disk.device) == vg, "the VG after the label change")
        a.wait_status(lambda s: [v["name"] for v in s["volumeGroups"]] == [vg], "VG in status")


def test_gate_label_removed_and_restored(nrm: NrmRig, fake_kube: FakeKubeServer) -> None:
    a_disk, b_disk = nrm.disks(2)
    vg = nrm.vg_name()
    fake_kube.put_node(NODE, labels=ADMITTED)
    fake_kube.set_configmap(NS, CM, {"volumegroup": topology_text(entry(vg, [a_disk.device]))})
    with agent(nrm, fake_kube) as a:
        eventually(lambda: nrm.pv_vg(a_disk.device) == vg, "the VG")
        fake_kube.label_node(NODE, {GATE: None})
        a.wait_status(lambda s: s["result"] == "NotAdmitted", "status NotAdmitted")
        before = device_fingerprint(b_disk.device)
        cm = fake_kube.set_configmap(NS, CM, {"volumegroup": topology_text(
            entry(vg, [a_disk.device, b_disk.device]))})
        a.wait_status(lambda s: s["config"]["generation"] == cm["metadata"]["resourceVersion"],
                      "the new config seen while not admitted")
        assert device_fingerprint(b_disk.device) == before
        assert nrm.pv_vg(b_disk.device) is None
        assert nrm.pv_vg(a_disk.device) == vg  # nothing is torn down when the gate closes

        fake_kube.label_node(NODE, {GATE: "true"})
        eventually(lambda: nrm.pv_vg(b_disk.device) == vg, "the VG extended after the gate")
        (event,) = eventually(lambda: a.events("VolumeGroupExtended"), "the Extended event")
        assert b_disk.device in event["message"]


def test_bad_config_gives_config_invalid_event_and_status_and_touches_nothing(
    nrm: NrmRig, fake_kube: FakeKubeServer
) -> None:
    (disk,) = nrm.disks(1)
    vg = nrm.vg_name()
    before = device_fingerprint(disk.device)
    fake_kube.put_node(NODE, labels=ADMITTED)
    fake_kube.set_configmap(NS, CM, {"volumegroup": topology_text(
        entry(vg, [disk.device], operator="Matches"))})
    with agent(nrm, fake_kube) as a:
        status = a.wait_status(lambda s: s["result"] == "ConfigInvalid", "ConfigInvalid")
        expected = (f"volumegroup[0] ({vg}): unknown operator 'Matches' (expected one of In, "
                    "NotIn, Exists, DoesNotExist)")
        assert status["problems"] == [expected]
        (event,) = eventually(lambda: a.events("ConfigInvalid"), "the ConfigInvalid event")
        assert event["type"] == "Warning" and expected in event["message"]
        assert device_fingerprint(disk.device) == before
        assert nrm.pv_vg(disk.device) is None and nrm.lvm.get_vg(vg) is None
        # A missing data key is just as invalid.
        fake_kube.set_configmap(NS, CM, {"other": "x"})
        a.wait_status(lambda s: s.get("problems") == [
            f"ConfigMap {NS}/{CM} has no data key 'volumegroup'"], "missing key problem")


def test_refused_device_is_reported_once_across_reconciles(
    nrm: NrmRig, fake_kube: FakeKubeServer
) -> None:
    good, bad = nrm.disks(2)
    write_signature(bad.device, "ext4")
    vg = nrm.vg_name()
    fake_kube.put_node(NODE, labels=ADMITTED)
    fake_kube.set_configmap(NS, CM, {"volumegroup": topology_text(
        entry(vg, [good.device, bad.device]))})
    with agent(nrm, fake_kube) as a:
        status = a.wait_status(lambda s: s["result"] == "DevicesRefused", "DevicesRefused")
        (excluded,) = status["excludedDevices"]
        assert excluded["device"] == bad.device
        assert excluded["reasons"][0]["reason"] == "HasSignature"
        count = a.reconciles()
        for i in range(3):  # each label change is a reconcile
            fake_kube.label_node(NODE, {"unrelated": str(i)})
            target = count + i + 1
            eventually(lambda: a.reconciles() >= target, "another reconcile")  # noqa: B023
        (event,) = a.events("DeviceRejected")
        assert event["type"] == "Warning" and "HasSignature" in event["message"]
        assert a.metric("nrm_devices_rejected", {"reason": "HasSignature"}) == 1


def test_watch_relists_after_410_gone(nrm: NrmRig, fake_kube: FakeKubeServer) -> None:
    (disk,) = nrm.disks(1)
    vg = nrm.vg_name()
    fake_kube.put_node(NODE, labels=ADMITTED)
    with agent(nrm, fake_kube) as a:
        fake_kube.wait_for_watch("configmaps")
        fake_kube.wait_for_watch("nodes")
        lists, gets = fake_kube.count("list", "configmaps"), fake_kube.count("get", "nodes")
        fake_kube.put_node("some-other-node", labels={})  # history moves on ...
        fake_kube.compact()  # ... and is dropped
        fake_kube.close_watches()  # the agent resumes from its old resourceVersion: 410
        eventually(lambda: fake_kube.count("list", "configmaps") > lists, "ConfigMap relist")
        eventually(lambda: fake_kube.count("get", "nodes") > gets, "Node re-read")
        fake_kube.set_configmap(NS, CM, {"volumegroup": topology_text(entry(vg, [disk.device]))})
        eventually(lambda: nrm.pv_vg(disk.device) == vg, "the VG after the relist")
        assert "410 Gone" in a.log.read_text()


def test_block_device_uevent_triggers_a_reconcile(nrm: NrmRig, fake_kube: FakeKubeServer) -> None:
    (disk,) = nrm.disks(1)
    write_signature(disk.device, "ext4")
    vg = nrm.vg_name()
    fake_kube.put_node(NODE, labels=ADMITTED)
    fake_kube.set_configmap(NS, CM, {"volumegroup": topology_text(entry(vg, [disk.device]))})
    with agent(nrm, fake_kube, "--udev") as a:
        a.wait_status(lambda s: s["result"] == "DevicesRefused", "the formatted disk refused")
        # The operator clears the disk (our own test disk) and the kernel announces a change.
        run(["wipefs", "--all", "--quiet", disk.device], timeout=30)
        run(["losetup", "--set-capacity", disk.device], timeout=30)
        eventually(lambda: nrm.pv_vg(disk.device) == vg, "the VG after the uevent")
        # (Other tests' loop disks cause uevents too: the one for our disk must arrive.)
        needle = f"udev change {disk.device.removeprefix('/dev/')}"
        eventually(lambda: needle in a.log.read_text(), "our disk's uevent in the log")


def test_once_against_the_api_publishes_status_and_dry_run_publishes_nothing(
    nrm: NrmRig, fake_kube: FakeKubeServer
) -> None:
    good, bad = nrm.disks(2)
    write_signature(bad.device, "ext4")
    vg = nrm.vg_name()
    fake_kube.put_node(NODE, labels=ADMITTED)
    fake_kube.set_configmap(NS, CM, {"volumegroup": topology_text(
        entry(vg, [good.device, bad.device]))})
    kubeconfig = str(fake_kube.write_kubeconfig(nrm.tmp / "kubeconfig"))
    common = ["--node-name", NODE, "--kubeconfig", kubeconfig, "--state-dir",
              str(nrm.state_dir), "--log-level", "WARNING"]

    dry = nrm.cli(*common, "--dry-run")
    assert dry.returncode == 2, dry.stdout + dry.stderr
    assert f"volume group {vg}: CREATE from {good.device}" in dry.stdout
    assert nrm.pv_vg(good.device) is None
    assert fake_kube.count("patch", "nodes") == 0 and fake_kube.count("create", "events") == 0

    once = nrm.cli(*common, "--once")
    assert once.returncode == 2, once.stdout + once.stderr
    assert nrm.pv_vg(good.device) == vg
    node = fake_kube.node(NODE) or {}
    status = json.loads(node["metadata"]["annotations"][DEFAULT_STATUS_ANNOTATION])
    assert status["result"] == "DevicesRefused"
    assert {e["reason"] for e in fake_kube.events(involved_name=NODE)} == {
        "VolumeGroupCreated", "DeviceRejected"}
