"""Run external commands safely: argument lists, a timeout, the process group killed on expiry
(or, for a command that must never be cut short, left to finish in the background)."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass


@dataclass(frozen=True)
class CommandResult:
    argv: tuple[str, ...]
    returncode: int
    stdout: bytes
    stderr: bytes

    @property
    def stderr_text(self) -> str:
        return self.stderr.decode("utf-8", "replace").strip()

    @property
    def stdout_text(self) -> str:
        return self.stdout.decode("utf-8", "replace")


class CommandError(Exception):
    """The command ran and exited non-zero."""

    def __init__(self, result: CommandResult) -> None:
        self.result = result
        detail = result.stderr_text or result.stdout_text.strip()
        super().__init__(f"{result.argv[0]} exited {result.returncode}: {detail[:2000]}")

    @property
    def returncode(self) -> int:
        return self.result.returncode


class CommandTimeout(Exception):
    """The command did not finish in time and was killed."""

    def __init__(self, argv: Sequence[str], timeout: float) -> None:
        self.argv = tuple(argv)
        self.timeout = timeout
        super().__init__(f"{argv[0]} did not finish within {timeout:.1f}s and was killed")


class CommandStillRunning(CommandTimeout):
    """The command did not finish in time and was NOT killed: it keeps running in the
    background (killing it midway could leave half-done state). ``finished`` completes with its
    CommandResult (whatever the exit code) when it ends."""

    def __init__(self, argv: Sequence[str], timeout: float,
                 finished: Future[CommandResult]) -> None:
        super().__init__(argv, timeout)
        self.finished = finished
        self.args = (f"{argv[0]} did not finish within {timeout:.1f}s; left running to "
                     "completion in the background",)


class CommandNotFound(Exception):
    """The executable does not exist on this host."""

    def __init__(self, argv: Sequence[str]) -> None:
        self.argv = tuple(argv)
        super().__init__(f"command not found: {argv[0]}")


def run(
    argv: Sequence[str],
    *,
    timeout: float,
    input: bytes | None = None,
    check: bool = True,
    env: Mapping[str, str] | None = None,
    kill_on_timeout: bool = True,
) -> CommandResult:
    """Run argv (never through a shell) and capture its output.

    The child gets its own session so that a timeout kills it and everything it started. With
    ``kill_on_timeout=False`` a timeout (or an interruption of the caller) never kills it:
    CommandStillRunning is raised and a background thread reaps the command when it ends.
    """
    if not argv:
        raise ValueError("empty command")
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    try:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=full_env,
            start_new_session=True,
        )
    except FileNotFoundError as exc:
        raise CommandNotFound(argv) from exc
    try:
        out, err = proc.communicate(input=input, timeout=timeout)
    except subprocess.TimeoutExpired:
        if not kill_on_timeout:
            raise CommandStillRunning(argv, timeout, _reap_later(proc, argv)) from None
        _kill_group(proc)
        proc.communicate()
        raise CommandTimeout(argv, timeout) from None
    except BaseException:
        if not kill_on_timeout:
            _reap_later(proc, argv)
            raise
        _kill_group(proc)
        proc.communicate()
        raise
    result = CommandResult(tuple(argv), proc.returncode, out, err)
    if check and result.returncode != 0:
        raise CommandError(result)
    return result


def _reap_later(proc: subprocess.Popen[bytes], argv: Sequence[str]) -> Future[CommandResult]:
    """Collect the output and exit status of a command left running, in a daemon thread."""
    finished: Future[CommandResult] = Future()

    def reap() -> None:
        try:
            out, err = proc.communicate()
            finished.set_result(CommandResult(tuple(argv), proc.returncode, out, err))
        except BaseException as exc:  # noqa: BLE001 - the waiter must always hear the end
            finished.set_exception(exc)

    threading.Thread(target=reap, name=f"reap-{proc.pid}", daemon=True).start()
    return finished


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
