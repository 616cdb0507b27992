"""A state-changing LVM command is never killed on timeout; a report still is (issue 11, 4).

The lvm "binary" here is a script (the settings' command prefix) that records its pid and
sleeps, so the test sees exactly what the runner does with a slow command, without LVM.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from csi_lvm.locks import InFlight
from edge_common.commands import CommandStillRunning, CommandTimeout, run
from edge_common.errors import Aborted, ServiceError
from edge_common.lvm import Lvm, LvmSettings, LvmStillRunning, LvmTimeout, still_running


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purpose.
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture
def slow_lvm(tmp_path: Path) -> tuple[Lvm, Path]:
    script = tmp_path / "slow-lvm"
    pids = tmp_path / "pids"
    script.write_text(f"#!/bin/sh\necho $$ >> {pids}\nsleep \"${{SLOW_LVM_SECONDS:-2}}\"\n"
                      "echo done\n")
    script.chmod(0o755)
    return Lvm(LvmSettings(command=(str(script),), timeout=0.3)), pids


def test_run_without_kill_leaves_the_command_running_and_reports_its_end() -> None:
    start = time.monotonic()
    with pytest.raises(CommandStillRunning) as info:
        run(["sh", "-c", "sleep 1; echo finished; exit 3"], timeout=0.2, kill_on_timeout=False)
    assert time.monotonic() - start < 1.0
    assert isinstance(info.value, CommandTimeout)  # callers that only know timeouts still see one
    result = info.value.finished.result(timeout=30)
    assert result.returncode == 3 and result.stdout_text == "finished\n"


def test_a_change_outliving_its_timeout_is_left_running_to_completion(
    slow_lvm: tuple[Lvm, Path],
) -> None:
    lvm, pids = slow_lvm
    with pytest.raises(LvmStillRunning) as info:
        lvm.lvextend("vg0", "lv0", 1 << 30)
    assert "still running" in info.value.message and "never killed" in info.value.message
    pid = int(pids.read_text().split()[0])
    assert alive(pid), "the runner killed a state-changing lvm command"
    result = info.value.finished.result(timeout=30)
    assert result.stdout_text == "done\n"  # ran to its end
    assert not alive(pid)


def test_a_report_is_still_cut_short(slow_lvm: tuple[Lvm, Path]) -> None:
    lvm, pids = slow_lvm
    with pytest.raises(LvmTimeout) as info:
        lvm.lvs("vg0")
    assert not isinstance(info.value, LvmStillRunning)
    pid = int(pids.read_text().split()[0])
    deadline = time.monotonic() + 5
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(pid)


def test_the_volume_stays_locked_until_the_background_command_ends(
    slow_lvm: tuple[Lvm, Path],
) -> None:
    lvm, _ = slow_lvm
    locks = InFlight()
    with pytest.raises(ServiceError) as info:
        with locks.hold("lv:vg0/lv0"):
            try:
                lvm.lvextend("vg0", "lv0", 1 << 30)
            except LvmStillRunning as exc:
                raise Aborted(f"growing: {exc.message}") from None
    running = still_running(info.value)
    assert running is not None
    # The RPC has answered, the command still runs: the next call for the volume is ABORTED.
    with pytest.raises(Aborted):
        with locks.hold("lv:vg0/lv0"):
            pass
    running.finished.result(timeout=30)
    deadline = time.monotonic() + 5
    while locks.busy() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert locks.busy() == []
    with locks.hold("lv:vg0/lv0"):  # converges: the next call proceeds
        pass


def test_other_failures_release_the_keys_at_once() -> None:
    locks = InFlight()
    with pytest.raises(ValueError):
        with locks.hold("lv:a", shared=["lv:b"]):
            raise ValueError("boom")
    assert locks.busy() == []
