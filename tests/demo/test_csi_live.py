"""The demo's live-LV part (``python -m edge_demo.guest``, what the demo runs in the qemu
guest) on a kernel with device-mapper: one PVC's life through the driver's socket on two loop
disks, every step passing and nothing left behind.

A ``kernel`` test: it runs in the real-kernel suite
(``python -m kernel_guest pytest tests/demo/test_csi_live.py``) and is skipped on a kernel
without device-mapper.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from edge_common.commands import run
from edge_common.loopdisk import loop_disks
from edge_common.lvm import Lvm
from tests.rigs.lvm import unique_vg_name

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(600)]

MiB = 1 << 20
EXPECTED = (
    "VG ",
    "csi-lvm serving on a unix socket",
    "CreateVolume",
    "NodePublishVolume",
    "The pod writes a file",
    "Expand to 128 MiB",
    "NodeGetVolumeStats",
    "CreateSnapshot",
    "Delete: snapshot, NodeUnpublish, DeleteVolume",
)


def test_csi_live_walks_one_pvc_through_a_live_lv_and_cleans_up(tmp_path: Path) -> None:
    vg = unique_vg_name("live")
    report = tmp_path / "csi-live.json"
    with loop_disks(2, 512 * MiB, tmp_path) as disks:
        result = run(
            [sys.executable, "-m", "edge_demo.guest", "--disks",
             ",".join(d.device for d in disks), "--vg", vg, "--report", str(report),
             "--log-dir", str(tmp_path)],
            timeout=540, check=False,
        )
        output = result.stdout_text + result.stderr_text
        data = json.loads(report.read_text())
        steps = data["steps"]
        assert [s["status"] for s in steps] == ["ok"] * len(EXPECTED), output
        for step, prefix in zip(steps, EXPECTED, strict=True):
            assert step["title"].startswith(prefix), (step["title"], prefix)
        assert result.returncode == 0, output
        assert data["cleanup_failed"] == []
        notes = {s["title"].split(" (")[0]: s["note"] for s in steps}
        assert "lost+found" in notes["NodePublishVolume"]
        assert "while mounted" in notes["Expand to 128 MiB"]
        assert "ready_to_use=True" in notes["CreateSnapshot"]
        assert Lvm(Lvm.settings_for_this_kernel()).get_vg(vg) is None
