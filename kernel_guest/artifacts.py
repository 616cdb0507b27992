"""Download, unpack and cache what the guest boots: a stock Debian kernel and an initramfs.

Nothing is installed on the host.  ``apt-get download`` fetches the kernel package and
``busybox-static``; ``dpkg-deb -x`` unpacks them into a scratch directory; the uncompressed
``vmlinux`` and the initramfs built from busybox and the needed modules are kept in the cache,
keyed by package versions (and, for the initramfs, by a hash of everything that goes in it).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from edge_common.commands import CommandError, CommandNotFound, CommandTimeout, run
from kernel_guest import initramfs
from kernel_guest.modules import ModuleTree
from kernel_guest.vmlinux import extract_vmlinux

KERNEL_META_PACKAGE = "linux-image-amd64"
BUSYBOX_PACKAGE = "busybox-static"
APT_LISTS = Path("/var/lib/apt/lists")
CHOSEN_FILE = "chosen.json"
APT_TIMEOUT = 600.0
UNPACK_TIMEOUT = 300.0


class ArtifactError(Exception):
    """The kernel or initramfs could not be obtained."""


@dataclass(frozen=True)
class Package:
    name: str
    version: str

    @property
    def key(self) -> str:
        """A file-name-safe identity of this exact package version."""
        return re.sub(r"[^A-Za-z0-9.+_-]", "_", f"{self.name}_{self.version}")


@dataclass(frozen=True)
class GuestImage:
    """What qemu boots."""

    kernel_package: Package
    vmlinux: Path
    initramfs: Path
    release: str  # e.g. 6.1.0-56-amd64
    modules: tuple[str, ...]  # load order


@dataclass
class PrepareReport:
    downloaded: list[str]
    built: list[str]
    seconds: float


def default_cache_dir() -> Path:
    override = os.environ.get("KERNEL_GUEST_CACHE")
    if override:
        return Path(override)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "edge-node-services" / "kernel-guest"


def apt_lists_changed_at() -> float:
    """When ``apt-get update`` last changed the package lists (0 if unknown)."""
    try:
        return APT_LISTS.stat().st_mtime
    except OSError:
        return 0.0


def _apt_show(packages: Sequence[str]) -> list[dict[str, str]]:
    result = run(
        ["apt-cache", "show", "--no-all-versions", *packages], timeout=APT_TIMEOUT, check=False
    )
    records: list[dict[str, str]] = []
    for block in result.stdout_text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            if line[:1].isspace() or ":" not in line:
                continue
            key, _, value = line.partition(":")
            fields[key] = value.strip()
        if "Package" in fields:
            records.append(fields)
    return records


def parse_kernel_dependency(depends: str) -> Package | None:
    """The ``linux-image-<abi>-amd64 (= <version>)`` a kernel meta package depends on."""
    for alternative in re.split(r"[,|]", depends):
        match = re.fullmatch(r"\s*(linux-image-[0-9][^\s(]*)\s*\(=\s*([^)\s]+)\)\s*", alternative)
        if match:
            return Package(match.group(1), match.group(2))
    return None


def find_packages(kernel_package: str | None) -> tuple[Package, Package]:
    """(kernel, busybox) candidates from the apt lists, running ``apt-get update`` if needed."""
    for attempt in range(2):
        wanted = [kernel_package or KERNEL_META_PACKAGE, BUSYBOX_PACKAGE]
        records = {r["Package"]: r for r in _apt_show(wanted)}
        kernel: Package | None = None
        if kernel_package:
            rec = records.get(kernel_package)
            if rec and "Version" in rec:
                kernel = Package(kernel_package, rec["Version"])
        else:
            rec = records.get(KERNEL_META_PACKAGE)
            if rec:
                kernel = parse_kernel_dependency(rec.get("Depends", ""))
        bb = records.get(BUSYBOX_PACKAGE)
        if kernel and bb and "Version" in bb:
            return kernel, Package(BUSYBOX_PACKAGE, bb["Version"])
        if attempt == 0:
            print("kernel-guest: package lists lack the kernel or busybox; running apt-get update")
            try:
                run(["apt-get", "update", "-qq"], timeout=APT_TIMEOUT)
            except (CommandError, CommandTimeout) as exc:
                raise ArtifactError(f"apt-get update failed: {exc}") from exc
    raise ArtifactError(
        f"apt does not know {kernel_package or KERNEL_META_PACKAGE} and {BUSYBOX_PACKAGE} "
        "(is this a Debian/Ubuntu host with the main archive configured?)"
    )


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class Cache:
    """The on-disk cache; every public method is safe to call from concurrent runs."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _download(self, pkg: Package, report: PrepareReport) -> Path:
        debs = self.root / "debs"
        target = debs / f"{pkg.key}.deb"
        if target.exists():
            return target
        debs.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=debs, prefix=".download-") as tmp:
            if shutil.which("apt-get") is None:
                raise ArtifactError("apt-get is missing: this runner needs a Debian host")
            # apt-get download writes into the current directory; env -C sets it for the child.
            argv = ["env", "-C", tmp, "apt-get", "download", "-q"]
            if os.geteuid() == 0:
                # The _apt sandbox user cannot write to our directory; root downloads itself.
                argv += ["-o", "APT::Sandbox::User=root"]
            argv.append(f"{pkg.name}={pkg.version}")
            try:
                run(argv, timeout=APT_TIMEOUT)
            except (CommandError, CommandTimeout) as exc:
                raise ArtifactError(f"could not download {pkg.name}={pkg.version}: {exc}") from exc
            got = sorted(Path(tmp).glob("*.deb"))
            if len(got) != 1:
                raise ArtifactError(f"apt-get download {pkg.name} produced {len(got)} files")
            os.replace(got[0], target)
        report.downloaded.append(f"{pkg.name}={pkg.version}")
        return target

    @staticmethod
    def _unpack(deb: Path, into: Path) -> None:
        try:
            run(["dpkg-deb", "-x", str(deb), str(into)], timeout=UNPACK_TIMEOUT)
        except CommandNotFound as exc:
            raise ArtifactError("dpkg-deb is missing: this runner needs a Debian host") from exc
        except (CommandError, CommandTimeout) as exc:
            raise ArtifactError(f"could not unpack {deb.name}: {exc}") from exc

    def prepare(
        self, kernel: Package, busybox: Package, modules: Sequence[str]
    ) -> tuple[GuestImage, PrepareReport]:
        started = time.monotonic()
        report = PrepareReport(downloaded=[], built=[], seconds=0.0)
        with _locked(self.root / ".lock"):
            image = self._prepare_locked(kernel, busybox, modules, report)
        report.seconds = time.monotonic() - started
        return image, report

    def _prepare_locked(
        self, kernel: Package, busybox: Package, modules: Sequence[str], report: PrepareReport
    ) -> GuestImage:
        kdir = self.root / "kernels" / kernel.key
        meta_path = kdir / "meta.json"
        recipe = initramfs.recipe_hash(busybox.key, modules)
        initrd = kdir / f"initramfs-{recipe}.cpio"
        vmlinux = kdir / "vmlinux"
        if meta_path.exists() and vmlinux.exists() and initrd.exists():
            meta = json.loads(meta_path.read_text())
            builds = meta.get("initramfs", {})
            if recipe in builds:
                return GuestImage(
                    kernel, vmlinux, initrd, meta["release"], tuple(builds[recipe]["modules"])
                )

        kdir.mkdir(parents=True, exist_ok=True)
        kernel_deb = self._download(kernel, report)
        busybox_deb = self._download(busybox, report)
        with tempfile.TemporaryDirectory(prefix="kernel-guest-unpack-") as scratch:
            kroot = Path(scratch) / "kernel"
            broot = Path(scratch) / "busybox"
            self._unpack(kernel_deb, kroot)
            self._unpack(busybox_deb, broot)
            release = _release(kroot)
            if not vmlinux.exists():
                images = sorted((kroot / "boot").glob("vmlinuz-*"))
                if not images:
                    raise ArtifactError(f"{kernel_deb.name} contains no /boot/vmlinuz-*")
                _, elf = extract_vmlinux(images[0].read_bytes())
                _write_atomic(vmlinux, elf)
                report.built.append(f"vmlinux ({len(elf) // 2**20} MiB)")
            tree = ModuleTree(kroot / "lib" / "modules" / release)
            busybox_bin = broot / "bin" / "busybox"
            if not busybox_bin.exists():
                raise ArtifactError(f"{busybox_deb.name} contains no /bin/busybox")
            data, order = initramfs.build(busybox_bin.read_bytes(), tree, modules)
            _write_atomic(initrd, data)
            report.built.append(f"{initrd.name} ({len(data) // 2**20} MiB, {len(order)} modules)")

        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        meta["package"] = {"name": kernel.name, "version": kernel.version}
        meta["release"] = release
        builds = meta.setdefault("initramfs", {})
        builds[recipe] = {"busybox": busybox.version, "modules": order}
        for old in _prune_initramfs(kdir, keep=initrd):
            builds.pop(old, None)
        _write_atomic(meta_path, json.dumps(meta, indent=2).encode())
        return GuestImage(kernel, vmlinux, initrd, release, tuple(order))

    def remember(self, kernel: Package, busybox: Package) -> None:
        """Record what apt chose, so later runs need not ask apt again."""
        self.root.mkdir(parents=True, exist_ok=True)
        data = {"kernel": [kernel.name, kernel.version], "busybox": [busybox.name, busybox.version]}
        _write_atomic(self.root / CHOSEN_FILE, json.dumps(data).encode())

    def remembered(self, newer_than: float = 0.0) -> tuple[Package, Package] | None:
        """What apt chose last time, if recorded after ``newer_than`` (a timestamp)."""
        path = self.root / CHOSEN_FILE
        try:
            if path.stat().st_mtime <= newer_than:
                return None
            data = json.loads(path.read_text())
            return Package(*data["kernel"]), Package(*data["busybox"])
        except (OSError, ValueError, KeyError, TypeError):
            return None


def _prune_initramfs(kdir: Path, keep: Path, min_age: float = 3600.0) -> list[str]:
    """Delete older initramfs builds (another recipe: another module list or /init) that
    have not been written for ``min_age`` seconds; their recipe hashes."""
    removed = []
    now = time.time()
    for path in kdir.glob("initramfs-*.cpio"):
        if path != keep and now - path.stat().st_mtime > min_age:
            path.unlink(missing_ok=True)
            removed.append(path.stem.removeprefix("initramfs-"))
    return removed


def _release(kroot: Path) -> str:
    releases = sorted(p.name for p in (kroot / "lib" / "modules").glob("*") if p.is_dir())
    if len(releases) != 1:
        raise ArtifactError(f"expected one module tree in the kernel package, found {releases}")
    return releases[0]
