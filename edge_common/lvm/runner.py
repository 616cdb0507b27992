"""The Lvm runner: every lvm invocation of the project goes through here.

One method = one lvm process. Argument lists only, a timeout on every command, JSON reports
in bytes. Only reports are killed on timeout: a command that changes state is never killed
(LvmStillRunning; it finishes in the background), because a kill between its steps (e.g.
between suspend and resume) leaves the device worse than any wait.

Changes never pass force flags; creation answers prompts with --yes only where a prompt is
about the new LV itself (lvcreate/lvremove), never for pvcreate/vgcreate/vgextend,
whose prompts ask whether to wipe a foreign signature: there, the non-interactive "no" is the
safe answer and the command fails.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

from edge_common.commands import (
    CommandError,
    CommandNotFound,
    CommandResult,
    CommandStillRunning,
    CommandTimeout,
    run,
)
from edge_common.lvm import report as rep
from edge_common.lvm.errors import (
    LvmCommandNotFound,
    LvmError,
    LvmStillRunning,
    LvmTimeout,
    describe,
)
from edge_common.lvm.records import LogicalVolume, LvmReport, PhysicalVolume, VolumeGroup
from edge_common.lvm.settings import LvmSettings

T = TypeVar("T")

#: Sub-commands that only read: the only ones a timeout may kill.
READ_ONLY_SUBCOMMANDS = frozenset({"fullreport", "vgs", "lvs", "pvs", "version", "segs"})


def _size(size_bytes: int) -> str:
    """A size argument in bytes, rounded UP to whole 512-byte sectors (lvm refuses others;
    it then rounds up to whole extents itself)."""
    if size_bytes <= 0:
        raise ValueError(f"size must be positive, got {size_bytes}")
    sectors = -(-int(size_bytes) // 512)
    return f"{sectors * 512}b"


def _check_name(kind: str, name: str) -> str:
    # Option-looking or path-looking names would change the meaning of the command line.
    if not name or name.startswith("-") or "/" in name or "\x00" in name:
        raise ValueError(f"invalid {kind} name: {name!r}")
    return name


def _check_tags(tags: Sequence[str]) -> tuple[str, ...]:
    if isinstance(tags, str):
        raise TypeError("tags must be a sequence of strings, not a string")
    for tag in tags:
        if not tag or tag.startswith("-") or "," in tag:
            raise ValueError(f"invalid tag: {tag!r}")
    return tuple(tags)


def _check_devices(devices: Sequence[str]) -> tuple[str, ...]:
    if isinstance(devices, str):
        raise TypeError("devices must be a sequence of paths, not a string")
    devices = tuple(devices)
    if not devices:
        raise ValueError("no devices given")
    for dev in devices:
        if not dev.startswith("/"):
            raise ValueError(f"device must be an absolute path: {dev!r}")
    return devices


class Lvm:
    """Runs lvm commands according to LvmSettings. Stateless and thread-safe."""

    def __init__(self, settings: LvmSettings | None = None) -> None:
        self.settings = settings or LvmSettings()

    @staticmethod
    def settings_for_this_kernel(**kw: object) -> LvmSettings:
        """LvmSettings(**kw), plus ``--driverloaded n`` when the kernel has no device-mapper."""
        return LvmSettings.for_this_kernel(**kw)

    # ---------------------------------------------------------------- running

    def argv(self, subcommand: str, args: Sequence[str]) -> list[str]:
        """The full argv for one lvm sub-command (exposed for logs, tests and benchmarks)."""
        s = self.settings
        argv = [*s.command, subcommand, *s.extra_args]
        if s.config:
            argv += ["--config", s.config]
        return argv + list(args)

    def command(self, subcommand: str, *args: str, timeout: float | None = None) -> CommandResult:
        """Run one lvm sub-command; LvmError on failure, LvmTimeout on timeout (a report is
        killed; any other sub-command is left running: LvmStillRunning).

        The escape hatch for what has no method (test rigs use it for vgremove/pvremove, which
        the services never run)."""
        argv = self.argv(subcommand, args)
        limit = self.settings.timeout if timeout is None else timeout
        read_only = subcommand in READ_ONLY_SUBCOMMANDS
        try:
            env = {"LVM_SUPPRESS_FD_WARNINGS": "1", **dict(self.settings.env)}
            return run(argv, timeout=limit, env=env, kill_on_timeout=read_only)
        except CommandStillRunning as exc:
            raise LvmStillRunning(
                argv, f"lvm {subcommand} still running after {limit:.1f}s; it is left to "
                "finish (a change is never killed midway)", exc.finished,  # type: ignore[arg-type]
            ) from None
        except CommandTimeout:
            raise LvmTimeout(
                argv, None, "", message=f"lvm {subcommand} killed after {limit:.1f}s: state unknown"
            ) from None
        except CommandNotFound:
            raise LvmCommandNotFound(
                argv, None, "", message=f"cannot run lvm: {argv[0]} not found"
            ) from None
        except CommandError as exc:
            code, stderr = exc.result.returncode, exc.result.stderr_text
            # The message shows what we asked lvm, without the prefix and extra arguments.
            shown = ["lvm", subcommand, *(a for a in args if a != "--")]
            raise LvmError(argv, code, stderr, message=describe(shown, code, stderr)) from None

    def _report(
        self, subcommand: str, args: Sequence[str], timeout: float | None
    ) -> tuple[list[str], bytes]:
        full = [*rep.REPORT_ARGS, *args]
        result = self.command(subcommand, *full, timeout=timeout)
        return list(result.argv), result.stdout

    # ---------------------------------------------------------------- reports

    def version(self, *, timeout: float | None = None) -> str:
        """The first line of ``lvm version`` (a cheap "does lvm answer?" probe)."""
        out = self.command("version", timeout=timeout).stdout_text.strip()
        return out.splitlines()[0].strip() if out else ""

    def report(self, vg_names: Sequence[str] = (), *, timeout: float | None = None) -> LvmReport:
        """VGs, LVs and PVs (orphan PVs included) from ONE ``lvm fullreport`` process."""
        args = [
            "--configreport", "vg", "-o", ",".join(rep.VG_FIELDS),
            "--configreport", "lv", "-o", ",".join(rep.LV_FIELDS),
            "--configreport", "seg", "-o", ",".join(rep.SEG_FIELDS),
            "--configreport", "pv", "-o", ",".join(rep.PV_FIELDS),
            "--configreport", "pvseg", "-o", "pvseg_start",
        ]  # fmt: skip
        argv, out = self._report("fullreport", [*args, "--", *vg_names], timeout)
        return rep.parse_full(out, argv)

    def vgs(self, names: Sequence[str] = (), *, timeout: float | None = None) -> list[VolumeGroup]:
        if isinstance(names, str):
            raise TypeError("names must be a sequence of VG names, not a string")
        names = [_check_name("VG", n) for n in names]
        argv, out = self._report("vgs", ["-o", ",".join(rep.VG_FIELDS), "--", *names], timeout)
        return rep.parse_vgs(rep.rows_of(rep.load_sections(out, argv), "vg"), argv)

    def lvs(
        self, vg: str | None = None, tag: str | None = None, *, timeout: float | None = None
    ) -> list[LogicalVolume]:
        """LVs (visible ones: not a pool's internal LVs), of one VG or all; only those carrying
        ``tag`` when given."""
        targets = [] if vg is None else [_check_name("VG", vg)]
        fields = ",".join((*rep.LV_FIELDS, *rep.SEG_FIELDS[1:]))
        argv, out = self._report("lvs", ["-o", fields, "--", *targets], timeout)
        lvs = rep.parse_lvs(rep.rows_of(rep.load_sections(out, argv), "lv"), None, argv)
        if tag is not None:
            lvs = [lv for lv in lvs if tag in lv.tags]
        return lvs

    def pvs(
        self, devices: Sequence[str] = (), *, timeout: float | None = None
    ) -> list[PhysicalVolume]:
        """All PVs, or those on ``devices`` (a device that is no PV is a not-found LvmError)."""
        devs = _check_devices(devices) if devices else ()
        argv, out = self._report("pvs", ["-o", ",".join(rep.PV_FIELDS), "--", *devs], timeout)
        return rep.parse_pvs(rep.rows_of(rep.load_sections(out, argv), "pv"), argv)

    def get_vg(self, name: str, *, timeout: float | None = None) -> VolumeGroup | None:
        """The VG, or None ONLY when lvm says it is not found."""
        try:
            found = self.vgs([name], timeout=timeout)
        except LvmError as exc:
            if exc.is_not_found():
                return None
            raise
        return self._one(found, name, lambda vg: vg.name == name)

    def get_lv(self, vg: str, name: str, *, timeout: float | None = None) -> LogicalVolume | None:
        """The LV, or None ONLY when lvm says it (or its VG) is not found."""
        target = f"{_check_name('VG', vg)}/{_check_name('LV', name)}"
        fields = ",".join((*rep.LV_FIELDS, *rep.SEG_FIELDS[1:]))
        try:
            argv, out = self._report("lvs", ["-o", fields, "--", target], timeout)
        except LvmError as exc:
            if exc.is_not_found():
                return None
            raise
        lvs = rep.parse_lvs(rep.rows_of(rep.load_sections(out, argv), "lv"), None, argv)
        return self._one(lvs, target, lambda lv: lv.vg_name == vg and lv.name == name)

    def _one(self, items: list[T], what: str, match: Callable[[T], bool]) -> T:
        hits = [item for item in items if match(item)]
        if len(hits) != 1:
            raise LvmError(
                [*self.settings.command], 0, "",
                message=f"lvm reported {len(hits)} entries for {what}, expected exactly 1",
            )  # fmt: skip
        return hits[0]

    # ---------------------------------------------------------------- changes: PVs and VGs

    def pvcreate(
        self, devices: Sequence[str], *, uuid: str | None = None, timeout: float | None = None
    ) -> None:
        """Never forced: a device with a foreign signature makes lvm ask, the answer is no,
        and the command fails leaving the device untouched. ``uuid``: the new PV's UUID,
        chosen by the caller (one device only), so that it can be recorded before it exists."""
        devs = _check_devices(devices)
        args: list[str] = []
        if uuid is not None:
            if len(devs) != 1 or not uuid or uuid.startswith("-"):
                raise ValueError("a PV UUID applies to exactly one device")
            args = ["--uuid", uuid, "--norestorefile"]
        self.command("pvcreate", *args, "--", *devs, timeout=timeout)

    def vgcreate(
        self,
        name: str,
        devices: Sequence[str],
        tags: Sequence[str] = (),
        *,
        timeout: float | None = None,
    ) -> None:
        args: list[str] = []
        for tag in _check_tags(tags):
            args += ["--addtag", tag]
        devs = _check_devices(devices)
        self.command("vgcreate", *args, "--", _check_name("VG", name), *devs, timeout=timeout)

    def vgextend(self, name: str, devices: Sequence[str], *, timeout: float | None = None) -> None:
        devs = _check_devices(devices)
        self.command("vgextend", "--", _check_name("VG", name), *devs, timeout=timeout)

    # ---------------------------------------------------------------- changes: LVs

    def _activation_args(self, activate: bool, zero: bool, wipe_signatures: bool) -> list[str]:
        # An inactive LV cannot be zeroed or wiped; lvm 2.03 even exits 0 WITHOUT creating the
        # LV when asked for "-an -Zy". So an inactive creation always says -Zn -Wn explicitly.
        if not activate or self.settings.activation_disabled:
            return ["--activate", "n", "--zero", "n", "--wipesignatures", "n"]
        return [
            "--activate", "y",
            "--zero", "y" if zero else "n",
            "--wipesignatures", "y" if wipe_signatures else "n",
        ]  # fmt: skip

    def lvcreate(
        self,
        vg: str,
        name: str,
        size_bytes: int,
        *,
        tags: Sequence[str] = (),
        stripes: int | None = None,
        stripe_size: int | None = None,
        thin_pool: str | None = None,
        activate: bool = True,
        zero: bool = True,
        wipe_signatures: bool = True,
        timeout: float | None = None,
    ) -> None:
        """Create a linear/striped LV of size_bytes (rounded up to extents by lvm), or a thin
        volume of virtual size size_bytes in ``thin_pool``.

        When activation is disabled (``--driverloaded n``) or ``activate=False`` the LV is
        created inactive and neither zeroed nor wiped (impossible without a device); whoever
        activates it later must not trust its first bytes."""
        args = ["--yes", "--name", _check_name("LV", name)]
        for tag in _check_tags(tags):
            args += ["--addtag", tag]
        if thin_pool is not None:
            if stripes is not None or stripe_size is not None:
                raise ValueError("stripes do not apply to a thin volume")
            args += ["--virtualsize", _size(size_bytes), "--thinpool", _check_name("LV", thin_pool)]
            # Thin volumes read zeroes until written (the pool zeroes provisioned blocks or
            # never returns unwritten data); wiping still clears a stale signature.
        else:
            args += ["--size", _size(size_bytes)]
            if stripes is not None:
                if stripes < 1:
                    raise ValueError(f"stripes must be >= 1, got {stripes}")
                args += ["--stripes", str(stripes)]
            if stripe_size is not None:
                if stripes is None:
                    raise ValueError("stripe_size needs stripes")
                args += ["--stripesize", _size(stripe_size)]
        activation = self._activation_args(activate, zero, wipe_signatures)
        if thin_pool is not None:
            # lvm refuses --zero for a thin volume ("supported only with thin pool creation"):
            # the pool's own zeroing decides what unwritten blocks read as.
            i = activation.index("--zero")
            del activation[i:i + 2]
        args += activation
        self.command("lvcreate", *args, "--", _check_name("VG", vg), timeout=timeout)

    def create_thin_pool(
        self,
        vg: str,
        name: str,
        size_bytes: int,
        *,
        metadata_size: int | None = None,
        tags: Sequence[str] = (),
        timeout: float | None = None,
    ) -> None:
        """A thin pool (needs device-mapper: the pool's metadata must be initialised)."""
        args = ["--yes", "--type", "thin-pool", "--name", _check_name("LV", name)]
        args += ["--size", _size(size_bytes)]
        if metadata_size is not None:
            args += ["--poolmetadatasize", _size(metadata_size)]
        for tag in _check_tags(tags):
            args += ["--addtag", tag]
        self.command("lvcreate", *args, "--", _check_name("VG", vg), timeout=timeout)

    def create_snapshot(
        self,
        vg: str,
        origin: str,
        name: str,
        *,
        size_bytes: int | None = None,
        tags: Sequence[str] = (),
        timeout: float | None = None,
    ) -> None:
        """A snapshot of vg/origin: thin (size_bytes None; the origin must be a thin volume)
        or thick copy-on-write with a COW area of size_bytes. A thin snapshot carries LVM's
        skip-activation flag: activate it with ``activate(..., ignore_skip=True)``."""
        args = ["--yes", "--snapshot", "--name", _check_name("LV", name)]
        if size_bytes is not None:
            args += ["--size", _size(size_bytes)]
        for tag in _check_tags(tags):
            args += ["--addtag", tag]
        target = f"{_check_name('VG', vg)}/{_check_name('LV', origin)}"
        self.command("lvcreate", *args, "--", target, timeout=timeout)

    def lvextend(
        self, vg: str, name: str, size_bytes: int, *, timeout: float | None = None
    ) -> None:
        """Grow the LV to the absolute size size_bytes (lvm fails if that is not larger)."""
        target = f"{_check_name('VG', vg)}/{_check_name('LV', name)}"
        self.command("lvextend", "--size", _size(size_bytes), "--", target, timeout=timeout)

    def extend_thin_pool(
        self,
        vg: str,
        name: str,
        size_bytes: int,
        *,
        metadata_size: int | None = None,
        timeout: float | None = None,
    ) -> None:
        """Grow thin pool vg/name's data to the absolute size size_bytes and, when given, its
        metadata LV to the absolute size metadata_size, in ONE lvextend (lvm 2.03 accepts
        ``--size`` with ``--poolmetadatasize`` for a thin pool and grows the metadata spare
        with the metadata). lvm fails if a size is not larger than the current one: pass
        metadata_size only when the metadata must grow."""
        target = f"{_check_name('VG', vg)}/{_check_name('LV', name)}"
        args = ["--size", _size(size_bytes)]
        if metadata_size is not None:
            args += ["--poolmetadatasize", _size(metadata_size)]
        self.command("lvextend", *args, "--", target, timeout=timeout)

    def lvremove(self, vg: str, name: str, *, timeout: float | None = None) -> None:
        """Remove the LV (--yes answers "remove active LV?"; an open LV still refuses)."""
        target = f"{_check_name('VG', vg)}/{_check_name('LV', name)}"
        self.command("lvremove", "--yes", "--", target, timeout=timeout)

    def lvremove_if_tagged(
        self, vg: str, name: str, tags: Sequence[str], *, timeout: float | None = None
    ) -> bool:
        """Remove vg/name in ONE lvremove only if it carries every tag in ``tags`` and is no
        thick snapshot origin (``--yes`` would take its snapshots along); True when it was
        removed, False when nothing matched (absent, other tags, an origin) or lvm's answer was
        not the removal message (the caller looks, as it would have without this)."""
        checked = _check_tags(tags)
        if not checked:
            raise ValueError("lvremove_if_tagged needs at least one tag")
        for tag in checked:
            if '"' in tag or "\\" in tag:
                raise ValueError(f"invalid tag: {tag!r}")
        lv = _check_name("LV", name)
        if '"' in lv:
            raise ValueError(f"invalid LV name: {lv!r}")
        selection = " && ".join([
            f'lv_name="{lv}"',
            *(f'lv_tags="{tag}"' for tag in checked),
            "!(lv_role=thickorigin)",
            'lv_attr!~"^o"',
        ])  # fmt: skip
        result = self.command(
            "lvremove", "--yes", "--select", selection, "--", _check_name("VG", vg),
            timeout=timeout,
        )  # fmt: skip
        return f'Logical volume "{lv}" successfully removed' in result.stdout_text

    def lvrename(self, vg: str, old: str, new: str, *, timeout: float | None = None) -> None:
        self.command(
            "lvrename", "--",
            _check_name("VG", vg), _check_name("LV", old), _check_name("LV", new),
            timeout=timeout,
        )  # fmt: skip

    def addtag(
        self, vg: str, name: str, tags: Sequence[str], *, timeout: float | None = None
    ) -> None:
        self._tags("--addtag", vg, name, tags, timeout)

    def deltag(
        self, vg: str, name: str, tags: Sequence[str], *, timeout: float | None = None
    ) -> None:
        self._tags("--deltag", vg, name, tags, timeout)

    def deltag_by_uuid(
        self, vgs: Sequence[str], tag: str, uuids: Sequence[str], *,
        timeout: float | None = None,
    ) -> None:
        """Remove ``tag`` from every LV of ``vgs`` whose lv_uuid is in ``uuids`` and that still
        carries it, in ONE lvchange (many LVs, one process). UUIDs, not names: an LV removed and
        recreated under the same name meanwhile is another LV and is left alone; one that is
        gone simply matches nothing."""
        (checked,) = _check_tags([tag])
        if '"' in checked or "\\" in checked:
            raise ValueError(f"invalid tag: {checked!r}")
        wanted = list(dict.fromkeys(uuids))
        for uuid in wanted:
            if not uuid or not all(c.isalnum() or c == "-" for c in uuid):
                raise ValueError(f"invalid LV UUID: {uuid!r}")
        names = [_check_name("VG", vg) for vg in dict.fromkeys(vgs)]
        if not wanted or not names:
            return
        selection = f'lv_tags="{checked}" && (' + " || ".join(
            f'lv_uuid="{uuid}"' for uuid in wanted) + ")"
        self.command("lvchange", "--deltag", checked, "--select", selection, "--", *names,
                     timeout=timeout)

    def retag(
        self,
        vg: str,
        name: str,
        *,
        add: Sequence[str] = (),
        delete: Sequence[str] = (),
        timeout: float | None = None,
    ) -> None:
        """Delete and add LV tags in ONE lvchange (a reader never sees neither or both)."""
        args: list[str] = []
        for tag in _check_tags(delete):
            args += ["--deltag", tag]
        for tag in _check_tags(add):
            args += ["--addtag", tag]
        if not args:
            return
        target = f"{_check_name('VG', vg)}/{_check_name('LV', name)}"
        self.command("lvchange", *args, "--", target, timeout=timeout)

    def _tags(
        self, flag: str, vg: str, name: str, tags: Sequence[str], timeout: float | None
    ) -> None:
        checked = _check_tags(tags)
        if not checked:
            return
        args: list[str] = []
        for tag in checked:
            args += [flag, tag]
        target = f"{_check_name('VG', vg)}/{_check_name('LV', name)}"
        self.command("lvchange", *args, "--", target, timeout=timeout)

    def vg_addtag(self, name: str, tags: Sequence[str], *, timeout: float | None = None) -> None:
        """Add tags to a VG (``vgchange --addtag``)."""
        self._vg_tags("--addtag", name, tags, timeout)

    def vg_deltag(self, name: str, tags: Sequence[str], *, timeout: float | None = None) -> None:
        self._vg_tags("--deltag", name, tags, timeout)

    def _vg_tags(self, flag: str, name: str, tags: Sequence[str], timeout: float | None) -> None:
        checked = _check_tags(tags)
        if not checked:
            return
        args: list[str] = []
        for tag in checked:
            args += [flag, tag]
        self.command("vgchange", *args, "--", _check_name("VG", name), timeout=timeout)

    def activate(
        self, vg: str, name: str, *, ignore_skip: bool = False, timeout: float | None = None
    ) -> None:
        args = ["--activate", "y"]
        if ignore_skip:
            args.append("--ignoreactivationskip")
        target = f"{_check_name('VG', vg)}/{_check_name('LV', name)}"
        self.command("lvchange", *args, "--", target, timeout=timeout)

    def refresh(self, vg: str, name: str, *, timeout: float | None = None) -> None:
        """Reload the LV's kernel table from the committed metadata and resume it
        (``lvchange --refresh``): repairs an LV left suspended or half-changed by a command
        that died midway."""
        target = f"{_check_name('VG', vg)}/{_check_name('LV', name)}"
        self.command("lvchange", "--refresh", "--", target, timeout=timeout)

    def deactivate(self, vg: str, name: str, *, timeout: float | None = None) -> None:
        target = f"{_check_name('VG', vg)}/{_check_name('LV', name)}"
        self.command("lvchange", "--activate", "n", "--", target, timeout=timeout)
