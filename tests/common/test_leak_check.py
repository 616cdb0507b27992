"""The suite's leak check (tests/rigs/leaks.py), run on inner pytest sessions."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_common.loopdisk import attached_under
from edge_common.lvm import Lvm

REPO = Path(__file__).resolve().parents[2]

CONFTEST = """
pytest_plugins = ["tests.rigs.loopdisks", "tests.rigs.lvm", "tests.rigs.leaks"]
"""


@pytest.fixture
def inner(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    pytester.makeconftest(CONFTEST)
    return pytester


def run_inner(inner: pytest.Pytester, source: str) -> pytest.RunResult:
    inner.makepyfile(source)
    return inner.runpytest_subprocess("-p", "no:cacheprovider", "-q")


def session_vgs(lvm: Lvm, result: pytest.RunResult) -> list[str]:
    """VGs whose name appears in the inner session's output."""
    text = result.stdout.str()
    return [vg.name for vg in lvm.vgs() if vg.name in text]


def test_a_clean_session_passes_the_leak_check(inner: pytest.Pytester) -> None:
    result = run_inner(
        inner,
        """
from tests.rigs.loopdisks import MiB

def test_uses_rigs(vg_factory, lvm, loop_disks):
    vg = vg_factory(pvs=2, size=32 * MiB)
    lvm.lvcreate(vg.name, "lv", 4 * MiB)
    (extra,) = loop_disks(1, 16 * MiB)
    lvm.pvcreate([extra.device])
    lvm.vgextend(vg.name, [extra.device])
""",
    )
    result.assert_outcomes(passed=1)
    assert "LEAK" not in result.stdout.str()
    assert result.ret == 0


def test_a_test_leaking_a_loop_device_and_a_vg_fails_and_both_are_cleaned_up(
    inner: pytest.Pytester, lvm: Lvm
) -> None:
    result = run_inner(
        inner,
        """
from edge_common.loopdisk import LoopDisk, MiB

def test_leaks(tmp_path, lvm):
    disk = LoopDisk(tmp_path, 32 * MiB)
    disk.attach()
    lvm.vgcreate("leakyvg-" + tmp_path.name[-12:].replace("_", ""), [disk.device])

def test_clean_afterwards():
    pass
""",
    )
    result.assert_outcomes(passed=2, errors=1)
    out = result.stdout.str()
    assert "test leaked loop devices" in out and "VGs: leakyvg-" in out and "PVs: /dev/loop" in out
    assert "LEAK CHECK FAILED" not in out  # already cleaned up after the test
    assert attached_under(inner.path) == []
    assert [vg for vg in lvm.vgs() if vg.name.startswith("leakyvg-")] == []


def test_a_vg_leaked_by_a_session_fixture_fails_the_session_not_the_tests(
    inner: pytest.Pytester, lvm: Lvm
) -> None:
    result = run_inner(
        inner,
        """
import pytest
from edge_common.loopdisk import LoopDisk, MiB
from tests.rigs.lvm import unique_vg_name

@pytest.fixture(scope="session")
def shared_vg(tmp_path_factory, lvm):
    disk = LoopDisk(tmp_path_factory.mktemp("shared"), 32 * MiB)
    disk.attach()
    name = unique_vg_name("sessionleak")
    lvm.vgcreate(name, [disk.device])
    print("created", name)
    return name

def test_one(shared_vg):
    pass

def test_two(shared_vg):
    pass
""",
    )
    result.assert_outcomes(passed=2)
    assert result.ret != 0
    out = result.stdout.str()
    assert "LEAK CHECK FAILED" in out and "sessionleak" in out
    assert attached_under(inner.path) == []
    assert [vg for vg in lvm.vgs() if "sessionleak" in vg.name] == []


def test_vg_factory_tolerates_a_test_that_removed_its_own_vg(inner: pytest.Pytester) -> None:
    result = run_inner(
        inner,
        """
def test_removes_vg(vg_factory, lvm):
    vg = vg_factory(pvs=2)
    lvm.lvcreate(vg.name, "lv", 4 << 20)
    lvm.command("vgremove", "--yes", vg.name)
    lvm.command("pvremove", "--yes", vg.devices[0])
    assert lvm.get_vg(vg.name) is None
""",
    )
    result.assert_outcomes(passed=1)
    assert result.ret == 0


def test_vg_factory_removes_lvs_vg_and_pv_labels_at_teardown(
    inner: pytest.Pytester, lvm: Lvm
) -> None:
    result = run_inner(
        inner,
        """
def test_makes_vg(vg_factory, lvm):
    vg = vg_factory(pvs=2, tags=("factorycheck",))
    lvm.lvcreate(vg.name, "lv", 4 << 20)
    print("VGNAME", vg.name, "DEVICES", *vg.devices)
""",
    )
    result.assert_outcomes(passed=1)
    assert result.ret == 0
    assert [vg for vg in lvm.vgs() if "factorycheck" in vg.tags] == []


def test_a_lazily_detached_loop_device_is_not_a_leak(inner: pytest.Pytester) -> None:
    # losetup -d while something still holds the device only sets autoclear; the kernel
    # detaches it on last close. The check waits for that instead of calling it a leak.
    result = run_inner(
        inner,
        """
import subprocess
from edge_common.commands import run

def test_detaches_while_busy(tmp_path):
    backing = tmp_path / "f"
    backing.write_bytes(bytes(1 << 20))
    dev = run(["losetup", "--find", "--show", str(backing)], timeout=30).stdout_text.strip()
    holder = subprocess.Popen(
        ["sh", "-c", "exec 3<" + dev + "; echo ready; sleep 1"], stdout=subprocess.PIPE
    )
    assert holder.stdout.readline() == b"ready\\n"  # the device is held open now
    run(["losetup", "--detach", dev], timeout=30)
    assert open("/sys/block/" + dev[5:] + "/loop/autoclear").read().strip() == "1"
""",
    )
    result.assert_outcomes(passed=1)
    assert result.ret == 0
