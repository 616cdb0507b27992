"""edge_common.commands.run: argv only, captured output, errors, timeouts killing the group."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from edge_common.commands import CommandError, CommandNotFound, CommandTimeout, run


def test_run_captures_stdout_stderr_and_exit_code() -> None:
    result = run(["sh", "-c", "echo out; echo err >&2"], timeout=30)
    assert result.returncode == 0
    assert result.stdout == b"out\n" and result.stderr_text == "err"
    assert result.argv == ("sh", "-c", "echo out; echo err >&2")


def test_arguments_are_never_interpreted_by_a_shell(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    result = run(["echo", f"; touch {marker}", "$(id)"], timeout=30)
    assert result.stdout_text == f"; touch {marker} $(id)\n"
    assert not marker.exists()


def test_nonzero_exit_raises_command_error_with_the_result() -> None:
    with pytest.raises(CommandError) as info:
        run(["sh", "-c", "echo why >&2; exit 3"], timeout=30)
    assert info.value.returncode == 3
    assert info.value.result.stderr_text == "why"
    assert "why" in str(info.value)


def test_check_false_returns_the_failed_result() -> None:
    result = run(["sh", "-c", "exit 4"], timeout=30, check=False)
    assert result.returncode == 4


def test_input_is_fed_to_stdin_and_env_is_added() -> None:
    result = run(
        ["sh", "-c", 'cat; printf %s "$EXTRA"'], timeout=30, input=b"in-", env={"EXTRA": "x"}
    )
    assert result.stdout == b"in-x"


def test_stdin_is_empty_when_no_input_is_given() -> None:
    assert run(["cat"], timeout=30).stdout == b""


def test_missing_executable_is_command_not_found() -> None:
    with pytest.raises(CommandNotFound):
        run(["/nonexistent/binary"], timeout=30)


def test_empty_argv_is_refused() -> None:
    with pytest.raises(ValueError):
        run([], timeout=30)


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1].startswith("Z")
    except FileNotFoundError:
        return True


def test_timeout_kills_the_command_and_everything_it_started(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    with pytest.raises(CommandTimeout) as info:
        run(["sh", "-c", f"sleep 60 & echo $! > {pidfile}; wait"], timeout=0.5)
    assert info.value.timeout == 0.5
    grandchild = int(pidfile.read_text())
    deadline = time.monotonic() + 10  # reaping is asynchronous; not a timing assertion
    while not _gone(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(grandchild)


def test_the_child_runs_in_its_own_session() -> None:
    out = run(["sh", "-c", "ps -o sid= -p $$"], timeout=30).stdout_text.strip()
    assert int(out) != os.getsid(0)
