"""Ids, LV names and tags (csi_lvm.volume): the stable contract between controller and node."""

from __future__ import annotations

import re

import pytest

from csi_lvm.volume import (
    InvalidId,
    LvRef,
    build_tags,
    decode_context,
    encode_context,
    is_valid_tag,
    owner_tag,
    parse_id,
    read_tags,
    snapshot_lv_name,
    split_mount_options,
    split_options,
    temporary_lv_name,
    volume_lv_name,
)

LVM_NAME = re.compile(r"[A-Za-z0-9+_.][A-Za-z0-9+_.-]*")
RESERVED = ("_cdata", "_cmeta", "_corig", "_cpool", "_cvol", "_imeta", "_iorig", "_mimage",
            "_mlog", "_pmspare", "_rimage", "_rmeta", "_tdata", "_tmeta", "_vdata", "_vorigin",
            "_wcorig")

NAMES = [
    "pvc-0b5c1e4e-1111-2222-3333-444455556666",
    "a",
    "A",
    "x" * 128,
    "ü" * 64,  # 128 bytes
    "snapshot-1",
    "pvmove",
    "name with spaces/and/slashes",
    "-leading-dash",
    "_cdata",
    "vol_tmeta",
    "..",
    "日本語の名前",
    "a" * 48,
    "a" * 49,
]


def valid_lv_name(name: str) -> bool:
    return (bool(LVM_NAME.fullmatch(name)) and len(name) <= 48 and name not in (".", "..")
            and not name.startswith(("snapshot", "pvmove"))
            and not any(r in name for r in RESERVED))


@pytest.mark.parametrize("name", NAMES)
def test_every_csi_name_maps_to_a_valid_short_lv_name(name: str) -> None:
    for derived in (volume_lv_name(name), snapshot_lv_name(name),
                    temporary_lv_name(volume_lv_name(name))):
        assert valid_lv_name(derived) or (derived.startswith("snaptmp-") and len(derived) <= 56
                                          and valid_lv_name(derived[8:])), derived


def test_a_simple_pvc_name_is_kept_as_the_lv_name() -> None:
    name = "pvc-0b5c1e4e-1111-2222-3333-444455556666"
    assert volume_lv_name(name) == name


def test_lv_names_are_deterministic_and_distinct_across_names_and_kinds() -> None:
    names = NAMES + [f"pvc-{i}" for i in range(200)] + ["Pvc-1", "pvc 1", "pvc_1"]
    volumes = [volume_lv_name(n) for n in names]
    snapshots = [snapshot_lv_name(n) for n in names]
    assert volumes == [volume_lv_name(n) for n in names]
    assert len(set(volumes)) == len(names)
    assert len(set(snapshots)) == len(names)
    temporaries = [temporary_lv_name(v) for v in volumes]
    assert not set(volumes) & set(snapshots)
    assert not (set(volumes) | set(snapshots)) & set(temporaries)


def test_volume_and_snapshot_ids_parse_back_to_vg_and_lv() -> None:
    ref = parse_id("vg0/pvc-1")
    assert ref == LvRef("vg0", "pvc-1")
    assert ref.id == "vg0/pvc-1"
    assert ref.device_path == "/dev/vg0/pvc-1"


@pytest.mark.parametrize("bad", ["", "vg0", "/lv", "vg0/", "vg0/a/b", "vg 0/lv", "vg0/-x",
                                 "../x", "vg0/..", "reallyfakevolumeid"])
def test_malformed_ids_are_rejected(bad: str) -> None:
    with pytest.raises(InvalidId):
        parse_id(bad)


def test_tags_of_the_longest_name_and_a_large_context_are_valid_lvm_tags() -> None:
    tags = build_tags("local.csi.edge.io", kind="volume", csi_name="ü" * 64, created=1,
                      size=1 << 40, source="snapshot:vg0/snap-x_0123456789abcdef",
                      context={"mkfsOptions": "-E lazy_itable_init=0 " * 20,
                               "mountOptions": "noatime,discard"}, pending=True)
    assert all(is_valid_tag(t) for t in tags)
    own = read_tags(tags, "local.csi.edge.io")
    assert own.owned and own.pending and own.kind == "volume"
    assert own.name == "ü" * 64
    assert own.size == 1 << 40
    assert own.source_kind == "snapshot"
    assert own.source_id == "vg0/snap-x_0123456789abcdef"
    assert own.context["mountOptions"] == "noatime,discard"


def test_an_lv_without_our_owner_tag_is_not_ours() -> None:
    tags = build_tags("other.csi.edge.io", kind="volume", csi_name="x", created=1)
    assert not read_tags(tags, "local.csi.edge.io").owned
    assert read_tags(tags, "other.csi.edge.io").owned
    assert owner_tag("local.csi.edge.io") == "csi-lvm.edge.io/owner=local.csi.edge.io"


def test_a_tag_with_characters_lvm_refuses_is_invalid() -> None:
    assert not is_valid_tag("a b")
    assert not is_valid_tag("-x")
    assert not is_valid_tag("x" * 1025)
    assert is_valid_tag("csi-lvm.edge.io/owner=a.b-c_d+e:f&g#h!i")


def test_context_encoding_round_trips_and_rejects_garbage() -> None:
    ctx = {"fsType": "xfs", "mkfsOptions": "-m crc=1 'quoted value'"}
    assert decode_context(encode_context(ctx)) == ctx
    assert decode_context("!!!") is None
    assert decode_context(encode_context({}).replace("e", "")) in (None, {})


def test_option_strings_split_like_a_shell_and_a_mount_option_list() -> None:
    assert split_options("-E lazy_itable_init=0 -L 'my label'") == [
        "-E", "lazy_itable_init=0", "-L", "my label"]
    assert split_mount_options("noatime,discard") == ["noatime", "discard"]
    assert split_mount_options(" noatime  nodiratime ") == ["noatime", "nodiratime"]
    assert split_mount_options("") == []
