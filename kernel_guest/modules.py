"""Kernel modules of an unpacked Debian kernel package, without modules.dep or kmod.

Each module carries its own metadata in the ELF section ``.modinfo`` (NUL-separated
``key=value`` strings): ``depends=`` names the modules it needs, ``softdep=`` names modules
(or aliases) to load before/after it, ``alias=`` names it answers to.  This module reads those
sections, orders a wanted set of modules so every dependency loads first, and strips the
appended signatures (signature checks are slow under emulation and the guest does not need
them).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

# What the real-kernel suite needs; dependencies are resolved from the modules themselves.
DEFAULT_MODULES: tuple[str, ...] = (
    "virtio_pci",
    "virtio_blk",
    "virtio_console",
    "9p",
    "9pnet_virtio",
    "overlay",
    "ext4",
    "xfs",
    "loop",
    "dm-mod",
    "dm-thin-pool",
    "dm-snapshot",
    # Encrypted volumes: dm-crypt with AES-XTS, and the AF_ALG sockets cryptsetup uses for
    # its key slots (AES and CBC are built into Debian's kernel).
    "dm-crypt",
    "xts",
    "ecb",
    "af_alg",
    "algif_skcipher",
)

SIGNATURE_MAGIC = b"~Module signature appended~\n"
# struct module_signature: algo, hash, id_type, signer_len, key_id_len (u8 each), 3 pad bytes,
# sig_len (big-endian u32).
_SIG_INFO = struct.Struct(">BBBBB3xI")


class ModuleError(Exception):
    """A module is missing, malformed, or its dependencies cannot be resolved."""


def normalize(name: str) -> str:
    """Module names treat '-' and '_' alike (dm-mod.ko is loaded as dm_mod)."""
    return name.strip().replace("-", "_")


@dataclass(frozen=True)
class ModInfo:
    name: str
    path: Path
    depends: tuple[str, ...]
    softdep_pre: tuple[str, ...] = ()
    softdep_post: tuple[str, ...] = ()
    aliases: tuple[str, ...] = field(default=())


def read_elf_section(data: bytes, wanted: str) -> bytes | None:
    """The contents of the named section of a little-endian ELF64 file, or None."""
    if len(data) < 64 or data[:4] != b"\x7fELF":
        raise ModuleError("not an ELF file")
    if data[4] != 2 or data[5] != 1:
        raise ModuleError("only little-endian ELF64 modules are supported")
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    if shoff == 0 or shnum == 0 or shstrndx >= shnum or shoff + shnum * shentsize > len(data):
        raise ModuleError("ELF file has no usable section table")

    def header(index: int) -> tuple[int, int, int]:
        base = shoff + index * shentsize
        (name_off,) = struct.unpack_from("<I", data, base)
        offset, size = struct.unpack_from("<QQ", data, base + 24)
        return name_off, offset, size

    _, str_off, str_size = header(shstrndx)
    names = data[str_off : str_off + str_size]
    target = wanted.encode()
    for index in range(shnum):
        name_off, offset, size = header(index)
        end = names.find(b"\0", name_off)
        if names[name_off:end] == target:
            if offset + size > len(data):
                raise ModuleError(f"section {wanted} runs past the end of the file")
            return data[offset : offset + size]
    return None


def parse_modinfo(raw: bytes) -> dict[str, list[str]]:
    """``key=value`` strings of a .modinfo section, values grouped per key in order."""
    fields: dict[str, list[str]] = {}
    for chunk in raw.split(b"\0"):
        if b"=" not in chunk:
            continue
        key, _, value = chunk.decode("utf-8", "replace").partition("=")
        fields.setdefault(key, []).append(value)
    return fields


def _parse_softdeps(values: Iterable[str]) -> tuple[list[str], list[str]]:
    """``softdep=pre: a b post: c`` -> (["a", "b"], ["c"])."""
    pre: list[str] = []
    post: list[str] = []
    for value in values:
        current: list[str] | None = None
        for word in value.split():
            if word == "pre:":
                current = pre
            elif word == "post:":
                current = post
            elif current is not None:
                current.append(word)
    return pre, post


def read_modinfo(path: Path) -> ModInfo:
    data = path.read_bytes()
    try:
        raw = read_elf_section(data, ".modinfo")
    except ModuleError as exc:
        raise ModuleError(f"{path}: {exc}") from None
    if raw is None:
        raise ModuleError(f"{path}: no .modinfo section")
    fields = parse_modinfo(raw)
    name = normalize(fields.get("name", [_stem(path)])[0])
    depends = tuple(
        normalize(dep) for value in fields.get("depends", []) for dep in value.split(",") if dep
    )
    pre, post = _parse_softdeps(fields.get("softdep", []))
    return ModInfo(
        name=name,
        path=path,
        depends=depends,
        softdep_pre=tuple(pre),
        softdep_post=tuple(post),
        aliases=tuple(fields.get("alias", [])),
    )


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".ko.xz", ".ko.zst", ".ko.gz", ".ko"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


class ModuleTree:
    """The modules under ``lib/modules/<release>`` of an unpacked kernel package."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._files: dict[str, Path] = {}
        for path in sorted(root.rglob("*.ko*")):
            if path.is_file():
                self._files.setdefault(normalize(_stem(path)), path)
        compressed = [p for p in self._files.values() if not p.name.endswith(".ko")]
        if compressed:
            raise ModuleError(
                f"compressed modules are not supported (e.g. {compressed[0].name}); "
                "this runner expects a kernel built with CONFIG_MODULE_COMPRESS_NONE"
            )
        self._builtin = self._read_builtin(root / "modules.builtin")
        self._info: dict[str, ModInfo] = {}
        self._aliases: dict[str, list[str]] | None = None

    @staticmethod
    def _read_builtin(path: Path) -> set[str]:
        if not path.exists():
            return set()
        return {
            normalize(_stem(Path(line.strip())))
            for line in path.read_text().splitlines()
            if line.strip()
        }

    def info(self, name: str) -> ModInfo:
        key = normalize(name)
        if key not in self._info:
            path = self._files.get(key)
            if path is None:
                raise ModuleError(f"module {name!r} not found under {self.root}")
            self._info[key] = read_modinfo(path)
        return self._info[key]

    def is_builtin(self, name: str) -> bool:
        return normalize(name) in self._builtin

    def has(self, name: str) -> bool:
        return normalize(name) in self._files

    def lookup_soft(self, name: str) -> str | None:
        """A softdep names a module or an alias; the module to load for it, if any."""
        key = normalize(name)
        if key in self._files:
            return key
        if self._aliases is None:
            self._aliases = {}
            for mod in self._files:
                for alias in self.info(mod).aliases:
                    self._aliases.setdefault(alias, []).append(mod)
        candidates = sorted(self._aliases.get(name, []))
        # A generic implementation works on every CPU model; prefer it when there is a choice.
        generic = [c for c in candidates if c.endswith("_generic")]
        preferred = generic or candidates
        return preferred[0] if preferred else None

    def resolve(self, wanted: Sequence[str]) -> list[ModInfo]:
        """Modules to load, in an order where every module comes after its dependencies.

        Built-in modules are skipped; a hard dependency that is neither a module nor built in
        is an error; a soft dependency that cannot be found is skipped (as modprobe does).
        """
        order: list[ModInfo] = []
        done: set[str] = set()
        visiting: list[str] = []

        def visit(name: str, soft: bool) -> None:
            key = normalize(name)
            if key in done:
                return
            if key in visiting:
                cycle = " -> ".join([*visiting[visiting.index(key) :], key])
                raise ModuleError(f"module dependency cycle: {cycle}")
            if not self.has(key):
                if self.is_builtin(key) or soft:
                    done.add(key)
                    return
                chain = " -> ".join([*visiting, key])
                raise ModuleError(f"module {name!r} not found (needed by {chain})")
            visiting.append(key)
            mod = self.info(key)
            for dep in mod.softdep_pre:
                target = self.lookup_soft(dep)
                if target is not None:
                    visit(target, soft=True)
            for dep in mod.depends:
                visit(dep, soft=False)
            visiting.pop()
            done.add(key)
            order.append(mod)
            for dep in mod.softdep_post:
                target = self.lookup_soft(dep)
                if target is not None:
                    visit(target, soft=True)

        for name in wanted:
            if not self.has(name) and self.is_builtin(name):
                continue
            visit(name, soft=False)
        return order


def strip_signature(data: bytes) -> bytes:
    """The module without its appended signature (unchanged if it has none)."""
    if not data.endswith(SIGNATURE_MAGIC):
        return data
    info_end = len(data) - len(SIGNATURE_MAGIC)
    info_start = info_end - _SIG_INFO.size
    if info_start < 0:
        raise ModuleError("truncated module signature")
    _, _, _, signer_len, key_id_len, sig_len = _SIG_INFO.unpack_from(data, info_start)
    body_end = info_start - sig_len - signer_len - key_id_len
    if body_end <= 0:
        raise ModuleError("module signature is larger than the module")
    return data[:body_end]
