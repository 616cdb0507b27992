"""The demo (``python -m edge_demo``, what ``make demo`` and scripts/demo.sh run) end to end in
its fast mode, so it cannot rot silently: every step passes against the real services, the
summary says so, the screen carries no log noise, and nothing is left behind, also after a
SIGTERM half-way and after a failing step.

The live-LV steps run in the qemu guest and are skipped here (--skip-kernel); the same code is
run on a live kernel by tests/demo/test_csi_live.py (a ``kernel`` test).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from edge_common.commands import run
from edge_common.loopdisk import attached_under
from edge_common.lvm import Lvm
from tests.rigs.lvm import unique_vg_name

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the demo needs root")

DEMO_TIMEOUT = 110.0
ANSI = re.compile(r"\x1b\[")
# The steps a user must see pass (titles as the demo prints them, matched by prefix).
EXPECTED_OK = (
    "Create 3 loop disks and the topology file",
    "node-resource-manager --dry-run",
    "node-resource-manager --once",
    "The disk with a filesystem: refused, untouched",
    "The volume group, as LVM reports it",
    "Start csi-lvm on a unix socket",
    "GetCapacity",
    "CreateVolume",
    "ControllerExpandVolume",
    "DeleteVolume",
    "local backend: kms-plugin keygen, serve",
    "Secrets written and read as kube-apiserver does",
    "Key rotation picked up live",
    "kms-plugin inspect --decrypt",
    "awskms backend against the fake AWS KMS",
    "Secrets through AWS KMS",
    "AWS KMS key rotation picked up live",
    "AWS KMS down: Secrets stay readable",
    "Clean up everything the demo made",
)


def demo_argv(tmp_path: Path, vg: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "edge_demo", "--fast", "--skip-kernel",
            "--workdir-parent", str(tmp_path / "work"), "--vg-name", vg,
            "--summary-json", str(tmp_path / "summary.json"), *extra]


def steps_by_title(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["title"]: s for s in summary["steps"]}


def find_step(steps: dict[str, dict[str, Any]], prefix: str) -> dict[str, Any]:
    hits = [s for title, s in steps.items() if title.startswith(prefix)]
    assert len(hits) == 1, f"expected one step starting with {prefix!r}, got {list(steps)}"
    return hits[0]


def processes_mentioning(text: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{entry.name}: {cmdline}")
    return found


def assert_nothing_left(tmp_path: Path, vg: str) -> None:
    lvm = Lvm(Lvm.settings_for_this_kernel(timeout=60.0))
    assert lvm.get_vg(vg) is None, f"VG {vg} left behind"
    assert attached_under(tmp_path) == [], "loop devices left behind"
    assert processes_mentioning(str(tmp_path / "work")) == [], "processes left behind"
    with open("/proc/self/mountinfo") as mounts:
        assert str(tmp_path) not in mounts.read(), "mounts left behind"


def test_demo_fast_mode_passes_every_step_and_leaves_nothing_behind(tmp_path: Path) -> None:
    vg = unique_vg_name("demo")
    result = run(demo_argv(tmp_path, vg), timeout=DEMO_TIMEOUT, check=False)
    out = result.stdout_text
    assert result.returncode == 0, out + result.stderr_text

    summary = json.loads((tmp_path / "summary.json").read_text())
    steps = steps_by_title(summary)
    assert summary["exit_code"] == 0
    for prefix in EXPECTED_OK:
        step = find_step(steps, prefix)
        assert step["status"] == "ok", step
    live = find_step(steps, "Live LV:")
    assert (live["status"], live["note"]) == ("skipped", "--skip-kernel")
    assert {s["status"] for s in summary["steps"]} == {"ok", "skipped"}

    # What the steps claim is what happened.
    refused = find_step(steps, "The disk with a filesystem")
    assert "HasSignature" in refused["note"] and "blkid still says ext4" in refused["note"]
    aws = find_step(steps, "Secrets through AWS KMS")
    assert "AWS KMS Encrypt/Decrypt calls: 0" in aws["note"]
    inspect = "\n".join(find_step(steps, "kms-plugin inspect")["details"])
    assert "decrypt: ok" in inspect and "provider: edge-demo" in inspect

    # For people: the one-line device-mapper note, a summary table, no JSON logs, no colour
    # codes when stdout is not a terminal.
    assert out.count("no device-mapper") == 1
    assert re.search(r"^\s+STEP\s+RESULT\s+TIME$", out, re.MULTILINE)
    passed = sum(s["status"] == "ok" for s in summary["steps"])
    assert f"all {passed} steps passed, 1 skipped" in out
    assert not [line for line in out.splitlines() if line.lstrip().startswith('{"')]
    assert not ANSI.search(out)
    assert result.stderr_text == ""

    assert_nothing_left(tmp_path, vg)
    assert list((tmp_path / "work").iterdir()) == [], "work directory left behind"


def test_demo_sigterm_half_way_cleans_up_and_exits_143(tmp_path: Path) -> None:
    vg = unique_vg_name("demo")
    out_path = tmp_path / "out.txt"
    with open(out_path, "wb") as out:
        proc = subprocess.Popen(demo_argv(tmp_path, vg), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        # Wait until the CSI driver runs on top of the VG: processes, loop disks, a VG exist.
        deadline = time.monotonic() + DEMO_TIMEOUT
        while "Start csi-lvm on a unix socket" not in out_path.read_text():
            assert proc.poll() is None, out_path.read_text()
            assert time.monotonic() < deadline, out_path.read_text()
            time.sleep(0.1)
        assert processes_mentioning(str(tmp_path / "work")), "no service running to stop"
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = out_path.read_text()
    assert code == 128 + signal.SIGTERM, text
    assert "Interrupted (SIGTERM): cleaning up." in text
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["exit_code"] == 143
    cleanup = find_step(steps_by_title(summary), "Clean up everything")
    assert cleanup["status"] == "ok", text
    assert_nothing_left(tmp_path, vg)
    # The logs are kept after an interruption, nothing else.
    (work,) = (tmp_path / "work").iterdir()
    assert [p.name for p in work.iterdir()] == ["logs"]
    assert (work / "logs" / "csi-lvm.log").is_file()


def test_demo_failing_service_is_reported_with_its_log_and_the_rest_still_runs(
    tmp_path: Path,
) -> None:
    vg = unique_vg_name("demo")
    # A configuration the agent refuses (environment NRM_*), as a user could have set it.
    result = run(demo_argv(tmp_path, vg), timeout=DEMO_TIMEOUT, check=False,
                 env={"NRM_RESYNC_SECONDS": "0"})
    out = result.stdout_text
    assert result.returncode == 1, out

    summary = json.loads((tmp_path / "summary.json").read_text())
    steps = steps_by_title(summary)
    failed = [s for s in summary["steps"] if s["status"] == "failed"]
    assert [s["title"] for s in failed] == ["node-resource-manager --dry-run: the plan"], failed
    log = Path(failed[0]["logs"][0])
    assert log.name == "node-resource-manager.log"
    assert log.is_file() and "resync_seconds" in log.read_text()
    assert f"see {log}" in out
    # No VG: the CSI part says why it did not run; the KMS part is independent and passes.
    assert find_step(steps, "CSI driver on this host")["status"] == "skipped"
    assert find_step(steps, "AWS KMS down")["status"] == "ok"
    assert find_step(steps, "Clean up everything")["status"] == "ok"
    assert_nothing_left(tmp_path, vg)
