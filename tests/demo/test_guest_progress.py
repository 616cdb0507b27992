"""The progress the demo shows while the qemu guest runs is read from the guest's console;
these pin the markers it looks for to what kernel_guest's /init and the guest job print."""

from __future__ import annotations

from pathlib import Path

from edge_demo.csi import PHASES, guest_phase
from kernel_guest import protocol
from kernel_guest.initramfs import INIT_SCRIPT


def test_every_boot_marker_the_demo_follows_is_printed_by_the_guest_init() -> None:
    for marker, _ in PHASES:
        assert marker in INIT_SCRIPT or marker == protocol.START_MARKER, marker


def test_guest_progress_follows_boot_then_the_steps_of_the_guest_job(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    assert "preparing" in guest_phase(log)  # no console yet: the runner is still preparing
    log.write_text("")
    assert guest_phase(log) == "starting qemu"
    log.write_text("SeaBIOS\nkernel-guest: init started at 4.1s\n")
    assert guest_phase(log) == "kernel booted, loading modules"
    log.write_text(log.read_text() + "kernel-guest: modules loaded at 8.6s\n"
                   f"kernel-guest: {protocol.START_MARKER} at 9.2s\n")
    assert guest_phase(log) == "starting Python in the guest"
    log.write_text(log.read_text() + "  > NodePublishVolume (mkfs.ext4, mount) ...\r\n"
                   "  ok NodePublishVolume (mkfs.ext4, mount) - mounted (3.2s)\n")
    assert guest_phase(log) == "guest: NodePublishVolume (mkfs.ext4, mount)"
