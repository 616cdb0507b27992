"""Host-side pieces of the runner: the job script, qemu's command line, the console, the CLI."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kernel_guest import protocol, udevd
from kernel_guest.artifacts import GuestImage, Package, parse_kernel_dependency
from kernel_guest.cli import guest_argv, main, parse_size, split_command
from kernel_guest.runner import (
    EXIT_UNAVAILABLE,
    ConsoleFollower,
    GuestOptions,
    disk_names,
    guest_environment,
    guest_job_timeout,
    job_script,
    qemu_argv,
    remove_stale_scratch,
    results_directory,
    strip_terminal_codes,
)


def test_job_script_writes_lvm_conf_sets_env_and_runs_argv_verbatim(tmp_path: Path) -> None:
    workdir = tmp_path / "dir with space"
    workdir.mkdir()
    out = tmp_path / "out.json"
    tricky = 'it\'s $HOME `x` "q"'
    probe = (
        "import json, os, sys; json.dump({'argv': sys.argv[1:], 'cwd': os.getcwd(), "
        f"'env': dict(os.environ)}}, open({str(out)!r}, 'w'))"
    )
    env = guest_environment(Path(sys.executable), disk_names(2), {"EXTRA": "a b"})
    script = job_script(
        [sys.executable, "-c", probe, tricky, ""],
        cwd=workdir,
        env=env,
        lvm_conf=str(tmp_path / "etc/lvm/lvm.conf"),
        share=str(tmp_path / "share"),
        udevd=False,  # never on this host: it would complete this machine's cookies
    )
    subprocess.run(["/bin/sh", "-c", script], check=True, timeout=60, env={})
    seen = json.loads(out.read_text())
    assert seen["argv"] == [tricky, ""]
    assert seen["cwd"] == str(workdir)
    assert seen["env"]["EDGE_GUEST"] == "1"
    assert seen["env"]["EDGE_GUEST_DISKS"] == "/dev/vda,/dev/vdb"
    assert seen["env"]["EXTRA"] == "a b"
    assert seen["env"]["PATH"].startswith(str(Path(sys.executable).parent) + ":")
    conf = (tmp_path / "etc/lvm/lvm.conf").read_text()
    for setting in ("obtain_device_list_from_udev = 0", "udev_sync = 1", "udev_rules = 0",
                    "use_devicesfile = 0", "event_activation = 0", "monitoring = 0",
                    'external_device_info_source = "none"'):  # fmt: skip
        assert setting in conf
    assert (tmp_path / "share/artifacts").is_dir()


def test_job_script_starts_the_udev_stand_in_and_waits_for_it_before_the_job(
    tmp_path: Path,
) -> None:
    script = job_script(["pytest"], cwd=tmp_path, env={})
    lines = script.splitlines()
    start = next(i for i, line in enumerate(lines) if "-m kernel_guest.udevd" in line)
    wait = next(i for i, line in enumerate(lines) if "/run/udev/control" in line)
    job = next(i for i, line in enumerate(lines) if line.startswith("exec "))
    assert start < wait < job
    assert lines[start].endswith("&")


def test_the_udev_stand_in_completes_exactly_the_device_mapper_cookies() -> None:
    dm = b"change@/devices/virtual/block/dm-3\0ACTION=change\0SUBSYSTEM=block\0" \
         b"DEVNAME=dm-3\0DM_COOKIE=223171523\0"
    event = udevd.parse_uevent(dm)
    assert event["DM_COOKIE"] == "223171523" and event["DEVNAME"] == "dm-3"
    assert udevd.cookie_of(event) == "223171523"
    assert udevd.cookie_of({**event, "DM_COOKIE": "0"}) is None
    assert udevd.cookie_of({**event, "DEVNAME": "vda"}) is None
    assert udevd.cookie_of({**event, "SUBSYSTEM": "bdi"}) is None
    assert udevd.cookie_of(udevd.parse_uevent(b"add@/devices/x\0SUBSYSTEM=block\0")) is None


def test_job_script_rejects_a_bad_variable_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        job_script(["true"], cwd=tmp_path, env={"BAD-NAME": "x"})


def test_disks_are_named_in_virtio_order() -> None:
    assert disk_names(3) == ["/dev/vda", "/dev/vdb", "/dev/vdc"]
    assert disk_names(0) == []
    with pytest.raises(ValueError):
        disk_names(27)


def _image(tmp_path: Path) -> GuestImage:
    return GuestImage(
        Package("linux-image-x", "1"), tmp_path / "vmlinux", tmp_path / "initrd", "6.1", ()
    )


def test_qemu_gets_one_raw_virtio_drive_per_disk_and_both_shares(tmp_path: Path) -> None:
    disks = [tmp_path / "d0.img", tmp_path / "d1.img"]
    argv = qemu_argv(_image(tmp_path), share=tmp_path / "share", disks=disks,
                     options=GuestOptions())  # fmt: skip
    drives = [argv[i + 1] for i, a in enumerate(argv) if a == "-drive"]
    assert drives == [f"file={d},if=virtio,format=raw,cache=unsafe" for d in disks]
    virtfs = [argv[i + 1] for i, a in enumerate(argv) if a == "-virtfs"]
    assert any("path=/," in v and "readonly=on" in v and protocol.HOST_ROOT_TAG in v
               for v in virtfs)  # fmt: skip
    assert any(f"path={tmp_path / 'share'}," in v and "readonly" not in v for v in virtfs)
    for flag in ("-no-reboot", "-nographic"):
        assert flag in argv
    assert argv[argv.index("-accel") + 1] == "tcg"
    append = argv[argv.index("-append") + 1]
    assert "console=ttyS0" in append and "panic=-1" in append


def test_a_disk_path_with_a_comma_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        qemu_argv(_image(tmp_path), share=tmp_path, disks=[tmp_path / "a,b.img"],
                  options=GuestOptions())  # fmt: skip


def test_console_follower_echoes_clean_lines_and_sees_the_markers(tmp_path: Path) -> None:
    out = io.StringIO()
    follower = ConsoleFollower(tmp_path / "console.log", out)
    follower._feed("\x1bc\x1b[2JSeaBIOS\r\nkernel-guest: KERNEL_GUEST_JOB_")
    assert follower.job_started_at is None
    follower._feed("START at 4.58s\r\nhello\r\nkernel-guest: KERNEL_GUEST_EXIT=3 at 9s\r\n")
    assert follower.job_started_at is not None
    assert follower.guest_uptime_at_start == 4.58
    assert follower.exit_marker == 3
    assert not follower.guest_timed_out
    follower._feed(f"kernel-guest: {protocol.TIMEOUT_MARKER}: the job ran out of its 5s\n")
    assert follower.guest_timed_out
    assert out.getvalue().splitlines() == [
        "SeaBIOS",
        "kernel-guest: KERNEL_GUEST_JOB_START at 4.58s",
        "hello",
        "kernel-guest: KERNEL_GUEST_EXIT=3 at 9s",
        f"kernel-guest: {protocol.TIMEOUT_MARKER}: the job ran out of its 5s",
    ]


def test_strip_terminal_codes_keeps_text() -> None:
    assert strip_terminal_codes("\x1b[0ma\x1b[?7lb\x1bcc") == "abc"


def test_results_directory_is_emptied_of_our_files_only(tmp_path: Path) -> None:
    results = tmp_path / "kernel"
    (results / "artifacts").mkdir(parents=True)
    (results / "artifacts" / "old").write_text("x")
    (results / "console.log").write_text("old run")
    (results / "keep.txt").write_text("not ours")
    with results_directory(results) as got:
        assert got == results
        assert not (results / "console.log").exists()
        assert not (results / "artifacts").exists()
        assert (results / "keep.txt").exists()


def test_a_busy_results_directory_gives_a_sibling(tmp_path: Path) -> None:
    results = tmp_path / "kernel"
    with results_directory(results) as first, results_directory(results) as second:
        assert first == results
        assert second != results and second.parent == results.parent
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [".kernel.lock"]


def test_kernel_version_comes_from_the_meta_package_dependency() -> None:
    assert parse_kernel_dependency("linux-image-6.1.0-56-amd64 (= 6.1.192-2)") == Package(
        "linux-image-6.1.0-56-amd64", "6.1.192-2"
    )
    assert parse_kernel_dependency("initramfs-tools | linux-initramfs-tool") is None


def test_package_key_is_file_name_safe() -> None:
    key = Package("busybox-static", "1:1.35.0-4+deb12u1").key
    assert key == "busybox-static_1_1.35.0-4+deb12u1"


def test_runner_options_and_guest_command_are_split_at_the_subcommand() -> None:
    assert split_command(["--timeout", "60", "pytest", "-q", "-k", "run"]) == (
        ["--timeout", "60"], "pytest", ["-q", "-k", "run"],
    )  # fmt: skip
    assert split_command(["--disks", "3"]) == (["--disks", "3"], None, [])


def test_pytest_in_the_guest_selects_kernel_tests_and_writes_junit() -> None:
    argv = guest_argv("pytest", [], Path("/repo/.venv/bin/python"))
    assert argv[:5] == ["/repo/.venv/bin/python", "-m", "pytest", "-m", "kernel"]
    assert f"--junitxml={protocol.GUEST_SHARE}/junit.xml" in argv
    assert argv[-1] == "tests/kernel"
    assert guest_argv("run", ["--", "ls", "-l"], Path("/p")) == ["ls", "-l"]


@pytest.mark.parametrize(
    ("text", "size"), [("8G", 8 << 30), ("512M", 512 << 20), ("4096", 4096), ("1GiB", 1 << 30)]
)
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_the_guest_limit_leaves_the_host_time_to_collect_the_report() -> None:
    assert guest_job_timeout(900) == 840
    assert guest_job_timeout(60) == 45
    assert guest_job_timeout(1) >= 0
    for timeout in (10, 100, 1000, 5000):
        assert guest_job_timeout(timeout) < timeout


def test_append_carries_the_guest_limit(tmp_path: Path) -> None:
    argv = qemu_argv(_image(tmp_path), share=tmp_path, disks=[], options=GuestOptions(timeout=300))
    assert f"{protocol.TIMEOUT_PARAM}=240" in argv[argv.index("-append") + 1].split()


def test_a_job_under_the_hosts_tmp_keeps_the_hosts_tmp_visible(tmp_path: Path) -> None:
    def append(cwd: Path) -> list[str]:
        argv = qemu_argv(_image(tmp_path), share=tmp_path, disks=[],
                         options=GuestOptions(cwd=cwd))  # fmt: skip
        return argv[argv.index("-append") + 1].split()

    assert f"{protocol.HOST_TMP_PARAM}=1" in append(Path("/tmp/ci-checkout"))
    assert f"{protocol.HOST_TMP_PARAM}=1" not in append(Path("/work/main"))


def test_scratch_of_a_dead_runner_is_removed_and_live_ones_are_kept(tmp_path: Path) -> None:
    dead_pid = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1  # can never exist
    dead = tmp_path / f"kernel-guest-{dead_pid}-abc"
    alive = tmp_path / f"kernel-guest-{os.getpid()}-def"
    unrelated = tmp_path / "kernel-guest-notapid"
    for directory in (dead, alive, unrelated):
        directory.mkdir()
        (directory / "disk0.img").write_bytes(b"x")
    remove_stale_scratch(tmp_path)
    assert not dead.exists()
    assert alive.exists() and unrelated.exists()


def test_missing_qemu_fails_fast_naming_the_package(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing to find there
    monkeypatch.setenv("KERNEL_GUEST_CACHE", str(tmp_path / "cache"))
    assert main(["run", "--", "true"]) == EXIT_UNAVAILABLE
    err = capsys.readouterr().err
    assert "qemu-system-x86_64 not found" in err and "qemu-system-x86" in err
    assert not (tmp_path / "cache").exists(), "nothing is downloaded before qemu is found"


def test_old_initramfs_builds_are_pruned_but_the_current_and_recent_ones_kept(
    tmp_path: Path,
) -> None:
    from kernel_guest.artifacts import _prune_initramfs

    current = tmp_path / "initramfs-aaaa.cpio"
    recent = tmp_path / "initramfs-bbbb.cpio"
    old = tmp_path / "initramfs-cccc.cpio"
    for path in (current, recent, old):
        path.write_bytes(b"x")
    os.utime(old, (1, 1))
    os.utime(current, (1, 1))
    assert _prune_initramfs(tmp_path, keep=current) == ["cccc"]
    assert current.exists() and recent.exists() and not old.exists()
