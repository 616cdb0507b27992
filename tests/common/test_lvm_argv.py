"""The command lines edge_common.lvm builds, recorded by a fake lvm: prefix and extra
arguments placement, no force flags, --yes only where it is safe, activation arguments."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from edge_common.lvm import Lvm, LvmSettings

Recorder = Callable[..., tuple[Lvm, Callable[[], list[str]]]]


@pytest.fixture
def recorder(tmp_path: Path) -> Recorder:
    def make(
        extra_args: tuple[str, ...] = (), config: str | None = None
    ) -> tuple[Lvm, Callable[[], list[str]]]:
        out = tmp_path / "argv"
        script = f'printf "%s\\n" "$@" > {out}; printf \'{{"report": []}}\''
        lvm = Lvm(
            LvmSettings(
                command=("sh", "-c", script, "lvm"),
                extra_args=extra_args,
                config=config,
            )
        )
        return lvm, lambda: out.read_text().splitlines()

    return make


FORCE = {"-f", "-ff", "--force"}


def test_extra_args_and_config_follow_the_subcommand(recorder: Recorder) -> None:
    lvm, argv = recorder(extra_args=("--driverloaded", "n"), config="devices { }")
    lvm.vgs(["vg1"])
    got = argv()
    assert got[:5] == ["vgs", "--driverloaded", "n", "--config", "devices { }"]
    assert got[-2:] == ["--", "vg1"]
    assert {"--reportformat", "json", "--units", "b", "--nosuffix"} <= set(got)


def test_pvcreate_vgcreate_vgextend_never_force_nor_answer_yes(recorder: Recorder) -> None:
    lvm, argv = recorder()
    lvm.pvcreate(["/dev/loop7"])
    assert argv() == ["pvcreate", "--", "/dev/loop7"]
    lvm.vgcreate("vg1", ["/dev/loop7", "/dev/loop8"], tags=("a",))
    assert argv() == ["vgcreate", "--addtag", "a", "--", "vg1", "/dev/loop7", "/dev/loop8"]
    lvm.vgextend("vg1", ["/dev/loop9"])
    assert argv() == ["vgextend", "--", "vg1", "/dev/loop9"]


def test_lvcreate_with_activation_wipes_and_zeroes_and_answers_yes(recorder: Recorder) -> None:
    lvm, argv = recorder()
    lvm.lvcreate("vg1", "lv", 1 << 20, tags=("t",))
    got = argv()
    assert got[0] == "lvcreate"
    assert "--yes" in got and not FORCE & set(got)
    joined = " ".join(got)
    assert "--size 1048576b" in joined
    assert "--activate y --zero y --wipesignatures y" in joined
    assert "--addtag t" in joined
    assert got[-2:] == ["--", "vg1"]


def test_lvcreate_without_device_mapper_creates_inactive_without_zeroing(
    recorder: Recorder,
) -> None:
    lvm, argv = recorder(extra_args=("--driverloaded", "n"))
    lvm.lvcreate("vg1", "lv", 1 << 20)
    assert "--activate n --zero n --wipesignatures n" in " ".join(argv())


def test_lvcreate_inactive_always_says_no_zero_and_no_wipe(recorder: Recorder) -> None:
    # lvm 2.03 exits 0 WITHOUT creating the LV for "-an -Zy": never let that happen.
    lvm, argv = recorder()
    lvm.lvcreate("vg1", "lv", 1 << 20, activate=False, zero=True)
    assert "--activate n --zero n --wipesignatures n" in " ".join(argv())


def test_lvcreate_striped_and_thin_arguments(recorder: Recorder) -> None:
    lvm, argv = recorder()
    lvm.lvcreate("vg1", "s", 1 << 20, stripes=2, stripe_size=65536)
    assert "--stripes 2 --stripesize 65536b" in " ".join(argv())
    lvm.lvcreate("vg1", "t", 1 << 30, thin_pool="pool")
    joined = " ".join(argv())
    assert "--virtualsize 1073741824b --thinpool pool" in joined and "--size" not in joined


def test_sizes_are_rounded_up_to_whole_sectors(recorder: Recorder) -> None:
    lvm, argv = recorder()
    lvm.lvextend("vg1", "lv", 1000)
    assert argv() == ["lvextend", "--size", "1024b", "--", "vg1/lv"]


def test_thin_pool_and_snapshot_arguments(recorder: Recorder) -> None:
    lvm, argv = recorder()
    lvm.create_thin_pool("vg1", "pool", 1 << 30, metadata_size=1 << 22)
    joined = " ".join(argv())
    assert "--type thin-pool" in joined and "--poolmetadatasize 4194304b" in joined
    lvm.create_snapshot("vg1", "origin", "snap")
    assert argv()[-2:] == ["--", "vg1/origin"] and "--size" not in argv()
    lvm.create_snapshot("vg1", "origin", "snap2", size_bytes=1 << 20)
    assert "--snapshot" in argv() and "--size" in argv()


def test_lv_changes_address_vg_slash_lv(recorder: Recorder) -> None:
    lvm, argv = recorder()
    lvm.lvremove("vg1", "lv")
    assert argv() == ["lvremove", "--yes", "--", "vg1/lv"]
    lvm.lvrename("vg1", "a", "b")
    assert argv() == ["lvrename", "--", "vg1", "a", "b"]
    lvm.addtag("vg1", "lv", ["x", "y"])
    assert argv() == ["lvchange", "--addtag", "x", "--addtag", "y", "--", "vg1/lv"]
    lvm.deltag("vg1", "lv", ["x"])
    assert argv() == ["lvchange", "--deltag", "x", "--", "vg1/lv"]
    lvm.activate("vg1", "lv", ignore_skip=True)
    assert argv() == ["lvchange", "--activate", "y", "--ignoreactivationskip", "--", "vg1/lv"]
    lvm.deactivate("vg1", "lv")
    assert argv() == ["lvchange", "--activate", "n", "--", "vg1/lv"]


@pytest.mark.parametrize("bad", ["", "-rf", "a/b", "--force"])
def test_option_or_path_looking_names_are_refused_before_running(
    recorder: Recorder, bad: str
) -> None:
    lvm, _ = recorder()
    with pytest.raises(ValueError):
        lvm.lvcreate("vg1", bad, 1 << 20)
    with pytest.raises(ValueError):
        lvm.get_vg(bad)


def test_a_string_where_a_list_is_expected_is_refused(recorder: Recorder) -> None:
    lvm, _ = recorder()
    with pytest.raises(TypeError):
        lvm.pvcreate("/dev/loop1")
    with pytest.raises(TypeError):
        lvm.addtag("vg1", "lv", "tag")


def test_settings_accept_lists_and_detect_disabled_activation() -> None:
    settings = LvmSettings(command=["nsenter", "-t", "1", "-m", "--", "lvm"], extra_args=[])
    assert settings.command == ("nsenter", "-t", "1", "-m", "--", "lvm")
    assert not settings.activation_disabled
    assert LvmSettings(extra_args=["--driverloaded", "n"]).activation_disabled
    assert LvmSettings(extra_args=["--driverloaded=n"]).activation_disabled
    assert not LvmSettings(extra_args=["--driverloaded", "y"]).activation_disabled
    with pytest.raises(ValueError):
        LvmSettings(command=())
