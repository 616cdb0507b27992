"""``python -m kernel_guest [options] {pytest|run|prepare} ...``

    pytest [PYTEST ARGS]   run ``python -m pytest -m kernel [ARGS]`` in the guest
                           (ARGS default to ``tests/kernel``); exits with pytest's status
    run -- CMD [ARGS]      run any command in the guest; exits with its status
    prepare                only download and build the kernel and initramfs (cached)

Runner options go before the sub-command; everything after it belongs to the guest command.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from kernel_guest import protocol
from kernel_guest.artifacts import (
    ArtifactError,
    Cache,
    GuestImage,
    PrepareReport,
    apt_lists_changed_at,
    default_cache_dir,
    find_packages,
)
from kernel_guest.modules import DEFAULT_MODULES, ModuleError
from kernel_guest.runner import (
    EXIT_UNAVAILABLE,
    QEMU,
    TIMINGS,
    GuestOptions,
    RunnerError,
    console_tail,
    qemu_missing_message,
    run_guest,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
COMMANDS = ("pytest", "run", "prepare")
DEFAULT_PYTEST_ARGS = ("tests/kernel",)
GUEST_JUNIT = f"{protocol.GUEST_SHARE}/junit.xml"


def parse_size(text: str) -> int:
    """``8G``, ``512M``, ``1048576`` -> bytes."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 8G, 512M)")
    power = " KMGT".index(match.group(2).upper() or " ")
    return int(match.group(1)) * 1024**power


def _env_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _default_python() -> Path:
    if sys.prefix != sys.base_prefix:
        return Path(sys.prefix) / "bin" / "python"
    return REPO_ROOT / ".venv" / "bin" / "python"


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    parser = argparse.ArgumentParser(
        prog="python -m kernel_guest",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=float(env("KERNEL_GUEST_TIMEOUT", "2700")),
        help="seconds for the whole guest run before qemu is killed "
        "(env KERNEL_GUEST_TIMEOUT; default %(default)s)",
    )
    parser.add_argument(
        "--disks",
        type=int,
        default=int(env("KERNEL_GUEST_DISKS", "2")),
        help="number of virtual disks, /dev/vda, /dev/vdb, ... "
        "(env KERNEL_GUEST_DISKS; default %(default)s)",
    )
    parser.add_argument(
        "--disk-size",
        type=parse_size,
        default=parse_size(env("KERNEL_GUEST_DISK_SIZE", "8G")),
        help="size of each sparse disk (env KERNEL_GUEST_DISK_SIZE; default 8G)",
    )
    parser.add_argument("--memory", type=int, default=2048, help="guest RAM in MiB")
    parser.add_argument("--cpus", type=int, default=2, help="guest CPUs")
    parser.add_argument(
        "--cpu-model",
        default=env("KERNEL_GUEST_CPU_MODEL", "max"),
        help="qemu -cpu model under TCG (env KERNEL_GUEST_CPU_MODEL; default %(default)s)",
    )
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=Path(env("KERNEL_GUEST_RESULTS", str(REPO_ROOT / "test-results" / "kernel"))),
        help="where console.log, junit.xml and timings.json land (env KERNEL_GUEST_RESULTS)",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=default_cache_dir(),
        help="download/build cache (env KERNEL_GUEST_CACHE; default %(default)s)",
    )
    parser.add_argument(
        "--kernel-package",
        default=env("KERNEL_GUEST_KERNEL_PACKAGE") or None,
        help="Debian kernel package, e.g. linux-image-6.1.0-56-amd64 "
        "(default: what linux-image-amd64 depends on)",
    )
    parser.add_argument(
        "--module",
        action="append",
        default=[],
        metavar="NAME",
        help="load this kernel module too (repeatable; dependencies are added)",
    )
    parser.add_argument(
        "--env",
        action="append",
        type=_env_pair,
        default=[],
        metavar="KEY=VALUE",
        help="set this variable for the guest command (repeatable)",
    )
    parser.add_argument(
        "--python", type=Path, default=_default_python(), help="the venv interpreter for pytest"
    )
    parser.add_argument(
        "--kernel-messages", action="store_true", help="boot without 'quiet' (debugging)"
    )
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="do not echo the guest console while it runs (it is still in console.log)",
    )
    return parser


def split_command(argv: Sequence[str]) -> tuple[list[str], str | None, list[str]]:
    """(runner options, sub-command, the sub-command's own arguments)."""
    for index, word in enumerate(argv):
        if word in COMMANDS:
            return list(argv[:index]), word, list(argv[index + 1 :])
    return list(argv), None, []


