"""Run named steps: time them, show them, record them for the summary.

    runner = Runner(console)
    with runner.step("CreateVolume") as step:
        volume = client.create_volume(...)
        step.note = f"LV {volume.volume_id}"
        step.detail("capacity 64 MiB")

A failing step is shown with its error (and the log files that say more), recorded, and ends
its part of the demo (``StepFailed``); ``Interrupted`` (Ctrl-C, SIGTERM) passes through.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc

from edge_common.commands import CommandError, CommandNotFound, CommandTimeout
from edge_demo.cleanup import Interrupted
from edge_demo.procs import DemoError
from edge_demo.results import FAILED, INTERRUPTED, OK, SKIPPED, StepResult
from edge_demo.ui import Console, Progress


class StepFailed(Exception):
    def __init__(self, result: StepResult) -> None:
        super().__init__(f"{result.title}: {result.error}")
        self.result = result


class StepContext:
    def __init__(self, result: StepResult, progress: Progress | None) -> None:
        self.result = result
        self._progress = progress

    @property
    def note(self) -> str:
        return self.result.note

    @note.setter
    def note(self, text: str) -> None:
        self.result.note = text

    def detail(self, text: str) -> None:
        self.result.details.extend(text.splitlines() or [""])

    def progress(self, text: str) -> None:
        if self._progress is not None:
            self._progress.update(text)

    def log(self, path: Path | str) -> None:
        if str(path) not in self.result.logs:
            self.result.logs.append(str(path))


def describe_error(exc: BaseException) -> str:
    if isinstance(exc, grpc.RpcError):
        code = exc.code() if hasattr(exc, "code") else None
        details = exc.details() if hasattr(exc, "details") else ""
        return f"{code.name if code else 'RPC error'}: {details}"
    if isinstance(exc, CommandError):
        return str(exc)
    if isinstance(exc, DemoError | CommandTimeout | CommandNotFound):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


class Runner:
    def __init__(self, console: Console, *, announce: bool = False) -> None:
        self.console = console
        self.announce = announce  # print a line when a step starts (the guest's console)
        self.results: list[StepResult] = []
        self.part = ""

    @contextmanager
    def step(self, title: str) -> Iterator[StepContext]:
        result = StepResult(title, part=self.part)
        started = time.monotonic()
        if self.announce:
            self.console.line(f"  > {title} ...")
        with self.console.progress(title) as progress:
            ctx = StepContext(result, progress)
            try:
                yield ctx
            except Interrupted:
                result.status = INTERRUPTED
                result.error = "interrupted"
                raise
            except StepFailed:
                raise
            except Exception as exc:
                result.status = FAILED
                result.error = describe_error(exc)
                if isinstance(exc, DemoError):
                    for log in exc.logs:
                        ctx.log(log)
            finally:
                result.seconds = time.monotonic() - started
                self.results.append(result)
        self.show(result)
        if result.status == FAILED:
            raise StepFailed(result)

    def show(self, result: StepResult) -> None:
        status = result.status if result.status in (OK, FAILED, SKIPPED) else INTERRUPTED
        self.console.result(status, result.title, result.note, result.seconds)
        for line in result.details:
            self.console.detail(line)
        if result.error and result.status != INTERRUPTED:
            for line in result.error.splitlines():
                self.console.line("      " + self.console.red(line))
        if result.status != OK and result.logs:
            for log in result.logs:
                self.console.line("      " + self.console.yellow(f"log: {log}"))

    def record(self, result: StepResult, *, show: bool = True) -> None:
        result.part = result.part or self.part
        self.results.append(result)
        if show:
            self.show(result)

    def skip(self, title: str, reason: str) -> None:
        self.record(StepResult(title, SKIPPED, 0.0, note=reason))

    @property
    def failed(self) -> bool:
        return any(r.status in (FAILED, INTERRUPTED) for r in self.results)


__all__ = ["Runner", "StepContext", "StepFailed", "describe_error"]
