"""Module metadata and dependency order, on a fake module tree of minimal ELF files."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from kernel_guest.modules import (
    SIGNATURE_MAGIC,
    ModuleError,
    ModuleTree,
    parse_modinfo,
    read_elf_section,
    read_modinfo,
    strip_signature,
)


def elf_with_modinfo(fields: list[tuple[str, str]], text: bytes = b"\x90" * 32) -> bytes:
    """A minimal little-endian ELF64 relocatable file with .text and .modinfo sections."""
    modinfo = b"".join(f"{key}={value}".encode() + b"\0" for key, value in fields)
    shstrtab = b"\0.shstrtab\0.text\0.modinfo\0"
    text_off = 64
    modinfo_off = text_off + len(text)
    shstrtab_off = modinfo_off + len(modinfo)
    shoff = shstrtab_off + len(shstrtab)
    shoff += -shoff % 8
    header = struct.pack(
        "<16sHHIQQQIHHHHHH",
        b"\x7fELF\x02\x01\x01" + b"\0" * 9,
        1, 62, 1, 0, 0, shoff, 0, 64, 0, 0, 64, 4, 1,
    )  # fmt: skip

    def section(name: int, offset: int, size: int, kind: int = 1) -> bytes:
        return struct.pack("<IIQQQQIIQQ", name, kind, 0, 0, offset, size, 0, 0, 1, 0)

    sections = (
        b"\0" * 64
        + section(1, shstrtab_off, len(shstrtab), kind=3)
        + section(11, text_off, len(text))
        + section(17, modinfo_off, len(modinfo))
    )
    body = header + text + modinfo + shstrtab
    return body + b"\0" * (shoff - len(body)) + sections


def add_module(root: Path, rel: str, fields: list[tuple[str, str]]) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(elf_with_modinfo(fields))
    return path


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "lib/modules/6.1.0-test-amd64"
    add_module(root, "kernel/drivers/md/dm-mod.ko", [("name", "dm_mod"), ("depends", "")])
    add_module(root, "kernel/drivers/md/dm-bufio.ko", [("name", "dm_bufio"), ("depends", "dm-mod")])
    add_module(
        root,
        "kernel/drivers/md/dm-thin-pool.ko",
        [("name", "dm_thin_pool"), ("depends", "dm-bio-prison,dm-persistent-data,dm-mod")],
    )
    add_module(root, "kernel/drivers/md/dm-bio-prison.ko", [("depends", "")])
    add_module(
        root,
        "kernel/drivers/md/persistent-data/dm-persistent-data.ko",
        [("depends", "dm-bufio,libcrc32c")],
    )
    add_module(
        root,
        "kernel/lib/libcrc32c.ko",
        [("softdep", "pre: crc32c"), ("depends", "")],
    )
    add_module(root, "kernel/crypto/crc32c_generic.ko", [("alias", "crc32c"), ("depends", "")])
    add_module(
        root, "kernel/arch/x86/crypto/crc32c-intel.ko", [("alias", "crc32c"), ("depends", "")]
    )
    add_module(root, "kernel/fs/ext4/ext4.ko", [("depends", "jbd2,mbcache")])
    add_module(root, "kernel/fs/jbd2/jbd2.ko", [("depends", "")])
    (root / "modules.builtin").write_text("kernel/fs/mbcache.ko\nkernel/drivers/block/loop.ko\n")
    return root


def test_modinfo_fields_are_read_from_the_elf_section(tree: Path) -> None:
    info = read_modinfo(tree / "kernel/drivers/md/dm-thin-pool.ko")
    assert info.name == "dm_thin_pool"
    assert info.depends == ("dm_bio_prison", "dm_persistent_data", "dm_mod")
    softdep = read_modinfo(tree / "kernel/lib/libcrc32c.ko")
    assert softdep.softdep_pre == ("crc32c",) and softdep.softdep_post == ()


def test_a_module_without_a_name_field_is_named_after_its_file(tree: Path) -> None:
    assert read_modinfo(tree / "kernel/drivers/md/dm-bio-prison.ko").name == "dm_bio_prison"


def test_every_module_loads_after_its_dependencies(tree: Path) -> None:
    order = [m.name for m in ModuleTree(tree).resolve(["dm-thin-pool", "ext4"])]
    assert sorted(order) == sorted(set(order)), "a module is loaded twice"
    position = {name: i for i, name in enumerate(order)}
    for mod in ModuleTree(tree).resolve(["dm-thin-pool", "ext4"]):
        for dep in mod.depends:
            if dep in position:
                assert position[dep] < position[mod.name], f"{dep} after {mod.name}"
    assert order[-1] == "ext4"
    assert "dm_persistent_data" in order and "dm_bio_prison" in order


def test_softdep_alias_resolves_to_the_generic_implementation_first(tree: Path) -> None:
    order = [m.name for m in ModuleTree(tree).resolve(["libcrc32c"])]
    assert order == ["crc32c_generic", "libcrc32c"]


def test_builtin_modules_are_skipped_not_missing(tree: Path) -> None:
    order = [m.name for m in ModuleTree(tree).resolve(["ext4", "loop"])]
    assert "mbcache" not in order and "loop" not in order
    assert order == ["jbd2", "ext4"]


def test_a_missing_hard_dependency_names_the_chain(tree: Path) -> None:
    add_module(tree, "kernel/fs/xfs/xfs.ko", [("depends", "nonexistent")])
    with pytest.raises(ModuleError, match="nonexistent.*xfs -> nonexistent"):
        ModuleTree(tree).resolve(["xfs"])


def test_an_unknown_wanted_module_is_an_error(tree: Path) -> None:
    with pytest.raises(ModuleError, match="not found"):
        ModuleTree(tree).resolve(["no-such-module"])


def test_a_dependency_cycle_is_reported(tree: Path) -> None:
    add_module(tree, "kernel/a.ko", [("depends", "b")])
    add_module(tree, "kernel/b.ko", [("depends", "a")])
    with pytest.raises(ModuleError, match="cycle: a -> b -> a"):
        ModuleTree(tree).resolve(["a"])


def test_non_elf_file_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ModuleError, match="not an ELF"):
        read_elf_section(b"garbage" * 20, ".modinfo")


def test_parse_modinfo_keeps_repeated_keys_in_order() -> None:
    raw = b"alias=a\0alias=b\0\0\0depends=x,y\0"
    assert parse_modinfo(raw) == {"alias": ["a", "b"], "depends": ["x,y"]}


def test_strip_signature_removes_exactly_the_appended_signature() -> None:
    body = elf_with_modinfo([("depends", "")])
    signature = b"S" * 300
    info = struct.pack(">BBBBB3xI", 0, 0, 2, 0, 0, len(signature))
    assert strip_signature(body + signature + info + SIGNATURE_MAGIC) == body


def test_strip_signature_leaves_an_unsigned_module_alone() -> None:
    body = elf_with_modinfo([("depends", "")])
    assert strip_signature(body) == body


def test_strip_signature_rejects_a_signature_longer_than_the_file() -> None:
    info = struct.pack(">BBBBB3xI", 0, 0, 2, 0, 0, 10**6)
    with pytest.raises(ModuleError):
        strip_signature(b"x" * 100 + info + SIGNATURE_MAGIC)
