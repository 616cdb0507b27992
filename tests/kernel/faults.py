"""Fault injection INSIDE one LVM command, for the real-kernel suite (issue 11).

The driver runs with ``lvm_command = [nsenter --mount --ipc ..., sh, tests/kernel/lvm_fault.sh]``
(deploy/'s namespaces; udev sync is on in the guest): every lvm call runs as usual, except
one armed call, which runs under ``strace`` with an action injected at its Nth ioctl (a
device-mapper call: LVM talks to the kernel only through them once its metadata is written).
N is measured, not guessed: ``calibrate`` runs the same kind of command on a scratch LV
under strace and finds the ioctl of interest by its decoded name and flags, e.g.

- the new LV's ``DM_DEV_CREATE``: lvcreate has committed its metadata (tags included) and
  has neither activated nor wiped the LV yet;
- the ioctl after lvextend's ``DM_DEV_SUSPEND``: the LV is suspended, the resume is next.

Actions: ``error=EINTR:signal=KILL`` (the ioctl never runs, lvm dies there: a container kill,
power loss) or ``delay_enter=<us>`` (lvm stalls there: a command slower than any timeout).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from edge_common.lvm import Lvm

SCRIPT = Path(__file__).resolve().parent / "lvm_fault.sh"
KILL = "error=EINTR:signal=KILL"
_IOCTL = re.compile(r"^\d+\s+ioctl\(")


def host_namespaces(*kinds: str) -> list[str]:
    """``nsenter`` into this process's namespaces - the guest's "host" - as deploy/ enters
    /proc/1's (``--mount`` and ``--ipc``). In the guest pid 1 is the initramfs' init, chrooted
    away from the real root, hence --root/--wd: they land where this process lives."""
    host = f"/proc/{os.getpid()}"
    return ["nsenter", *(f"--{kind}={host}/ns/{'mnt' if kind == 'mount' else kind}"
                         for kind in kinds), f"--root={host}/root", f"--wd={host}/cwd", "--"]


def stall(seconds: float) -> str:
    return f"delay_enter={int(seconds * 1_000_000)}"


def dm_call(line: str, request: str, dm_name: str) -> bool:
    """Is this strace line the device-mapper ioctl ``request`` on device ``dm_name``?"""
    return request in line and f'name="{dm_name}"' in line


def suspends(line: str, dm_name: str) -> bool:
    """A DM_DEV_SUSPEND that suspends (its input flags carry DM_SUSPEND_FLAG), not a resume."""
    return dm_call(line, "DM_DEV_SUSPEND", dm_name) and \
        "DM_SUSPEND_FLAG" in line.split(" => ")[0]


@dataclass
class LvmFaults:
    directory: Path

    def __post_init__(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)

    @property
    def command(self) -> list[str]:
        """The driver's lvm prefix: deploy/'s namespaces (mount + IPC), then the fault script."""
        return [*host_namespaces("mount", "ipc"), "sh", str(SCRIPT)]

    @property
    def env(self) -> dict[str, str]:
        return {"LVM_FAULT_DIR": str(self.directory)}

    def calibrate(self, lvm: Lvm, run: Callable[[Lvm], object],
                  match: Callable[[str], bool]) -> int:
        """The 1-based index, among lvm's ioctls, of the first one ``match`` accepts, when
        ``run`` runs its command through ``lvm`` under strace."""
        trace = self.directory / "calibration"
        trace.unlink(missing_ok=True)
        traced = Lvm(replace(lvm.settings, command=(
            "strace", "-f", "-qq", "-o", str(trace), "-e", "trace=ioctl",
            *lvm.settings.command)))
        run(traced)
        ioctls = [line for line in trace.read_text().splitlines()
                  if _IOCTL.match(line) and "resumed>" not in line]
        for index, line in enumerate(ioctls, 1):
            if match(line):
                return index
        raise AssertionError("calibration: no matching ioctl among:\n" + "\n".join(ioctls))

    def arm(self, subcommand: str, when: int, actions: str) -> None:
        for name in ("claimed", "started", "trace"):
            (self.directory / name).unlink(missing_ok=True)
        (self.directory / "armed").write_text(f"{subcommand} {when} {actions}\n")

    @property
    def fired(self) -> bool:
        return (self.directory / "claimed").exists()

    def pid(self, timeout: float = 60.0) -> int:
        """The pid of the armed call (strace, with lvm as its child)."""
        path = self.directory / "started"
        deadline = time.monotonic() + timeout
        while not path.exists():
            assert time.monotonic() < deadline, "the armed lvm call was never made"
            time.sleep(0.05)
        return int(path.read_text())

    def calls(self) -> list[str]:
        """The sub-command of every lvm call made through the prefix so far, in order."""
        path = self.directory / "calls"
        return path.read_text().split() if path.exists() else []

    def trace(self) -> str:
        path = self.directory / "trace"
        return path.read_text() if path.exists() else ""

    def killed(self) -> bool:
        return "+++ killed by SIGKILL +++" in self.trace()


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_gone(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while alive(pid):
        assert time.monotonic() < deadline, f"process {pid} still running after {timeout}s"
        time.sleep(0.2)

