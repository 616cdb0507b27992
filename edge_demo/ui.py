"""Output for people: section headers, one line per step, details, progress and the summary.

Colour and a spinner when stdout is a terminal (and ``NO_COLOR`` is unset); plain ASCII text
with an occasional "still running" line otherwise (CI logs, pipes, the tests).
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TextIO

SPINNER = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"
PLAIN_PROGRESS_EVERY = 15.0  # seconds between "still running" lines when not a terminal
SPINNER_DELAY = 0.4  # a step shorter than this never shows a spinner (no flicker)


def format_seconds(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f}s"
    if seconds < 60:
        return f"{seconds:.0f}s"
    minutes, rest = divmod(int(round(seconds)), 60)
    return f"{minutes}m{rest:02d}s"


def format_bytes(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class Style:
    ok: str
    fail: str
    skip: str
    warn: str
    arrow: str
    rule: str


FANCY = Style(ok="✓", fail="✗", skip="–", warn="!", arrow="›", rule="━")
PLAIN = Style(ok="ok", fail="FAIL", skip="skip", warn="note", arrow="-", rule="=")


class Console:
    """Everything the demo prints goes through here (one lock: the spinner thread writes too)."""

    def __init__(self, out: TextIO | None = None, *, color: bool | None = None,
                 tty: bool | None = None) -> None:
        self.out = out or sys.stdout
        if tty is None:
            tty = bool(getattr(self.out, "isatty", lambda: False)())
        self.tty = tty
        if color is None:
            color = tty and "NO_COLOR" not in os.environ and os.environ.get("TERM") != "dumb"
        self.color = color
        encoding = (getattr(self.out, "encoding", "") or "").lower()
        self.style = FANCY if tty and "utf" in encoding else PLAIN
        self.width = min(shutil.get_terminal_size((100, 24)).columns, 110) if tty else 100
        self._lock = threading.RLock()
        self._status_line = ""  # the spinner line currently on screen (tty only)

    # --- colour ----------------------------------------------------------------------------

    def _c(self, code: str, text: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.color else text

    def green(self, text: str) -> str:
        return self._c("32", text)

    def red(self, text: str) -> str:
        return self._c("31", text)

    def yellow(self, text: str) -> str:
        return self._c("33", text)

    def bold(self, text: str) -> str:
        return self._c("1", text)

    def dim(self, text: str) -> str:
        return self._c("2", text)

    def cyan(self, text: str) -> str:
        return self._c("36", text)

    # --- writing ---------------------------------------------------------------------------

    def _clear_status(self) -> None:
        if self._status_line:
            self.out.write("\r\x1b[K")
            self._status_line = ""

    def line(self, text: str = "") -> None:
        with self._lock:
            self._clear_status()
            self.out.write(text + "\n")
            self.out.flush()

    def banner(self, title: str, subtitle: str = "") -> None:
        self.line(self.bold(title))
        if subtitle:
            self.line(self.dim(subtitle))

    def section(self, title: str) -> None:
        rule = self.style.rule * max(3, self.width - len(title) - 4)
        self.line()
        self.line(self.bold(self.cyan(f"{self.style.rule * 2} {title} ")) + self.dim(rule))

    def note(self, text: str) -> None:
        self.line(f"  {self.yellow(self.style.warn)} {text}")

    def detail(self, text: str) -> None:
        for part in text.splitlines() or [""]:
            self.line(self.dim("      " + part) if self.color else "      " + part)

    def result(self, status: str, title: str, note: str, seconds: float) -> None:
        mark = {"ok": self.green(self.style.ok), "failed": self.red(self.style.fail),
                "skipped": self.yellow(self.style.skip),
                "interrupted": self.red(self.style.fail)}[status]
        text = f"  {mark} {title}"
        if note:
            text += self.dim(" — ") + note if self.color else f" - {note}"
        timing = format_seconds(seconds)
        self.line(f"{text}  {self.dim(f'({timing})')}")

    # --- progress --------------------------------------------------------------------------

    @contextmanager
    def progress(self, label: str) -> Iterator[Progress]:
        """A spinner with elapsed seconds (terminal) or a line every 15 s (plain)."""
        progress = Progress(self, label)
        progress.start()
        try:
            yield progress
        finally:
            progress.stop()

    def _draw_status(self, text: str) -> None:
        with self._lock:
            self.out.write("\r\x1b[K" + text)
            self.out.flush()
            self._status_line = text

    # --- the summary -----------------------------------------------------------------------

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[str]],
              colour: Sequence[str] = ()) -> None:
        """A plain-text table; ``colour[i]`` names the colour of row i's result column."""
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
                  for i, h in enumerate(headers)]

        def fmt(cells: Sequence[str], paint: str = "") -> str:
            parts = []
            for i, cell in enumerate(cells):
                padded = cell.ljust(widths[i]) if i < len(cells) - 1 else cell.rjust(widths[i])
                if i == 1 and paint:
                    padded = getattr(self, paint)(padded)
                parts.append(padded)
            return "  " + "  ".join(parts)

        self.line(self.bold(fmt(headers)))
        self.line("  " + "  ".join("-" * w for w in widths))
        for index, row in enumerate(rows):
            self.line(fmt(row, colour[index] if index < len(colour) else ""))


class Progress:
    def __init__(self, console: Console, label: str) -> None:
        self.console = console
        self.label = label
        self.text = ""
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="progress", daemon=True)

    def update(self, text: str) -> None:
        self.text = text

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        if self.console.tty:
            with self.console._lock:
                self.console._clear_status()
                self.console.out.flush()

    def _run(self) -> None:
        console = self.console
        if console.tty:
            if self._stop.wait(SPINNER_DELAY):
                return
            frame = 0
            while not self._stop.is_set():
                elapsed = format_seconds(time.monotonic() - self.started)
                spin = SPINNER[frame % len(SPINNER)] if console.style is FANCY else "-\\|/"[
                    frame % 4]
                extra = f" · {self.text}" if self.text else ""
                room = console.width - len(self.label) - len(elapsed) - 6
                extra = extra[: max(room, 0)]
                console._draw_status(f"  {console.cyan(spin)} {self.label} "
                                     f"{console.dim(elapsed + extra)}")
                frame += 1
                self._stop.wait(0.1)
            return
        while not self._stop.wait(PLAIN_PROGRESS_EVERY):
            elapsed = format_seconds(time.monotonic() - self.started)
            extra = f": {self.text}" if self.text else ""
            console.line(f"    ... {self.label}, {elapsed}{extra}")


__all__ = ["Console", "Progress", "format_bytes", "format_seconds"]
