"""The safety checks a device must pass before pvcreate, vgcreate or vgextend may touch it.

Every refusal carries a reason code (stable: events, status and metrics use it) and a message a
person understands. Cheap checks (sysfs, mount tables, the LVM report) run first; the probes
that read the device (``blkid -p``, ``wipefs -n``, an exclusive open) only run for a device no
cheap check has refused. Nothing here ever writes to a device.
"""

from __future__ import annotations

import enum
import errno
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from edge_common.commands import CommandNotFound, CommandTimeout, run
from edge_common.lvm import PhysicalVolume
from node_resource_manager.devices import (
    BlockDevice,
    HostPaths,
    host_path,
    majmin,
    parse_majmin,
    read_attr,
    sys_dir,
)
from node_resource_manager.mounts import (
    DEFAULT_MOUNT_TABLES,
    MountTable,
    read_mount_tables,
    read_swaps,
)


class Reason(enum.StrEnum):
    MISSING = "Missing"
    NOT_BLOCK_DEVICE = "NotBlockDevice"
    LISTED_TWICE = "ListedTwice"
    EMPTY = "ZeroSize"
    DEVICE_MAPPER = "DeviceMapper"
    MULTIPATH_MEMBER = "MultipathMember"
    HOLDERS = "HasHolders"
    PARTITIONS = "HasPartitions"
    READ_ONLY = "ReadOnly"
    ROOT_FILESYSTEM = "BacksRootFilesystem"
    MOUNTED = "Mounted"
    SWAP = "ActiveSwap"
    OTHER_VG = "PhysicalVolumeOfAnotherVG"
    UNCLAIMED_PV = "UnclaimedPhysicalVolume"
    SIGNATURE = "HasSignature"
    IN_USE = "InUse"
    PROBE_FAILED = "ProbeFailed"
    HOST_STATE_UNKNOWN = "HostStateUnknown"  # a host-wide probe failed: nothing new is used
    IDENTITY_UNKNOWN = "IdentityUnknown"  # the medium could not be identified and pinned
    IDENTITY_CHANGED = "IdentityChanged"  # another medium than the one checked, at write time


@dataclass(frozen=True)
class Refusal:
    reason: Reason
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"reason": str(self.reason), "message": self.message}


@dataclass
class HostState:
    """What one reconcile knows about the host, gathered once."""

    mounts: MountTable
    swaps: dict[int, str]
    root_chain: set[int]  # devices under the root filesystem (it, its slaves, their disks)
    pvs_by_rdev: dict[int, PhysicalVolume]
    pv_problems: list[str] = field(default_factory=list)
    # Host-wide probes that could not be completed: while any is listed, no new device is
    # used (an unreadable answer is never "nothing there"); existing VGs are still reported.
    unknowns: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class SafetySettings:
    paths: HostPaths = HostPaths()
    mount_tables: tuple[str, ...] = DEFAULT_MOUNT_TABLES
    swaps_file: str = "/proc/swaps"
    probe_timeout: float = 20.0
    mount_namespace: str = "any"  # see namespace_problems; the agent's config sets it
    proc: Path = Path("/proc")
    blkid: tuple[str, ...] = ("blkid",)
    wipefs: tuple[str, ...] = ("wipefs",)


