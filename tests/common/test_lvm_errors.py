"""Error classification of edge_common.lvm, driven by a fake lvm (a command prefix that is a
tiny shell script): exit codes, messages, timeouts and unreadable output."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from edge_common.lvm import (
    Lvm,
    LvmCommandNotFound,
    LvmError,
    LvmOutputError,
    LvmSettings,
    LvmTimeout,
)


def fake_lvm(script: str, timeout: float = 30.0) -> Lvm:
    """An Lvm whose command prefix runs ``script`` with lvm's arguments in "$@"."""
    return Lvm(LvmSettings(command=("sh", "-c", script, "fake-lvm"), timeout=timeout))


def failing(exit_code: int, stderr: str) -> Lvm:
    return fake_lvm(f"printf '%s\\n' {shlex.quote(stderr)} >&2; exit {exit_code}")


def printing(stdout: str) -> Lvm:
    return fake_lvm(f"printf '%s' {shlex.quote(stdout)}")


VG_ROW = {
    "vg_name": "vg1",
    "vg_uuid": "u",
    "vg_size": "1048576",
    "vg_free": "0",
    "vg_extent_size": "4194304",
    "vg_extent_count": "1",
    "vg_free_count": "0",
    "pv_count": "1",
    "lv_count": "0",
    "vg_tags": "",
}


def test_exit_5_with_vg_not_found_message_makes_get_vg_none() -> None:
    lvm = failing(5, '  Volume group "vg1" not found\n  Cannot process volume group vg1')
    assert lvm.get_vg("vg1") is None


def test_exit_5_with_failed_to_find_lv_makes_get_lv_none() -> None:
    assert failing(5, '  Failed to find logical volume "vg1/lv"').get_lv("vg1", "lv") is None


def test_exit_5_without_a_not_found_message_is_an_error_not_absence() -> None:
    lvm = failing(5, "  Internal error: something else went wrong")
    with pytest.raises(LvmError) as info:
        lvm.get_vg("vg1")
    assert info.value.exit_code == 5
    assert not info.value.is_not_found()
    assert "something else went wrong" in info.value.stderr


def test_cannot_process_volume_group_alone_is_not_not_found() -> None:
    # lvm prints this line after ANY failure to process a VG (locking, metadata errors...).
    lvm = failing(5, "  Cannot process volume group vg1")
    with pytest.raises(LvmError) as info:
        lvm.get_vg("vg1")
    assert not info.value.is_not_found()


def test_not_found_message_with_another_exit_code_is_not_not_found() -> None:
    lvm = failing(3, '  Volume group "vg1" not found')
    with pytest.raises(LvmError) as info:
        lvm.get_vg("vg1")
    assert not info.value.is_not_found()


@pytest.mark.parametrize(
    "stderr",
    [
        '  Volume group "vg1" has insufficient free space (3 extents): 256 required.',
        "  Insufficient suitable allocatable extents for logical volume lv: 2 more required",
    ],
)
def test_no_space_messages_are_no_space(stderr: str) -> None:
    with pytest.raises(LvmError) as info:
        failing(5, stderr).lvcreate("vg1", "lv", 1 << 30)
    assert info.value.is_no_space()
    assert not info.value.is_not_found()
    assert not info.value.is_already_exists()


def test_already_exists_message_is_already_exists() -> None:
    stderr = '  Logical Volume "lv" already exists in volume group "vg1"'
    with pytest.raises(LvmError) as info:
        failing(5, stderr).lvcreate("vg1", "lv", 1 << 20)
    assert info.value.is_already_exists()
    assert not info.value.is_no_space()


def test_error_message_names_the_command_and_drops_routine_warnings() -> None:
    stderr = (
        "  WARNING: Activation disabled. No device-mapper interaction will be attempted.\n"
        "  Real problem here"
    )
    with pytest.raises(LvmError) as info:
        failing(5, stderr).lvremove("vg1", "lv")
    message = str(info.value)
    assert "lvremove" in message and "Real problem here" in message
    assert "Activation disabled" not in message
    assert "Activation disabled" in info.value.stderr  # kept in full for the logs


