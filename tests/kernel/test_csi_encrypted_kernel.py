"""Encrypted volumes (StorageClass encrypted: "true") on live LVs, through the driver process.

For every volume kind (thick and thin, filesystem and raw block): CreateVolume writes a LUKS2
header (the raw LV starts with it), NodePublishVolume opens the dm-crypt mapping and the user's
data never reaches the LV in clear, online expansion grows LV, mapping and filesystem, stats
are healthy, the data reads back after a SIGKILL + restart of the driver and after a close and
re-open with the key unwrapped from the header's token, a snapshot restores into a volume that
is still encrypted and opens with its source's key, NodeUnpublishVolume closes the mapping,
and DeleteVolume leaves the LV's former extents with no header, no key token, no key slot and
no plaintext. Then: a root-key rotation re-wraps an open, mounted volume's key in the
background; a backend that cannot be reached at publish is UNAVAILABLE (and VolumeCondition
says so) until it is back; an HSM (SoftHSM2 over PKCS#11) wraps as well as the key file.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from csi_lvm.cryptsetup import Cryptsetup
from csi_lvm.encryption import mapper_name
from csi_lvm.mounter import Mounter
from csi_lvm.stats import block_device_size
from csi_lvm.volume_keys import TOKEN_TYPE, parse_token
from edge_common.commands import run
from edge_common.lvm import Lvm
from edge_proto.csi.v1 import csi_pb2
from kms_plugin.backends import local
from tests.kernel.test_csi_lifecycle import (
    POOL,
    DriverProcess,
    Kind,
    Lab,
    assert_healthy_stats,
    device_read,
    device_write,
    fs_total,
    results_dir,
    snapshot_source,
    write_file,
)
from tests.rigs.lvm import unique_vg_name

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(900)]

MiB = 1 << 20
HEADER = 1 * MiB  # csi_lvm.cryptsetup's LUKS2 header size
LUKS_MAGIC = b"LUKS\xba\xbe"
Code = grpc.StatusCode


@dataclass
class EncryptedDriver(DriverProcess):
    backends_file: str = ""
    rewrap_seconds: str = "3600"

    @property
    def argv(self) -> list[str]:
        return [*super().argv, "--encryption-backends-file", self.backends_file,
                "--encryption-rewrap-seconds", self.rewrap_seconds]


@dataclass
class ELab(Lab):
    keyring: Path | None = None


def _lab(lvm: Lvm, disks: list[str], tmp_path: Path, backends: dict[str, Any],
         keyring: Path | None) -> Iterator[ELab]:
    vg = unique_vg_name("enc")
    lvm.vgcreate(vg, disks[:2])
    lvm.create_thin_pool(vg, POOL, 512 * MiB)
    pods = tmp_path / "pods"
    pods.mkdir()
    backends_file = tmp_path / "backends.yaml"
    backends_file.write_text(json.dumps(backends))
    driver = EncryptedDriver(vg, results_dir(tmp_path) / f"csi-lvm-{vg}.log",
                             backends_file=str(backends_file))
    mounter = Mounter(timeout=120)
    try:
        driver.start()
        yield ELab(lvm, vg, driver, pods, mounter, keyring)
    finally:
        for m in reversed([m.mount_point for m in mounter.mounts()
                           if m.mount_point.startswith(str(pods) + "/")]):
            with contextlib.suppress(Exception):
                mounter.unmount_all(m)
        driver.stop()
        for name in os.listdir("/dev/mapper"):
            if name.startswith("csi-crypt-"):
                run(["cryptsetup", "close", name], timeout=60, check=False)
        lvm.command("vgremove", "--yes", "--force", "--", vg)


@pytest.fixture
def elab(kernel_disks: list[str], lvm: Lvm, tmp_path: Path) -> Iterator[ELab]:
    ring = tmp_path / "keyring.json"
    local.keygen(ring, "node-ring")
    yield from _lab(lvm, kernel_disks, tmp_path,
                    {"backends": {"node": {"type": "local", "keyring": str(ring)}}}, ring)


def raw_contains(device: str, needle: bytes, length: int) -> bool:
    """Does the device hold needle (read past the page cache of the LV's own node)?"""
    fd = os.open(device, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        tail, offset = b"", 0
        while offset < length:
            block = os.pread(fd, min(4 * MiB, length - offset), offset)
            if not block:
                break
            if needle in tail + block:
                return True
            tail = block[-(len(needle) - 1):]
            offset += len(block)
        return False
    finally:
        os.close(fd)


def token_of(lv_device: str) -> Any:
    return parse_token(Cryptsetup().export_token(lv_device))


def physical_extents(lab: Lab, volume_id: str) -> list[tuple[str, int, int]]:
    """(pv, byte offset, byte length) of each segment of a thick LV, in logical order."""
    vg = lab.lvm.get_vg(lab.vg)
    assert vg is not None
    out = run(["lvm", "pvs", "--noheadings", "--units", "b", "--nosuffix", "-o",
               "pv_name,pe_start"], timeout=120).stdout_text
    pe_start = {line.split()[0]: int(line.split()[1]) for line in out.splitlines() if line.strip()}
    segments = lab.lvm.command("lvs", "--noheadings", "--segments", "-o", "seg_pe_ranges",
                               "--", volume_id).stdout_text.split()
    spans = []
    for r in segments:
        pv, _, pes = r.rpartition(":")
        first, _, last = pes.partition("-")
        spans.append((pv, pe_start[pv] + int(first) * vg.extent_size,
                      (int(last) - int(first) + 1) * vg.extent_size))
    return spans


KINDS = [
    Kind("thick-ext4", "linear", "ext4", 48 * MiB, 64 * MiB),
    Kind("thin-ext4", "thin", "ext4", 48 * MiB, 64 * MiB),
    Kind("thick-block", "linear", "", 32 * MiB, 40 * MiB),
    Kind("thin-block", "thin", "", 32 * MiB, 40 * MiB),
]


def write_marker(target: str, block: bool, marker: bytes) -> None:
    if block:
        device_write(target, 0, marker)
        device_write(target, 3 * MiB, marker)
    else:
        write_file(f"{target}/data", marker * 16)


def read_marker(target: str, block: bool, marker: bytes) -> None:
    if block:
        assert device_read(target, 3 * MiB, len(marker)) == marker
    else:
        assert Path(f"{target}/data").read_bytes() == marker * 16


@pytest.mark.parametrize("kind", KINDS, ids=[k.label for k in KINDS])
def test_encrypted_volume_lifecycle(elab: ELab, kind: Kind) -> None:
    d = elab.driver
    block = not kind.fs_type
    vol = d.create(f"enc-{kind.label}", kind.size, [kind.cap], encrypted="true",
                   **kind.parameters())
    assert vol.volume_context["encrypted"] == "true"
    assert vol.volume_context["encryptionKeyBackend"] == "node"
    lv_dev = f"/dev/{vol.volume_id}"
    assert device_read(lv_dev, 0, 6) == LUKS_MAGIC
    token = token_of(lv_dev)
    mapping = f"/dev/mapper/{mapper_name(vol.volume_id)}"

    target = elab.target(kind.label)
    d.publish(vol, target, kind.cap)
    assert os.path.exists(mapping)
    marker = secrets.token_hex(32).encode() * 4  # 256 recognisable bytes
    write_marker(target, block, marker)
    assert not raw_contains(lv_dev, marker[:64], block_device_size(lv_dev))

    # Online expansion: LV, then the mapping, then the filesystem.
    before = block_device_size(target) if block else fs_total(target)
    assert d.expand(vol.volume_id, target, kind.grown) == kind.grown
    assert block_device_size(mapping) == kind.grown - HEADER
    assert (block_device_size(target) if block else fs_total(target)) > before
    assert_healthy_stats(elab, vol.volume_id, target, block=block)

    # A node plugin restart keeps the volume open and published; the data is there.
    d.restart_after_kill()
    d.publish(vol, target, kind.cap)
    read_marker(target, block, marker)
    # Unpublish closes the mapping; a new publish opens it with the token's key.
    d.unpublish(vol.volume_id, target)
    assert not os.path.exists(mapping) and not os.path.exists(target)
    d.publish(vol, target, kind.cap)
    read_marker(target, block, marker)

    # A snapshot restores into a volume that is still encrypted, with its source's key.
    snap = d.snapshot(f"enc-snap-{kind.label}", vol.volume_id)
    restored = d.create(f"enc-restored-{kind.label}", kind.grown, [kind.cap],
                        source=snapshot_source(snap.snapshot_id), **kind.parameters())
    assert restored.volume_context["encrypted"] == "true"
    assert device_read(f"/dev/{restored.volume_id}", 0, 6) == LUKS_MAGIC
    target2 = elab.target(kind.label + "-restored")
    d.publish(restored, target2, kind.cap)
    read_marker(target2, block, marker)
    d.unpublish(restored.volume_id, target2)
    d.delete(restored.volume_id)
    d.delete_snapshot(snap.snapshot_id)

    # DeleteVolume: crypto-erase, then lvremove.
    spans = physical_extents(elab, vol.volume_id) if kind.lvm_type == "linear" else []
    d.unpublish(vol.volume_id, target)
    d.delete(vol.volume_id)
    assert not os.path.exists(mapping)
    assert elab.owned_lvs() == []
    for pv, offset, _length in spans[:1]:  # the first logical extents hold the header
        fd = os.open(pv, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            head = os.pread(fd, HEADER, offset)
        finally:
            os.close(fd)
        assert head == bytes(HEADER), "the LUKS2 header area was not zeroed"
    for pv, offset, length in spans[:1]:
        with open(pv, "rb") as f:
            f.seek(offset)
            data = f.read(length)
        for needle in (LUKS_MAGIC, TOKEN_TYPE.encode(), token.wrapped, marker[:64]):
            assert needle not in data


def volume_source(volume_id: str) -> Any:
    return csi_pb2.VolumeContentSource(
        volume=csi_pb2.VolumeContentSource.VolumeSource(volume_id=volume_id))


FAMILY_KINDS = [KINDS[1], KINDS[2]]  # thin filesystem (thin snapshot), thick raw block


@pytest.mark.parametrize("kind", FAMILY_KINDS, ids=[k.label for k in FAMILY_KINDS])
def test_copies_still_open_and_read_back_after_their_source_is_crypto_erased(
        elab: ELab, kind: Kind) -> None:
    """A clone (and, for thin, a snapshot and a restore made from it after the source is
    gone) shares its source's data key but holds its own header, key slot and token: the
    source's crypto-erase must not touch them."""
    d = elab.driver
    block = not kind.fs_type
    src = d.create(f"fam-src-{kind.label}", kind.size, [kind.cap], encrypted="true",
                   **kind.parameters())
    target = elab.target(f"fam-src-{kind.label}")
    d.publish(src, target, kind.cap)
    marker = secrets.token_hex(32).encode() * 4
    write_marker(target, block, marker)
    d.unpublish(src.volume_id, target)
    snap = d.snapshot(f"fam-snap-{kind.label}", src.volume_id) if kind.lvm_type == "thin" \
        else None
    clone = d.create(f"fam-clone-{kind.label}", kind.size, [kind.cap],
                     source=volume_source(src.volume_id), **kind.parameters())
    assert clone.volume_context["encrypted"] == "true"
    src_token = token_of(f"/dev/{src.volume_id}")

    d.delete(src.volume_id)  # crypto-erase of the source: its header is zeroed
    assert src.volume_id not in [f"{lv.vg_name}/{lv.name}" for lv in elab.owned_lvs()]

    copies = [clone]
    if snap is not None:
        copies.append(d.create(f"fam-restore-{kind.label}", kind.size, [kind.cap],
                               source=snapshot_source(snap.snapshot_id), **kind.parameters()))
    for copy in copies:
        lv_dev = f"/dev/{copy.volume_id}"
        assert device_read(lv_dev, 0, 6) == LUKS_MAGIC, f"{copy.volume_id} lost its header"
        assert token_of(lv_dev) == src_token  # its own copy of the source's token
        copy_target = elab.target(f"fam-{copy.volume_id.replace('/', '-')}")
        d.publish(copy, copy_target, kind.cap)
        read_marker(copy_target, block, marker)
        d.unpublish(copy.volume_id, copy_target)
        d.delete(copy.volume_id)
    if snap is not None:
        d.delete_snapshot(snap.snapshot_id)
    assert elab.owned_lvs() == []


#: docs/operations.md "Encrypted volumes", step 3: the host LVM's filter for the mappings
CRYPT_FILTER = 'devices { global_filter = [ "r|^/dev/mapper/csi-crypt-|" ] }'


def pv_names(*config: str) -> set[str]:
    out = run(["lvm", "pvs", "--reportformat", "json", "-o", "pv_name", *config],
              timeout=120).stdout_text
    return {pv["pv_name"] for report in json.loads(out)["report"] for pv in report["pv"]}


def test_a_pv_label_a_tenant_writes_inside_is_hidden_from_lvm_by_the_documented_filter(
        elab: ELab) -> None:
    """LVM skips LVs but scans dm-crypt mappings: a tenant's PV label inside an open
    encrypted volume is seen by the host's LVM unless the node's filter rejects the mapping
    (under every name it has: /dev/mapper/..., /dev/dm-N)."""
    d = elab.driver
    kind = KINDS[2]
    vol = d.create("enc-tenant-pv", kind.size, [kind.cap], encrypted="true",
                   **kind.parameters())
    target = elab.target("tenant-pv")
    d.publish(vol, target, kind.cap)
    mapping = f"/dev/mapper/{mapper_name(vol.volume_id)}"
    dm_name = f"/dev/{os.path.basename(os.path.realpath(mapping))}"
    # what the tenant can write through its device (LVM itself writes the label here)
    run(["lvm", "pvcreate", "--yes", mapping], timeout=120)
    try:
        seen = pv_names()
        assert seen & {mapping, dm_name}, f"LVM does not see the tenant's PV: {seen}"
        hidden = pv_names("--config", CRYPT_FILTER)
        assert not hidden & {mapping, dm_name}, hidden
    finally:
        run(["lvm", "pvremove", "--yes", mapping], timeout=120, check=False)
    d.unpublish(vol.volume_id, target)
    d.delete(vol.volume_id)


def test_rotation_rewraps_an_open_volume_and_an_unreachable_backend_is_unavailable(
        elab: ELab) -> None:
    d = elab.driver
    d.rewrap_seconds = "3"  # the background round, often enough for a test
    d.restart_after_kill()
    cap = KINDS[0].cap
    vol = d.create("enc-rotate", 32 * MiB, [cap], encrypted="true")
    lv_dev = f"/dev/{vol.volume_id}"
    target = elab.target("rotate")
    d.publish(vol, target, cap)
    marker = secrets.token_hex(32).encode()
    write_marker(target, False, marker)
    old = token_of(lv_dev)

    assert elab.keyring is not None
    local.rotate(elab.keyring)
    deadline = time.monotonic() + 120
    while token_of(lv_dev).key == old.key:
        assert time.monotonic() < deadline, "the key was not re-wrapped in the background"
        time.sleep(1)
    new = token_of(lv_dev)
    assert new.key != old.key and new.wrapped != old.wrapped
    assert elab.mounter.find(target) is not None  # never unmounted
    write_marker(target, False, marker)

    d.unpublish(vol.volume_id, target)
    hidden = elab.keyring.with_suffix(".away")
    elab.keyring.rename(hidden)
    try:
        with pytest.raises(grpc.RpcError) as info:
            d.publish(vol, target, cap)
        assert info.value.code() is Code.UNAVAILABLE, info.value.details()
        got = d.controller.ControllerGetVolume(
            csi_pb2.ControllerGetVolumeRequest(volume_id=vol.volume_id), timeout=120)
        condition = got.status.volume_condition
        assert condition.abnormal and "cannot be unwrapped" in condition.message
        assert not os.path.exists(f"/dev/mapper/{mapper_name(vol.volume_id)}")
    finally:
        hidden.rename(elab.keyring)
    d.publish(vol, target, cap)  # the CO's retry, once the backend is back
    read_marker(target, False, marker)
    got = d.controller.ControllerGetVolume(
        csi_pb2.ControllerGetVolumeRequest(volume_id=vol.volume_id), timeout=120)
    assert not got.status.volume_condition.abnormal
    d.unpublish(vol.volume_id, target)
    d.delete(vol.volume_id)


@pytest.fixture
def hsm_lab(kernel_disks: list[str], lvm: Lvm, tmp_path: Path, softhsm: Any) -> Iterator[ELab]:
    from kms_plugin.backends.pkcs11 import Pkcs11Backend

    pin = tmp_path / "pin"
    pin.write_text(softhsm.user_pin + "\n")
    pin.chmod(0o600)
    options = {"module": softhsm.module, "token_label": softhsm.token_label,
               "key_label": f"csi-{secrets.token_hex(4)}", "pin_file": str(pin)}
    admin = Pkcs11Backend.from_options(options)
    admin.create_key_version(first=True)
    admin.close()
    yield from _lab(lvm, kernel_disks, tmp_path,
                    {"backends": {"hsm": {"type": "pkcs11", **options}}}, None)


def test_an_hsm_wrapped_raw_block_volume_opens_after_a_restart(hsm_lab: ELab) -> None:
    d = hsm_lab.driver
    kind = KINDS[3]
    vol = d.create("enc-hsm", kind.size, [kind.cap], encrypted="true",
                   encryptionKeyBackend="hsm", **kind.parameters())
    assert token_of(f"/dev/{vol.volume_id}").backend == "hsm"
    target = hsm_lab.target("hsm")
    d.publish(vol, target, kind.cap)
    marker = secrets.token_hex(32).encode()
    write_marker(target, True, marker)
    d.unpublish(vol.volume_id, target)
    d.restart_after_kill()
    d.publish(vol, target, kind.cap)
    read_marker(target, True, marker)
    d.unpublish(vol.volume_id, target)
    d.delete(vol.volume_id)
    assert hsm_lab.owned_lvs() == []