class SafetyChecker:
    def __init__(self, settings: SafetySettings | None = None) -> None:
        self.settings = settings or SafetySettings()

    # ------------------------------------------------------------------ host snapshot

    def snapshot(self, pvs: Iterable[PhysicalVolume]) -> HostState:
        s = self.settings
        unknowns = list(namespace_problems(s.mount_namespace, s.proc))
        mounts = read_mount_tables(s.mount_tables, s.paths)
        unknowns += [f"mount table {t} cannot be read" for t in mounts.unreadable]
        try:
            swaps = read_swaps(s.swaps_file, s.paths)
        except OSError as exc:
            swaps = {}
            unknowns.append(f"swap list {s.swaps_file} cannot be read: {exc.strerror or exc}")
        chain, chain_problems = self._root_chain(mounts.root_devices)
        state = HostState(mounts=mounts, swaps=swaps, root_chain=chain, pvs_by_rdev={},
                          unknowns=unknowns + chain_problems)
        for pv in pvs:
            try:
                st = os.stat(host_path(pv.name, s.paths))  # LVM names host paths
            except OSError:
                state.pv_problems.append(f"physical volume {pv.name} ({pv.uuid}) is not present")
                continue
            state.pvs_by_rdev[st.st_rdev] = pv
        return state

    def _root_chain(self, roots: Iterable[int]) -> tuple[set[int], list[str]]:
        """The root filesystem's device, what it is built on (slaves, recursively) and the
        whole disks of any partition among them; plus what could not be read (a chain that
        cannot be followed is unknown, not short)."""
        chain: set[int] = set()
        problems: list[str] = []
        todo = [r for r in roots if os.major(r) != 0]
        while todo:
            rdev = todo.pop()
            if rdev in chain:
                continue
            chain.add(rdev)
            directory = sys_dir(rdev, self.settings.paths)
            slaves = _listdir_or_none(directory / "slaves")
            if slaves is None:
                problems.append(f"the root filesystem's device {majmin(rdev)} cannot be "
                                "followed in sysfs")
                continue
            for name in slaves:
                slave = read_attr(directory / "slaves" / name, "dev")
                if slave and (num := parse_majmin(slave)) is not None:
                    todo.append(num)
            if read_attr(directory, "partition") is not None:
                parent = read_attr(directory.resolve().parent, "dev")
                if parent and (num := parse_majmin(parent)) is not None:
                    todo.append(num)
        return chain, problems

    # ------------------------------------------------------------------ the checks

    def check(
        self,
        dev: BlockDevice,
        host: HostState,
        *,
        target_vg: str,
        claimed_orphan: bool,
    ) -> list[Refusal]:
        """Reasons to refuse ``dev`` for ``target_vg``; empty when it may be used.

        A PV of ``target_vg`` itself is never checked here (it is already a member).
        ``claimed_orphan`` says the agent's journal records creating this device's PV for
        ``target_vg`` (an interrupted earlier reconcile)."""
        refusals = self._cheap_checks(dev, host, target_vg, claimed_orphan)
        if refusals:
            return refusals
        allowed = {"LVM2_member"} if claimed_orphan else set()
        refusals = self._probe_signatures(dev, allowed)
        if refusals:
            return refusals
        busy = self._exclusive_open(dev)
        return [busy] if busy else []

    def _cheap_checks(
        self, dev: BlockDevice, host: HostState, target_vg: str, claimed_orphan: bool
    ) -> list[Refusal]:
        name = dev.describe()
        if host.unknowns:
            return [Refusal(Reason.HOST_STATE_UNKNOWN,
                            f"{name} is not used while the host's state is unknown: "
                            + "; ".join(host.unknowns))]
        directory = sys_dir(dev.rdev, self.settings.paths)
        facts = _sysfs_facts(directory)
        if isinstance(facts, str):
            return [Refusal(Reason.PROBE_FAILED, f"{name}: {facts}; not used while unknown")]
        size, read_only, holders, parts = facts
        out: list[Refusal] = []
        if size == 0:
            out.append(Refusal(Reason.EMPTY, f"{name} has size 0 (no medium or backing file)"))

        if (directory / "dm").is_dir():
            dm_uuid = read_attr(directory / "dm", "uuid") or ""
            dm_name = read_attr(directory / "dm", "name") or dev.kname
            what = "a multipath map" if dm_uuid.startswith("mpath-") else "a device-mapper device"
            out.append(Refusal(Reason.DEVICE_MAPPER, f"{name} is {what} ({dm_name}); LVM "
                                                     "volumes and other mapped devices are "
                                                     "never used as physical volumes"))

        multipath = [h for h in holders if _dm_uuid(self.settings.paths, h).startswith("mpath-")]
        if multipath:
            out.append(Refusal(Reason.MULTIPATH_MEMBER,
                               f"{name} is a path of multipath device {', '.join(multipath)}"))
        others = [h for h in holders if h not in multipath]
        if others:
            out.append(Refusal(Reason.HOLDERS,
                               f"{name} is held by {', '.join(sorted(others))} (in use by a "
                               "device-mapper, RAID or cache device)"))

        if parts:
            out.append(Refusal(Reason.PARTITIONS,
                               f"{name} has partitions ({', '.join(parts)}); list the "
                               "partition itself to use one"))

        if read_only != "0":
            out.append(Refusal(Reason.READ_ONLY, f"{name} is read-only"))

        if dev.rdev in host.root_chain:
            out.append(Refusal(Reason.ROOT_FILESYSTEM, f"{name} backs the root filesystem"))

        places = host.mounts.where(dev.rdev)
        if places:
            out.append(Refusal(Reason.MOUNTED, f"{name} is mounted at {', '.join(places)}"))

        if dev.rdev in host.swaps:
            out.append(Refusal(Reason.SWAP, f"{name} is active swap"))

        pv = host.pvs_by_rdev.get(dev.rdev)
        if pv is not None and pv.vg_name and pv.vg_name != target_vg:
            out.append(Refusal(Reason.OTHER_VG, f"{name} is a physical volume of volume group "
                                                f"{pv.vg_name!r}"))
        elif pv is not None and not pv.vg_name and not claimed_orphan:
            out.append(Refusal(Reason.UNCLAIMED_PV,
                               f"{name} is an LVM physical volume in no volume group that this "
                               "agent did not create; remove it by hand (pvremove) if it is "
                               "free"))
        return out

    def _probe_signatures(self, dev: BlockDevice, allowed: set[str]) -> list[Refusal]:
        """Read the device's own bytes: udev's database may be stale or absent."""
        s = self.settings
        found: dict[str, str] = {}
        name = dev.describe()
        try:
            res = run([*s.blkid, "-p", "-o", "export", dev.path], timeout=s.probe_timeout,
                      check=False)
        except (CommandTimeout, CommandNotFound) as exc:
            return [Refusal(Reason.PROBE_FAILED, f"{name}: blkid -p failed: {exc}")]
        if res.returncode == 0:
            # Superblocks (TYPE) and partition tables (PTTYPE) are signatures; the
            # PART_ENTRY_* values a partition reports about its own table entry are not.
            kv = _export_pairs(res.stdout_text)
            for key in ("TYPE", "PTTYPE"):
                if key in kv:
                    usage = kv.get("USAGE", "partition table" if key == "PTTYPE" else "")
                    found[kv[key]] = usage or "signature"
        elif res.returncode == 8:
            found["ambivalent"] = "several signatures"
        elif res.returncode != 2:
            return [Refusal(Reason.PROBE_FAILED,
                            f"{name}: blkid -p exited {res.returncode}: {res.stderr_text}")]
        try:
            res = run([*s.wipefs, "--no-act", "--json", dev.path], timeout=s.probe_timeout,
                      check=False)
        except (CommandTimeout, CommandNotFound) as exc:
            return [Refusal(Reason.PROBE_FAILED, f"{name}: wipefs -n failed: {exc}")]
        if res.returncode != 0:
            return [Refusal(Reason.PROBE_FAILED,
                            f"{name}: wipefs -n exited {res.returncode}: {res.stderr_text}")]
        try:
            sigs = _wipefs_signatures(res.stdout_text)
        except ValueError as exc:
            return [Refusal(Reason.PROBE_FAILED, f"{name}: cannot read wipefs output: {exc}")]
        for sig_type, offset in sigs:
            found.setdefault(sig_type, f"at offset {offset}")
        unexpected = {k: v for k, v in found.items() if k not in allowed}
        if not unexpected:
            return []
        listing = ", ".join(f"{k} ({v})" for k, v in sorted(unexpected.items()))
        return [Refusal(Reason.SIGNATURE, f"{name} carries a signature: {listing}; it is "
                                          "never wiped, clear it by hand if it is free")]

    def _exclusive_open(self, dev: BlockDevice) -> Refusal | None:
        """The kernel refuses an exclusive open of a device it has claimed (mounted, held)."""
        try:
            fd = os.open(dev.path, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                return Refusal(Reason.IN_USE, f"{dev.describe()} is in use (the kernel refused "
                                              "an exclusive open)")
            return Refusal(Reason.PROBE_FAILED, f"{dev.describe()} cannot be opened: "
                                                f"{exc.strerror}")
        os.close(fd)
        return None


def _sysfs_facts(directory: Path) -> tuple[int, str, list[str], list[str]] | str:
    """A device's size, read-only flag, holders and partitions from sysfs; or what could not
    be read (never guessed: a missing answer is not "none")."""
    try:
        size, read_only = read_attr(directory, "size"), read_attr(directory, "ro")
    except OSError as exc:
        return f"sysfs cannot be read: {exc}"
    holders = _listdir_or_none(directory / "holders")
    parts = _partitions(directory)
    if size is None or read_only is None or holders is None or parts is None:
        unread = [what for what, value in (("size", size), ("ro", read_only),
                                           ("holders", holders), ("partitions", parts))
                  if value is None]
        return f"sysfs does not answer ({', '.join(unread)} unreadable under {directory})"
    if not size.isdigit():
        return f"unreadable size {size!r} in sysfs"
    return int(size), read_only, holders, parts


def _listdir_or_none(path: Path) -> list[str] | None:
    """The directory's entries; [] when it does not exist (no holders, no slaves), None when
    it exists but cannot be read."""
    try:
        return sorted(os.listdir(path))
    except FileNotFoundError:
        return []
    except OSError:
        return None


def _partitions(directory: Path) -> list[str] | None:
    names = _listdir_or_none(directory)
    if names is None or not names:
        return None  # the device's own sysfs directory is never empty
    return [name for name in names if (directory / name / "partition").is_file()]


def namespace_problems(expected: str, proc: Path = Path("/proc")) -> list[str]:
    """Is the agent where its configuration says, so that the mount tables it reads are the
    host's? ``host``: in the host's mount namespace (PID 1's is its own); ``hostpid``: in a
    container sharing the host's PID namespace (PID 1 is the host's init, in ANOTHER mount
    namespace; the same one means /proc/1 is the container's own init, whose mount table
    says nothing about the host); ``any``: not checked."""
    if expected == "any":
        return []
    try:
        init, own = _mount_namespaces(proc)
    except OSError as exc:
        return [f"mount namespaces cannot be compared: {exc}"]
    if expected == "host" and init != own:
        return [f"the agent is not in the host's mount namespace ({own}; PID 1: {init}) but "
                "is configured with mount_namespace=host"]
    if expected == "hostpid" and init == own:
        return [f"PID 1 shares the agent's mount namespace ({own}): the pod does not run "
                "with hostPID, so /proc/1/mountinfo is not the host's (mount_namespace="
                "hostpid)"]
    return []


def _mount_namespaces(proc: Path) -> tuple[str, str]:
    """PID 1's and the agent's mount namespace: their ns/mnt links; where PID 1's is not
    readable (ptrace rules), the sets of mount IDs of both mountinfo files, which no two
    namespaces share."""
    try:
        return os.readlink(proc / "1" / "ns" / "mnt"), os.readlink(proc / "self" / "ns" / "mnt")
    except PermissionError:
        pass

    def mount_ids(pid: str) -> str:
        text = (proc / pid / "mountinfo").read_text()
        ids = sorted({int(line.split(" ", 1)[0]) for line in text.splitlines() if line})
        return f"mounts {ids[:3]}..({len(ids)})" if len(ids) > 3 else f"mounts {ids}"

    return mount_ids("1"), mount_ids("self")


def _dm_uuid(paths: HostPaths, kname: str) -> str:
    return read_attr(paths.sys / "class" / "block" / kname / "dm", "uuid") or ""


def _export_pairs(text: str) -> Mapping[str, str]:
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key.strip()] = value.strip()
    return out


def _wipefs_signatures(text: str) -> Sequence[tuple[str, str]]:
    if not text.strip():
        return []
    doc = json.loads(text)
    sigs = doc.get("signatures") if isinstance(doc, dict) else None
    if not isinstance(sigs, list):
        raise ValueError("no 'signatures' list")
    out = []
    for sig in sigs:
        if not isinstance(sig, dict):
            raise ValueError("a signature is not an object")
        out.append((str(sig.get("type") or "unknown"), str(sig.get("offset") or "?")))
    return out
