"""``python -m edge_demo`` (``make demo``): the three services doing their job on this machine.

1. node-resource-manager (offline mode) builds a volume group from loop disks and refuses a
   disk that holds a filesystem;
2. csi-lvm serves one PVC's life as external-provisioner and kubelet would drive it (the steps
   that need a live LV run in a qemu guest when this kernel lacks device-mapper);
3. kms-plugin encrypts Secrets as kube-apiserver stores them, with a local keyring and with AWS
   KMS (the bundled fake): key rotation, ``inspect``, and the KMS going down;
4. a summary table; everything is cleaned up, also on Ctrl-C, SIGTERM and failures.

Needs root (loop devices, LVM, mounts). Exit status: 0 every step passed, 1 a step failed,
2 cannot run here, 130/143 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from edge_common.commands import run
from edge_common.loopdisk import attached_under
from edge_common.lvm import Lvm
from edge_common.version import VERSION
from edge_demo import csi, kms, storage
from edge_demo.cleanup import (
    Cleanup,
    Interrupted,
    signals_deferred,
    signals_ignored,
    signals_raise,
)
from edge_demo.context import Context, Options, default_vg_name
from edge_demo.results import FAILED, INTERRUPTED, OK, SKIPPED, StepResult
from edge_demo.steps import Runner, StepFailed, describe_error
from edge_demo.ui import Console, format_seconds

EXIT_OK, EXIT_FAILED, EXIT_CANNOT_RUN = 0, 1, 2
REQUIRED_COMMANDS = ("losetup", "lvm", "mkfs.ext4", "blkid", "wipefs", "mount", "umount")
PARTS: tuple[tuple[str, Callable[[Context], None]], ...] = (
    ("1. Disks and a volume group: node-resource-manager", storage.run_part),
    ("2. One PVC's life: csi-lvm, called as Kubernetes calls it", csi.run_part),
    ("3. Secrets encrypted at rest: kms-plugin (KMS v2)", kms.run_part),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m edge_demo", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true",
                        help="shorter key-refresh and health intervals and fewer Secrets")
    parser.add_argument("--skip-kernel", action="store_true",
                        help="do not boot the real-kernel guest (the live-LV steps are "
                        "listed as skipped)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work directory (logs, topology, keyring, etcd values)")
    parser.add_argument("--workdir-parent", type=Path, metavar="DIR",
                        help="create the work directory here (default: the system temp dir)")
    parser.add_argument("--vg-name", default=None, metavar="NAME",
                        help="name of the volume group the demo builds (default: "
                        "edgedemo-<random>)")
    parser.add_argument("--summary-json", type=Path, metavar="FILE",
                        help="also write the summary as JSON (used by the tests)")
    parser.add_argument("--guest-timeout", type=float, default=600.0, metavar="SECONDS",
                        help="limit for the whole qemu guest run (default %(default)s)")
    colour = parser.add_mutually_exclusive_group()
    colour.add_argument("--color", dest="color", action="store_true", default=None,
                        help="colour even when stdout is not a terminal")
    colour.add_argument("--no-color", dest="color", action="store_false",
                        help="no colour (also: NO_COLOR=1)")
    parser.add_argument("--version", action="version", version=f"edge-demo {VERSION}")
    return parser


def preflight() -> list[str]:
    problems = []
    if os.geteuid() != 0:
        problems.append("run as root: the demo creates loop devices, LVM volumes and mounts")
    missing = [c for c in REQUIRED_COMMANDS if shutil.which(c) is None]
    if missing:
        problems.append(f"missing commands: {', '.join(missing)} "
                        "(bash scripts/setup-host.sh installs them)")
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    options = Options(
        fast=ns.fast, skip_kernel=ns.skip_kernel, keep=ns.keep,
        workdir_parent=ns.workdir_parent, vg_name=ns.vg_name or default_vg_name(),
        summary_json=ns.summary_json, guest_timeout=ns.guest_timeout, color=ns.color,
    )
    console = Console(color=options.color)
    problems = preflight()
    if problems:
        for problem in problems:
            console.line(console.red(f"edge-demo: {problem}"))
        return EXIT_CANNOT_RUN
    return Demo(options, console).run()


def detach_strays(work: Path) -> None:
    """Safety net: a loop device still attached to a file in the work directory (an attach
    cut short) is ours; detach it."""
    for loop in attached_under(work):
        run(["losetup", "--detach", loop.device], timeout=30, check=False)


class Demo:
    def __init__(self, options: Options, console: Console) -> None:
        self.options = options
        self.console = console
        self.runner = Runner(console)
        self.cleanup = Cleanup()
        self.started = time.monotonic()
        self.keep_logs = options.keep

    def run(self) -> int:
        options, console = self.options, self.console
        parent = options.workdir_parent or Path(tempfile.gettempdir())
        parent.mkdir(parents=True, exist_ok=True)
        interrupted: Interrupted | None = None
        work: Path | None = None
        with signals_raise():
            try:
                with signals_deferred():
                    work = Path(tempfile.mkdtemp(prefix="edge-demo-", dir=parent))
                    self.cleanup.push(f"work directory {work}", lambda: self._remove_work(work))
                    self.cleanup.push("loop devices backed by files in the work directory",
                                      lambda: detach_strays(work))
                (work / "logs").mkdir()
                ctx = Context(options, console, self.runner, self.cleanup, work,
                              Lvm(Lvm.settings_for_this_kernel(timeout=120.0)))
                console.banner(
                    f"edge-node-services {VERSION}: demo on this machine, no cluster needed",
                    f"work directory {work} (service logs in {work / 'logs'})")
                for title, part in PARTS:
                    self.runner.part = title
                    console.section(title)
                    try:
                        part(ctx)
                    except StepFailed as exc:
                        self.runner.record(StepResult(
                            f"rest of part {title.split('.')[0]}", SKIPPED,
                            note=f"after the failure of: {exc.result.title}"), show=False)
                        console.note("skipping the rest of this part after the failure")
                    except Exception as exc:  # a bug between steps: report it, clean up
                        self.runner.record(StepResult(
                            f"part {title.split('.')[0]} (between steps)", FAILED,
                            error=describe_error(exc)))
            except Interrupted as exc:
                interrupted = exc
                with signals_ignored():
                    console.line()
                    console.line(console.red(f"Interrupted ({exc}): cleaning up."))
        if work is None:  # interrupted before anything was made
            return interrupted.exit_code if interrupted is not None else EXIT_FAILED
        self.finish(work, interrupted)
        if interrupted is not None:
            return interrupted.exit_code
        return EXIT_FAILED if self.runner.failed else EXIT_OK

    # --- the end ------------------------------------------------------------------------

    def finish(self, work: Path, interrupted: Interrupted | None) -> None:
        console = self.console
        console.section("Clean-up")
        self.keep_logs = self.options.keep or self.runner.failed or interrupted is not None
        started = time.monotonic()
        pending = self.cleanup.pending()
        with console.progress("Cleaning up"):
            report = self.cleanup.run()
        result = StepResult("Clean up everything the demo made", OK,
                            time.monotonic() - started, part="Clean-up")
        if report.failed:
            result.status = FAILED
            result.error = "\n".join(f"could not undo {w}: {why}" for w, why in report.failed)
        result.note = (f"{len(report.done)} of {len(pending)} undone: processes, sockets, "
                       "volumes, the VG and its PVs, loop disks, the work directory")
        self.runner.record(result)
        if self.keep_logs:
            console.line(console.yellow(f"  logs kept in {work / 'logs'}"))
        self.summary(interrupted)

    def _remove_work(self, work: Path) -> None:
        """The work directory; after a failure or an interruption its logs stay."""
        if self.keep_logs and not self.options.keep:
            for entry in work.iterdir():
                if entry.name != "logs":
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry)
                    else:
                        entry.unlink()
        elif not self.keep_logs:
            shutil.rmtree(work)

    def summary(self, interrupted: Interrupted | None) -> None:
        console = self.console
        total = time.monotonic() - self.started
        results = self.runner.results
        console.section("Summary")
        words = {OK: "ok", FAILED: "FAILED", SKIPPED: "skipped", INTERRUPTED: "interrupted"}
        paint = {OK: "green", FAILED: "red", SKIPPED: "yellow", INTERRUPTED: "red"}
        rows = []
        colours = []
        for r in results:
            word = words.get(r.status, r.status)
            if r.status == SKIPPED and r.note:
                word += f" ({r.note})" if len(r.note) < 28 else ""
            rows.append((r.title, word, format_seconds(r.seconds)))
            colours.append(paint.get(r.status, ""))
        console.table(("STEP", "RESULT", "TIME"), rows, colours)
        failed = [r for r in results if r.status in (FAILED, INTERRUPTED)]
        console.line()
        if interrupted is not None:
            verdict = console.red(f"interrupted after {format_seconds(total)}")
        elif failed:
            verdict = console.red(f"{len(failed)} step(s) failed ({format_seconds(total)})")
        else:
            skipped = sum(r.status == SKIPPED for r in results)
            extra = f", {skipped} skipped" if skipped else ""
            verdict = console.green(f"all {len(results) - skipped} steps passed{extra} in "
                                    f"{format_seconds(total)}")
        console.line(f"  {verdict}")
        for r in failed:
            for log in r.logs:
                console.line(console.yellow(f"  see {log}"))
        if self.options.summary_json is not None:
            data = {
                "exit_code": (interrupted.exit_code if interrupted is not None
                              else EXIT_FAILED if failed else EXIT_OK),
                "seconds": round(total, 2),
                "steps": [r.to_dict() for r in results],
            }
            self.options.summary_json.write_text(json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