def test_timeout_raises_lvm_timeout_with_unknown_state() -> None:
    lvm = fake_lvm("sleep 30")
    with pytest.raises(LvmTimeout) as info:
        lvm.vgs(timeout=0.3)
    assert isinstance(info.value, LvmError)
    assert info.value.exit_code is None
    assert not info.value.is_not_found()
    assert "unknown" in str(info.value)


def test_default_timeout_comes_from_settings() -> None:
    with pytest.raises(LvmTimeout):
        fake_lvm("sleep 30", timeout=0.3).lvremove("vg1", "lv")


def test_get_vg_on_timeout_raises_instead_of_returning_none() -> None:
    with pytest.raises(LvmTimeout):
        fake_lvm("sleep 30", timeout=0.3).get_vg("vg1")


def test_missing_lvm_binary_is_command_not_found_error() -> None:
    lvm = Lvm(LvmSettings(command=("/nonexistent/lvm",)))
    with pytest.raises(LvmCommandNotFound) as info:
        lvm.vgs()
    assert isinstance(info.value, LvmError)
    assert not info.value.is_not_found()


@pytest.mark.parametrize(
    "stdout",
    [
        "garbage",
        "",
        "[]",
        '{"report": {}}',
        '{"report": [{"vg": "x"}]}',
        '{"report": [{"vg": [{"vg_name": "vg1"}]}]}',  # fields missing
        json.dumps({"report": [{"vg": [{**VG_ROW, "vg_size": "12.5"}]}]}),
        json.dumps({"report": [{"vg": [{**VG_ROW, "vg_size": 100}]}]}),  # not a string
        json.dumps({"report": [{"vg": [{**VG_ROW, "vg_name": ""}]}]}),
    ],
)
def test_unreadable_vgs_output_raises_lvm_error_never_absent(stdout: str) -> None:
    lvm = printing(stdout)
    with pytest.raises(LvmOutputError):
        lvm.vgs()
    with pytest.raises(LvmError):
        lvm.get_vg("vg1")


def test_get_vg_with_no_row_for_the_vg_is_an_error_not_none() -> None:
    lvm = printing(json.dumps({"report": [{"vg": []}]}))
    with pytest.raises(LvmError):
        lvm.get_vg("vg1")


def test_get_vg_reads_the_row_of_the_vg() -> None:
    vg = printing(json.dumps({"report": [{"vg": [VG_ROW]}]})).get_vg("vg1")
    assert vg is not None and vg.size == 1048576 and vg.tags == ()


def test_bad_lv_attr_is_an_output_error() -> None:
    row = {
        "lv_name": "lv",
        "vg_name": "vg1",
        "lv_uuid": "u",
        "lv_size": "4194304",
        "lv_attr": "-wi-",
        "lv_tags": "",
        "pool_lv": "",
        "origin": "",
        "data_percent": "",
        "metadata_percent": "",
        "segtype": "linear",
        "stripes": "1",
        "seg_start": "0",
    }
    with pytest.raises(LvmOutputError):
        printing(json.dumps({"report": [{"lv": [row]}]})).lvs("vg1")


def test_unreadable_report_output_is_an_error() -> None:
    with pytest.raises(LvmOutputError):
        printing('{"report": [{"lv": [{"lv_name": "x"}]}]}').report()


def test_env_suppresses_fd_warnings_and_adds_settings_env(tmp_path: Path) -> None:
    out = tmp_path / "env"
    script = f'printf %s "$LVM_SUPPRESS_FD_WARNINGS,$EXTRA" > {out}'
    lvm = Lvm(LvmSettings(command=("sh", "-c", script, "lvm"), env=[("EXTRA", "x")]))
    lvm.lvremove("vg1", "lv")
    assert out.read_text() == "1,x"