def prepare(ns: argparse.Namespace) -> tuple[GuestImage, PrepareReport]:
    """The kernel apt offers now (asked only when the package lists changed since the last
    run), downloaded and built if not cached yet."""
    started = time.monotonic()
    cache = Cache(ns.cache_dir)
    modules = [*DEFAULT_MODULES, *ns.module]
    chosen = None if ns.kernel_package else cache.remembered(newer_than=apt_lists_changed_at())
    if chosen is None:
        try:
            chosen = find_packages(ns.kernel_package)
        except ArtifactError as exc:
            chosen = None if ns.kernel_package else cache.remembered()
            if chosen is None:
                raise
            print(f"kernel-guest: {exc}; using the cached {chosen[0].name}={chosen[0].version}")
        else:
            if not ns.kernel_package:
                cache.remember(*chosen)
    image, report = cache.prepare(*chosen, modules)
    report.seconds = time.monotonic() - started
    return image, report


def guest_argv(command: str, args: list[str], python: Path) -> list[str]:
    if command == "pytest":
        return [
            str(python),
            "-m",
            "pytest",
            "-m",
            "kernel",
            f"--junitxml={GUEST_JUNIT}",
            *(args or DEFAULT_PYTEST_ARGS),
        ]
    if args and args[0] == "--":
        args = args[1:]
    if not args:
        raise SystemExit("kernel-guest: run needs a command: python -m kernel_guest run -- CMD")
    return args


def _exit_on_signal(signum: int, _frame: object) -> None:
    # An exception, not an abrupt exit: qemu runs in its own session and is
    # only killed by the cleanup code this unwinds through (e.g. under `timeout 900 ...`).
    raise SystemExit(128 + signum)


def entry() -> int:
    """The command-line entry point: ``main`` with SIGTERM/SIGHUP turned into a clean exit."""
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _exit_on_signal)
    return main()


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    options_part, command, rest = split_command(words)
    parser = build_parser()
    ns = parser.parse_args(options_part)
    if command is None:
        parser.print_help()
        return 2

    cwd = Path.cwd()
    if command != "prepare":
        if shutil.which(QEMU) is None:
            print(f"kernel-guest: {qemu_missing_message()}", file=sys.stderr)
            return EXIT_UNAVAILABLE
        if command == "pytest" and not ns.python.exists():
            print(f"kernel-guest: no interpreter at {ns.python} (run make setup)", file=sys.stderr)
            return EXIT_UNAVAILABLE

    try:
        image, report = prepare(ns)
    except (ArtifactError, ModuleError) as exc:
        print(f"kernel-guest: cannot prepare the guest: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    what = ", ".join(report.downloaded + report.built) or "all cached"
    print(
        f"kernel-guest: {image.kernel_package.name}={image.kernel_package.version} "
        f"({image.release}); prepared in {report.seconds:.1f}s ({what})",
        flush=True,
    )
    if command == "prepare":
        print(f"kernel-guest: vmlinux {image.vmlinux}\nkernel-guest: initramfs {image.initramfs}")
        return 0

    options = GuestOptions(
        timeout=ns.timeout,
        disks=ns.disks,
        disk_size=ns.disk_size,
        memory_mb=ns.memory,
        cpus=ns.cpus,
        cpu_model=ns.cpu_model,
        results_dir=ns.results_dir,
        cwd=cwd,
        env=dict(ns.env),
        kernel_messages=ns.kernel_messages,
        stream=not ns.quiet,
    )
    started = time.monotonic()
    try:
        result = run_guest(image, guest_argv(command, rest, ns.python), options, ns.python)
    except RunnerError as exc:
        print(f"kernel-guest: {exc}", file=sys.stderr)
        return exc.exit_code
    result.timings["prepare_s"] = round(report.seconds, 2)
    (result.results_dir / TIMINGS).write_text(json.dumps(result.timings, indent=2) + "\n")
    sys.stdout.flush()

    t = result.timings
    parts = [f"boot to job {t['boot_to_job_s']:.1f}s"] if "boot_to_job_s" in t else []
    if "job_s" in t:
        parts.append(f"job {t['job_s']:.1f}s")
    parts.append(f"total {time.monotonic() - started:.1f}s")
    parts.append(f"prepare {report.seconds:.1f}s")
    failed = result.exit_code != 0
    if result.message or (failed and not options.stream):
        print(f"---- guest console (last {options.tail_lines} lines) ----", file=sys.stderr)
        print(console_tail(result.console_log, options.tail_lines), file=sys.stderr)
        print("---- end of guest console ----", file=sys.stderr)
    if result.message:
        print(f"kernel-guest: {result.message}", file=sys.stderr)
    print(
        f"kernel-guest: guest exit status {result.exit_code}; {', '.join(parts)}",
        file=sys.stderr if failed else sys.stdout,
    )
    print(f"kernel-guest: console log and reports in {result.results_dir}")
    return result.exit_code
