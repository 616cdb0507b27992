"""LVM errors: exit code and stderr kept, classified by exit code AND message.

LVM's exit code 5 (ECMD_FAILED) is generic: it means "not found" only when the message says so.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from concurrent.futures import Future

#: Exit code lvm uses for almost every failure of a command that did run.
ECMD_FAILED = 5

_NOT_FOUND = re.compile(
    r"Volume group \"[^\"]*\" not found"
    r"|Failed to find logical volume"
    r"|Existing logical volume \"[^\"]*\" not found"
    r"|Failed to find physical volume"
)
_NO_SPACE = re.compile(
    r"insufficient free space|insufficient suitable allocatable extents", re.IGNORECASE
)
_ALREADY_EXISTS = re.compile(r"already exists", re.IGNORECASE)
_IN_USE = re.compile(r"\bin use\b|\bis open\b", re.IGNORECASE)


class LvmError(Exception):
    """An lvm command failed, or its output could not be understood.

    exit_code is None when the command did not finish (timeout) or could not be started.
    Unexpected output (bad JSON, missing fields) is an LvmError too: never read it as "absent".
    """

    def __init__(
        self,
        argv: Sequence[str],
        exit_code: int | None,
        stderr: str,
        message: str | None = None,
    ) -> None:
        self.argv = tuple(argv)
        self.exit_code = exit_code
        self.stderr = stderr
        self.message = message or describe(self.argv, exit_code, stderr)
        super().__init__(self.message)

    def is_not_found(self) -> bool:
        """True only for exit code 5 with a not-found message (VG, LV or PV)."""
        return self.exit_code == ECMD_FAILED and bool(_NOT_FOUND.search(self.stderr))

    def is_no_space(self) -> bool:
        return self.exit_code == ECMD_FAILED and bool(_NO_SPACE.search(self.stderr))

    def is_already_exists(self) -> bool:
        return self.exit_code == ECMD_FAILED and bool(_ALREADY_EXISTS.search(self.stderr))

    def is_in_use(self) -> bool:
        """LVM refused because the LV is open or mounted ("Logical volume x in use")."""
        return self.exit_code == ECMD_FAILED and bool(_IN_USE.search(self.stderr))


class LvmTimeout(LvmError):
    """The command did not finish in time. A report was killed; for a change see
    LvmStillRunning. Either way the state is UNKNOWN until the next look."""


class LvmStillRunning(LvmTimeout):
    """A state-changing command outlived its timeout and was left running (never killed: a kill
    between e.g. suspend and resume would leave the LV suspended). ``finished`` is a
    concurrent.futures.Future that completes when the command ends; whoever holds a lock for
    the object it changes should keep holding it until then."""

    def __init__(self, argv: Sequence[str], message: str, finished: Future[object]) -> None:
        super().__init__(argv, None, "", message=message)
        self.finished = finished


def still_running(exc: BaseException | None) -> LvmStillRunning | None:
    """The LvmStillRunning behind exc (itself, or its cause/context chain), if any."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, LvmStillRunning):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


class LvmCommandNotFound(LvmError):
    """The lvm executable (or the command prefix) does not exist on this host."""


class LvmOutputError(LvmError):
    """The command succeeded but its output is not what we expect (bad JSON, missing fields)."""


def describe(argv: Sequence[str], exit_code: int | None, stderr: str) -> str:
    """A one-line message: the (shortened) command, the exit code, the interesting stderr."""
    cmd = " ".join(argv[:8]) + (" ..." if len(argv) > 8 else "")
    detail = _interesting(stderr)
    if exit_code is None:
        return f"{cmd}: {detail}" if detail else cmd
    return f"{cmd} exited {exit_code}: {detail}" if detail else f"{cmd} exited {exit_code}"


def _interesting(stderr: str) -> str:
    """stderr without lvm's routine warnings, to keep messages short and to the point."""
    lines = [line.strip() for line in stderr.splitlines()]
    keep = [
        line
        for line in lines
        if line
        and not line.startswith("WARNING: Activation disabled")
        and not line.startswith("WARNING: Skipping zeroing")
        and "not zeroed" not in line
    ]
    return "; ".join(keep)[:2000]
