"""StorageClass parameters and capacity arithmetic (csi_lvm.params)."""

from __future__ import annotations

import pytest

from csi_lvm.params import (
    LvmType,
    check_snapshot_params,
    choose_size,
    parse_quantity,
    parse_snapshot_size,
    parse_volume_params,
)
from edge_common.errors import InvalidArgument, OutOfRange

MiB = 1 << 20


def params(p: dict[str, str], fs: list[str] | None = None, mount: bool = True) -> object:
    return parse_volume_params(p, default_vg="vg0", default_thin_pool="", default_wipe="none",
                               capability_fs_types=fs or [], has_mount=mount)


def test_defaults_are_a_linear_ext4_volume_in_the_default_vg() -> None:
    p = params({})
    assert p.vg == "vg0" and p.lvm_type is LvmType.LINEAR and p.fs_type == "ext4"  # type: ignore[attr-defined]


def test_block_only_volumes_have_no_filesystem_type() -> None:
    assert params({}, mount=False).fs_type == ""  # type: ignore[attr-defined]


@pytest.mark.parametrize("bad", [
    {"vgname": "x"},  # a typo is refused, not ignored
    {"lvmType": "raid1"},
    {"lvmType": "striped", "stripes": "1"},
    {"lvmType": "striped", "stripes": "two"},
    {"lvmType": "striped", "stripeSize": "3Ki"},
    {"stripes": "2"},
    {"lvmType": "thin"},
    {"thinPool": "pool"},
    {"fsType": "ntfs"},
    {"vgName": "bad/name"},
    {"wipeOnDelete": "shred"},
    {"mkfsOptions": "-L 'unterminated"},
    {"mountOptions": "x" * 600},
])
def test_bad_storageclass_parameters_are_invalid_argument(bad: dict[str, str]) -> None:
    with pytest.raises(InvalidArgument):
        params(bad)


def test_sidecar_parameters_are_accepted_and_fstype_key_sets_the_filesystem() -> None:
    p = params({"csi.storage.k8s.io/pvc/name": "x", "csi.storage.k8s.io/fstype": "xfs"})
    assert p.fs_type == "xfs"  # type: ignore[attr-defined]


def test_conflicting_filesystem_types_are_invalid_argument() -> None:
    with pytest.raises(InvalidArgument):
        params({"fsType": "xfs"}, fs=["ext4"])


def test_striped_and_thin_parameters_are_parsed() -> None:
    s = params({"lvmType": "striped", "stripes": "3", "stripeSize": "64Ki"})
    assert (s.stripes, s.stripe_size) == (3, 64 << 10)  # type: ignore[attr-defined]
    t = params({"lvmType": "thin", "thinPool": "pool0"})
    assert t.thin_pool == "pool0"  # type: ignore[attr-defined]


def test_quantities_use_kubernetes_suffixes() -> None:
    assert parse_quantity("4096", "x") == 4096
    assert parse_quantity("64Ki", "x") == 65536
    assert parse_quantity("1Gi", "x") == 1 << 30
    assert parse_quantity("500M", "x") == 500_000_000
    with pytest.raises(InvalidArgument):
        parse_quantity("1.5Gi", "x")


def test_required_bytes_round_up_to_the_allocation_unit() -> None:
    assert choose_size(10 * MiB, 0, 4 * MiB, 1 << 30) == 12 * MiB
    assert choose_size(8 * MiB, 8 * MiB, 4 * MiB, 1 << 30) == 8 * MiB


def test_rounding_above_the_limit_is_out_of_range() -> None:
    with pytest.raises(OutOfRange):
        choose_size(10 * MiB, 11 * MiB, 4 * MiB, 1 << 30)


def test_a_limit_alone_caps_the_default_size() -> None:
    assert choose_size(0, 10 * MiB, 4 * MiB, 1 << 30) == 8 * MiB
    with pytest.raises(OutOfRange):
        choose_size(0, 3 * MiB, 4 * MiB, 1 << 30)


def test_no_range_gives_the_default_size_and_a_source_sets_the_minimum() -> None:
    assert choose_size(0, 0, 4 * MiB, 16 * MiB) == 16 * MiB
    assert choose_size(0, 0, 4 * MiB, 16 * MiB, minimum=40 * MiB) == 40 * MiB
    with pytest.raises(OutOfRange):
        choose_size(8 * MiB, 8 * MiB, 4 * MiB, 16 * MiB, minimum=40 * MiB)


def test_negative_or_inverted_ranges_are_invalid_argument() -> None:
    with pytest.raises(InvalidArgument):
        choose_size(-1, 0, 4 * MiB, 1)
    with pytest.raises(InvalidArgument):
        choose_size(10 * MiB, 5 * MiB, 4 * MiB, 1)


def test_thick_snapshot_size_from_the_snapshot_class() -> None:
    assert parse_snapshot_size({}, 100 * MiB, 4 * MiB, 100) == 100 * MiB
    assert parse_snapshot_size({"snapshotSize": "20%"}, 100 * MiB, 4 * MiB, 100) == 20 * MiB
    assert parse_snapshot_size({"snapshotSize": "10Mi"}, 100 * MiB, 4 * MiB, 100) == 12 * MiB
    assert parse_snapshot_size({"snapshotSize": "1%"}, 10 * MiB, 4 * MiB, 100) == 4 * MiB
    with pytest.raises(InvalidArgument):
        parse_snapshot_size({"snapshotSize": "150%"}, MiB, MiB, 100)
    with pytest.raises(InvalidArgument):
        check_snapshot_params({"size": "1Gi"})
