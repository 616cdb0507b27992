"""The project's commands as a user runs them: separate processes, logs in files.

One-shot commands go through ``edge_common.commands.run`` (argument list, timeout). Services
(csi-lvm, kms-plugin serve, the fake KMS, the qemu guest runner) are long-running, so they are
started here with ``Popen`` in a session of their own, their stdout and stderr in a log file,
and stopped with SIGTERM (SIGKILL after a grace period) to their whole process group.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from edge_common.commands import CommandError, CommandResult, run


class DemoError(Exception):
    """A step failed; ``logs`` are the files that tell why."""

    def __init__(self, message: str, logs: Sequence[Path] = ()) -> None:
        super().__init__(message)
        self.logs = list(logs)


def tool(name: str, module: str) -> list[str]:
    """How to start one of the project's commands: the console script installed beside this
    interpreter (``.venv/bin/csi-lvm``), else ``python -m <module>``."""
    script = Path(sys.executable).parent / name
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", module]


def run_logged(argv: Sequence[str], log: Path, *, timeout: float,
               env: Mapping[str, str] | None = None, check: bool = True) -> CommandResult:
    """Run a one-shot command; append its command line, stdout and stderr to ``log``."""
    result = run(argv, timeout=timeout, check=False, env=_env(env))
    with open(log, "ab") as handle:
        handle.write(("$ " + " ".join(argv) + f"\n[exit {result.returncode}]\n").encode())
        handle.write(result.stdout)
        handle.write(result.stderr)
        handle.write(b"\n")
    if check and result.returncode != 0:
        raise CommandError(result)
    return result


def _env(extra: Mapping[str, str] | None) -> dict[str, str]:
    env = {"PYTHONUNBUFFERED": "1"}
    env.update(extra or {})
    return env


class ServiceProcess:
    """A long-running command with its output in ``log_path``."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path,
                 env: Mapping[str, str] | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ServiceProcess:
        full_env = dict(os.environ)
        full_env.update(_env(self.env))
        with open(self.log_path, "ab") as log:
            log.write(("$ " + " ".join(self.argv) + "\n").encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=full_env, start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 12) -> str:
        return "\n".join(self.log_text().rstrip("\n").splitlines()[-lines:])

    def wait_for(self, ready: Callable[[], bool], *, timeout: float, what: str,
                 interval: float = 0.05) -> None:
        """Poll ``ready()`` until true; fail early if the process exits."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if ready():
                    return
            except Exception:  # noqa: S110 - not ready yet (socket not there, refused...)
                pass
            if not self.running:
                code = self.proc.returncode if self.proc else None
                raise DemoError(f"{self.name} exited (status {code}) before {what}:\n"
                                f"{self.log_tail()}", [self.log_path])
            if time.monotonic() > deadline:
                raise DemoError(f"{self.name}: no {what} within {timeout:.0f}s", [self.log_path])
            time.sleep(interval)

    def send_signal(self, signum: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signum)

    def stop(self, grace: float = 10.0, signum: int = signal.SIGTERM) -> int | None:
        """Stop the process group: ``signum``, then SIGKILL after ``grace`` seconds."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.send_signal(signum)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.send_signal(signal.SIGKILL)
                self.proc.wait(timeout=10)
        return self.proc.returncode


__all__ = ["DemoError", "ServiceProcess", "run_logged", "tool"]
