"""Leak check: the suite fails if it leaves a loop device, a PV or a VG behind.

Only objects of THIS session count (other engineers' sessions run on the same machine):
loop devices whose backing file lives under this session's pytest base temp directory, PVs on
them, and VGs whose name starts with this session's ``SESSION_PREFIX``.

- After each test: loop devices under the base temp that appeared during the test and are
  still attached fail that test (an error at teardown). Fixtures of a wider scope set up by
  the test are not counted: pytest sets them up before this function-scoped check starts.
  A VG cannot outlive its loop disks, so a leaked VG shows up as a leaked loop device.
- At session end: any of our loop devices, PVs or VGs left fails the session.

Leaks are reported, then cleaned up (best effort) so that they do not pile up on the machine.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from edge_common.commands import CommandError, CommandTimeout, run
from edge_common.loopdisk import AttachedLoop, attached_loops, attached_under
from edge_common.lvm import Lvm, LvmCommandNotFound, LvmError
from tests.rigs.lvm import SESSION_PREFIX


@dataclass
class Leaks:
    loops: list[AttachedLoop] = field(default_factory=list)
    pvs: list[str] = field(default_factory=list)
    vgs: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.loops or self.pvs or self.vgs)

    def describe(self) -> str:
        parts = []
        if self.loops:
            parts.append(
                "loop devices: "
                + ", ".join(f"{lp.device} -> {lp.backing_file}" for lp in self.loops)
            )
        if self.pvs:
            parts.append("PVs: " + ", ".join(self.pvs))
        if self.vgs:
            parts.append("VGs: " + ", ".join(self.vgs))
        return "; ".join(parts)


_state: dict[str, Path] = {}


def _lvm() -> Lvm:
    return Lvm(Lvm.settings_for_this_kernel(timeout=60.0))


def find_leaks(
    root: Path | None, *, only: set[str] | None = None, prefix: str = SESSION_PREFIX
) -> Leaks:
    """Our loop devices still attached (under ``root``; restricted to ``only`` when given),
    the PVs on them, and the VGs that are ours: named with ``prefix`` or living only on our
    loop devices."""
    loops = attached_under(root) if root is not None else []
    if only is not None:
        loops = [lp for lp in loops if lp.device in only]
    ours = {lp.device for lp in loops}
    report = _lvm().report()
    pvs_of: dict[str, set[str]] = {}
    for pv in report.pvs:
        if pv.vg_name:
            pvs_of.setdefault(pv.vg_name, set()).add(pv.name)
    vgs = {
        vg.name
        for vg in report.vgs
        if (only is None and vg.name.startswith(prefix))
        or (pvs_of.get(vg.name) and pvs_of[vg.name] <= ours)
    }
    return Leaks(
        loops=loops,
        pvs=sorted(pv.name for pv in report.pvs if pv.name in ours),
        vgs=sorted(vgs),
    )


def clean_up(leaks: Leaks) -> list[str]:
    """Remove leaked VGs (only ours: by prefix), PV labels on our loops, then our loops."""
    problems: list[str] = []
    lvm = _lvm()
    for vg in leaks.vgs:
        try:
            lvm.command("vgremove", "--yes", "--", vg)
        except LvmError as exc:
            problems.append(str(exc))
    if leaks.pvs:
        try:
            ours_now = {pv.name for pv in lvm.pvs() if pv.vg_name is None}
            labelled = [d for d in leaks.pvs if d in ours_now]
            if labelled:
                lvm.command("pvremove", "--yes", "--", *labelled)
        except LvmError as exc:
            problems.append(str(exc))
    for loop in leaks.loops:
        try:
            run(["losetup", "--detach", loop.device], timeout=30)
        except (CommandError, CommandTimeout) as exc:
            problems.append(str(exc))
        try:
            os.unlink(loop.backing_file)
        except OSError:
            pass
    return problems


def _settled(loops: list[AttachedLoop], grace: float = 5.0) -> list[AttachedLoop]:
    """Give lazily detached loops (``losetup -d`` while udev or blkid still held the device:
    the kernel sets autoclear and detaches on last close) a moment to go."""
    deadline = time.monotonic() + grace
    while any(lp.autoclear for lp in loops) and time.monotonic() < deadline:
        time.sleep(0.05)
        now = {(lp.device, lp.backing_file): lp for lp in attached_loops()}
        loops = [now[key] for key in ((lp.device, lp.backing_file) for lp in loops) if key in now]
    return loops


@pytest.fixture(autouse=True)
def _leak_check_per_test(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    root = tmp_path_factory.getbasetemp()
    _state["root"] = root
    before = {(lp.device, lp.backing_file) for lp in attached_under(root)}
    yield
    new = _settled(
        [lp for lp in attached_under(root) if (lp.device, lp.backing_file) not in before]
    )
    if not new:
        return
    leaks = find_leaks(root, only={lp.device for lp in new})
    problems = clean_up(leaks)
    extra = f" (cleanup problems: {'; '.join(problems)})" if problems else ""
    pytest.fail(f"test leaked {leaks.describe()}{extra}", pytrace=False)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    root = _state.get("root")
    if root is None and not _lvm_available():
        return  # no test ran, and there is no lvm to ask
    if root is not None:
        _settled(attached_under(root))
    try:
        leaks = find_leaks(root)
    except LvmCommandNotFound:
        leaks = Leaks(loops=attached_under(root) if root is not None else [])
    except LvmError as exc:
        _report(session, f"LEAK CHECK could not run lvm: {exc}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        return
    if not leaks:
        return
    problems = clean_up(leaks)
    extra = f" (cleanup problems: {'; '.join(problems)})" if problems else ""
    _report(session, f"LEAK CHECK FAILED: this session left {leaks.describe()}{extra}")
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _lvm_available() -> bool:
    try:
        _lvm().version(timeout=10)
    except LvmError:
        return False
    return True


def _report(session: pytest.Session, message: str) -> None:
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_sep("!", message, red=True, bold=True)
    else:
        print(message)
