"""Encrypted volumes on the host: parameters, backends file, key token format, key wrapping with
the KMS plugin's three backends (local keyring, SoftHSM2 over PKCS#11, the fake AWS KMS), and
the LUKS2 header work that needs no device-mapper (format, token, re-wrap, crypto-erase on a
plain file). Opening volumes (dm-crypt) is in tests/kernel/test_csi_encrypted_kernel.py.
"""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from csi_lvm.cryptsetup import Cryptsetup
from csi_lvm.encryption import VolumeEncryption, check_encryption_request, mapper_name
from csi_lvm.params import parse_volume_params
from csi_lvm.volume_keys import (
    TOKEN_TYPE,
    BackendsFile,
    BackendsFileError,
    InvalidToken,
    KeyBackends,
    parse_backends,
    parse_token,
)
from edge_common.errors import FailedPrecondition, InvalidArgument, ServiceError
from kms_plugin.backends import local
from tests.csi.conftest import CsiRig, code_of, create_request

MiB = 1 << 20
Code = grpc.StatusCode


# =========================================================================== parameters


def params(**p: str) -> Any:
    return parse_volume_params(p, default_vg="vg", default_thin_pool="", default_wipe="none",
                               capability_fs_types=[], has_mount=True)


def test_encrypted_true_and_a_backend_name_are_parsed() -> None:
    got = params(encrypted="true", encryptionKeyBackend="hsm")
    assert (got.encrypted, got.key_backend) == (True, "hsm")
    assert params(encrypted="TRUE").encrypted and not params(encrypted="false").encrypted
    assert not params().encrypted


@pytest.mark.parametrize("bad", [
    {"encrypted": "yes"},
    {"encrypted": "1"},
    {"encryptionKeyBackend": "hsm"},  # without encrypted
    {"encrypted": "true", "encryptionKeyBackend": "../etc/passwd"},
    {"encrypted": "true", "encryptionKeyBackend": "x" * 64},
])
def test_bad_encryption_parameters_are_invalid_argument(bad: dict[str, str]) -> None:
    with pytest.raises(InvalidArgument):
        params(**bad)


# =========================================================================== backends file


def test_backends_file_one_backend_is_the_default() -> None:
    spec = parse_backends({"backends": {"node": {"type": "local", "keyring": "/k"}}})
    assert spec.default == "node"
    assert spec.backends["node"].options == {"keyring": "/k"}


@pytest.mark.parametrize("data", [
    None,
    {"backends": {}},
    {"backends": {"n": {"keyring": "/k"}}},  # no type
    {"backends": {"n": {"type": "vault"}}},  # unknown type
    {"backends": {"bad name": {"type": "local"}}},
    {"backends": {"a": {"type": "local"}}, "default": "b"},
    {"backends": {"a": {"type": "local"}}, "extra": 1},
])
def test_bad_backends_files_are_refused_with_the_reason(data: Any) -> None:
    with pytest.raises(BackendsFileError):
        parse_backends(data)


def test_a_storage_class_backend_must_be_configured_on_the_node() -> None:
    two = KeyBackends(parse_backends({"backends": {"a": {"type": "local"},
                                                   "b": {"type": "local"}}}))
    with pytest.raises(InvalidArgument, match="no default"):
        two.resolve_name("")
    with pytest.raises(InvalidArgument, match="'c' is not configured.*a, b"):
        two.resolve_name("c")
    assert two.resolve_name("b") == "b"
    with pytest.raises(InvalidArgument, match="not configured"):
        KeyBackends(None).resolve_name("a")


# =========================================================================== key backends


@dataclass
class Rig:
    kind: str
    backends: KeyBackends
    rotate: Callable[[], None]


def _local(tmp_path: Path) -> tuple[dict[str, object], Callable[[], None]]:
    ring = tmp_path / "keyring.json"
    local.keygen(ring, "node-ring")
    return {"keyring": str(ring)}, lambda: None if local.rotate(ring) else None


def _pkcs11(tmp_path: Path, hsm: Any,
            request: pytest.FixtureRequest) -> tuple[dict[str, object], Callable[[], None]]:
    from kms_plugin.backends.pkcs11 import Pkcs11Backend

    pin = tmp_path / "pin"
    pin.write_text(hsm.user_pin + "\n")
    pin.chmod(0o600)
    options: dict[str, object] = {"module": hsm.module, "token_label": hsm.token_label,
                                  "key_label": f"csi-{secrets.token_hex(4)}",
                                  "pin_file": str(pin)}
    admin = Pkcs11Backend.from_options(options)
    # A session left open keeps the token logged in for the whole process: later tests of a
    # wrong PIN would then see no refusal.
    request.addfinalizer(admin.close)
    admin.create_key_version(first=True)

    def rotate() -> None:
        admin.create_key_version(first=False)

    return options, rotate


@pytest.fixture(params=["local", "pkcs11", "awskms"])
def rig(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Rig]:
    kind = request.param
    if kind == "local":
        options, rotate = _local(tmp_path)
    elif kind == "pkcs11":
        options, rotate = _pkcs11(tmp_path, request.getfixturevalue("softhsm"), request)
    else:
        fake = request.getfixturevalue("fake_kms")
        options = fake.backend_options()
        rotate = fake.rotate_key
    backends = KeyBackends(BackendsFile(kind, parse_backends(
        {"backends": {kind: {"type": kind, **options}}}).backends))
    yield Rig(kind, backends, rotate)
    backends.close()


UUID_A = "0b1d5a56-6c3e-4d9b-9a1e-2f1c3a4b5c6d"
UUID_B = "9f1d5a56-6c3e-4d9b-9a1e-2f1c3a4b5c6d"


def test_a_volume_secret_wraps_and_unwraps_only_for_its_own_header(rig: Rig) -> None:
    secret = secrets.token_bytes(32)
    wrapped = rig.backends.wrap(rig.kind, secret, UUID_A)
    assert secret not in wrapped.wrapped
    assert secret.hex() not in wrapped.token_json()
    token = parse_token(wrapped.token_json())
    assert token == wrapped
    assert rig.backends.unwrap(token, UUID_A) == secret
    with pytest.raises(FailedPrecondition, match="integrity check"):
        rig.backends.unwrap(token, UUID_B)  # a token copied into another volume's header


def test_after_a_rotation_old_tokens_still_unwrap_and_new_wraps_use_the_new_key(rig: Rig) -> None:
    secret = secrets.token_bytes(32)
    old = rig.backends.wrap(rig.kind, secret, UUID_A)
    rig.rotate()
    current = rig.backends.current_key(rig.kind)  # what the re-wrap loop asks first
    new = rig.backends.wrap(rig.kind, secret, UUID_A)
    assert new.key == current != old.key
    assert rig.backends.unwrap(old, UUID_A) == rig.backends.unwrap(new, UUID_A) == secret


def test_an_unreachable_cloud_kms_is_unavailable(fake_kms: Any) -> None:
    backends = KeyBackends(parse_backends({"backends": {"cloud": {
        "type": "awskms", **fake_kms.backend_options(endpoint_url="http://127.0.0.1:9")}}}))
    try:
        with pytest.raises(ServiceError) as info:
            backends.wrap("cloud", secrets.token_bytes(32), UUID_A)
        assert info.value.code is Code.UNAVAILABLE
    finally:
        backends.close()


# =========================================================================== token format


def good_token() -> dict[str, Any]:
    return {"type": TOKEN_TYPE, "keyslots": ["0"], "version": 1, "backend": "node",
            "key_ref": "ring", "key_version": "g1.abc",
            "wrapped": base64.b64encode(b"x" * 60).decode()}


@pytest.mark.parametrize("change", [
    lambda t: t.update(extra=1),
    lambda t: t.pop("key_ref"),
    lambda t: t.update(version=2),
    lambda t: t.update(version=True),
    lambda t: t.update(type="luks2-keyring"),
    lambda t: t.update(keyslots=["0", "1"]),
    lambda t: t.update(backend=""),
    lambda t: t.update(backend="a/b"),
    lambda t: t.update(key_version=7),
    lambda t: t.update(wrapped="!!!"),
    lambda t: t.update(wrapped=base64.b64encode(b"x" * 60).decode().rstrip("=") + "=="),
    lambda t: t.update(wrapped=base64.b64encode(b"x" * 5000).decode()),
    lambda t: t.update(key_ref="r" * 600),
])
def test_every_malformed_token_is_one_error(change: Callable[[dict[str, Any]], Any]) -> None:
    token = good_token()
    parse_token(json.dumps(token))
    change(token)
    with pytest.raises(InvalidToken):
        parse_token(json.dumps(token))


@pytest.mark.parametrize("text", ["", "[]", "not json", "\xff", '{"type": 1}'])
def test_a_token_that_is_not_a_json_object_is_one_error(text: str) -> None:
    with pytest.raises(InvalidToken):
        parse_token(text)


# =========================================================================== LUKS2 on a file


def test_mapper_names_never_collide_with_lvm_names_and_fit_device_mapper() -> None:
    assert mapper_name("vg-a/lv") != mapper_name("vg/a-lv")
    assert mapper_name("vg/lv") == "csi-crypt-vg-lv"
    assert len(mapper_name(f"{'v' * 120}/{'l' * 120}")) <= 127


@pytest.fixture
def local_enc(tmp_path: Path) -> Iterator[tuple[VolumeEncryption, Path]]:
    ring = tmp_path / "keyring.json"
    local.keygen(ring, "node-ring")
    backends = KeyBackends(parse_backends({"backends": {"node": {"type": "local",
                                                                  "keyring": str(ring)}}}))
    # The file stands in for the LV: everything but dm-crypt works on it.
    enc = VolumeEncryption(backends, Cryptsetup(), kernel_problem=lambda: None)
    yield enc, ring
    backends.close()


def blank_file(tmp_path: Path, size: int = 32 * MiB) -> Path:
    path = tmp_path / f"lv-{secrets.token_hex(3)}.img"
    with path.open("wb") as f:
        f.truncate(size)
    return path


def test_format_writes_a_luks2_header_whose_token_unwraps_to_the_key_slot_secret(
        tmp_path: Path, local_enc: tuple[VolumeEncryption, Path]) -> None:
    enc, _ = local_enc
    dev = blank_file(tmp_path)
    key = enc.prepare("node")
    enc.write_header(str(dev), key)
    raw = dev.read_bytes()
    assert raw[:6] == b"LUKS\xba\xbe"
    assert key.secret not in raw  # never in clear on the disk
    assert key.secret.hex() not in repr(key)
    secret = enc._unwrap("vg/lv", str(dev))
    assert secret == key.secret
    enc.crypt.test_secret(str(dev), secret)  # the key slot opens with it


def test_a_token_swapped_in_from_another_volume_is_refused(
        tmp_path: Path, local_enc: tuple[VolumeEncryption, Path]) -> None:
    enc, _ = local_enc
    a, b = blank_file(tmp_path), blank_file(tmp_path)
    key_a, key_b = enc.prepare("node"), enc.prepare("node")
    enc.write_header(str(a), key_a)
    enc.write_header(str(b), key_b)
    enc.crypt.import_token(str(a), key_b.wrapped.token_json(), replace=True)
    with pytest.raises(FailedPrecondition, match="integrity check"):
        enc._unwrap("vg/a", str(a))
    assert "integrity check" in (enc.problem("vg/a") or "")  # VolumeCondition reports it


def test_a_hand_edited_token_is_refused_before_any_backend_call(
        tmp_path: Path, local_enc: tuple[VolumeEncryption, Path]) -> None:
    enc, _ = local_enc
    dev = blank_file(tmp_path)
    key = enc.prepare("node")
    enc.write_header(str(dev), key)
    token = json.loads(key.wrapped.token_json())
    token["key_version"] = 12
    enc.crypt.import_token(str(dev), json.dumps(token), replace=True)
    with pytest.raises(FailedPrecondition, match="refusing to open"):
        enc._unwrap("vg/lv", str(dev))


def test_rewrap_moves_the_token_to_the_rotated_root_key_and_it_still_opens(
        tmp_path: Path, local_enc: tuple[VolumeEncryption, Path]) -> None:
    enc, ring = local_enc
    dev = blank_file(tmp_path)
    key = enc.prepare("node")
    enc.write_header(str(dev), key)
    assert enc.rewrap_all([("vg/lv", str(dev))]) == {"vg/lv": "current"}
    local.rotate(ring)
    assert enc.rewrap_all([("vg/lv", str(dev))]) == {"vg/lv": "rewrapped"}
    token, _uuid = enc._read_key("vg/lv", str(dev))
    assert token.key == enc.backends.current_key("node") != key.wrapped.key
    assert enc._unwrap("vg/lv", str(dev)) == key.secret


def test_crypto_erase_leaves_no_header_no_token_and_no_key_slot(
        tmp_path: Path, local_enc: tuple[VolumeEncryption, Path]) -> None:
    enc, _ = local_enc
    dev = blank_file(tmp_path)
    key = enc.prepare("node")
    enc.write_header(str(dev), key)
    header = enc.crypt.header(str(dev))
    assert header is not None and header.data_offset > 0
    before = dev.read_bytes()[:header.data_offset]
    assert key.wrapped.wrapped in base64.b64decode(
        json.loads(before[4096:].split(b"\0")[0])["tokens"]["0"]["wrapped"])
    enc.crypto_erase("vg/lv", str(dev), dev.stat().st_size)
    after = dev.read_bytes()
    assert after[:header.data_offset] == bytes(header.data_offset)
    assert enc.crypt.header(str(dev)) is None
    with pytest.raises(FailedPrecondition, match="holds no LUKS2 header"):
        enc._unwrap("vg/lv", str(dev))


def test_a_copy_of_an_encrypted_volume_stays_encrypted_with_its_sources_backend() -> None:
    enc = VolumeEncryption(KeyBackends(None))
    src = {"encrypted": "true", "encryptionKeyBackend": "hsm"}
    assert check_encryption_request(enc, False, "", src) == "hsm"
    with pytest.raises(InvalidArgument, match="opens with its source's key"):
        check_encryption_request(enc, True, "other", src)
    with pytest.raises(InvalidArgument, match="not encrypted"):
        check_encryption_request(enc, True, "", {})


# =========================================================================== over gRPC (host)


@pytest.fixture
def keyring_file(tmp_path: Path) -> Path:
    ring = tmp_path / "keyring.json"
    local.keygen(ring, "node-ring")
    backends = tmp_path / "backends.yaml"
    backends.write_text(f"backends:\n  node:\n    type: local\n    keyring: {ring}\n")
    return backends


def test_create_encrypted_with_an_unknown_backend_is_invalid_argument_and_creates_nothing(
        csi_factory: Callable[..., CsiRig], keyring_file: Path) -> None:
    rig = csi_factory(encryption_backends_file=str(keyring_file))
    for p in ({"encrypted": "true", "encryptionKeyBackend": "hsm"},
              {"encrypted": "maybe"}, {"encryptionKeyBackend": "node"}):
        assert code_of(lambda p=p: rig.controller.CreateVolume(
            create_request("enc-bad", **p))) is Code.INVALID_ARGUMENT
    plain = csi_factory()  # no backends file at all
    assert code_of(lambda: plain.controller.CreateVolume(
        create_request("enc-none", encrypted="true"))) is Code.INVALID_ARGUMENT
    assert rig.our_lvs() == [] and plain.our_lvs() == []


def test_create_encrypted_on_a_node_without_dm_crypt_is_failed_precondition(
        csi_factory: Callable[..., CsiRig], keyring_file: Path) -> None:
    rig = csi_factory(encryption_backends_file=str(keyring_file))
    with pytest.raises(grpc.RpcError) as info:
        rig.controller.CreateVolume(create_request("enc-nodm", encrypted="true"))
    assert info.value.code() is Code.FAILED_PRECONDITION
    assert "device-mapper" in (info.value.details() or "")
    assert rig.our_lvs() == []


def test_create_encrypted_with_the_cloud_kms_down_is_unavailable_and_creates_nothing(
        csi_factory: Callable[..., CsiRig], tmp_path: Path, fake_kms: Any) -> None:
    options = fake_kms.backend_options(endpoint_url="http://127.0.0.1:9")
    backends = tmp_path / "cloud.yaml"
    backends.write_text(json.dumps({"backends": {"cloud": {"type": "awskms", **options}}}))
    rig = csi_factory(encryption_backends_file=str(backends))
    assert rig.driver is not None
    rig.driver.encryption._kernel_problem = lambda: None  # as on a node with dm-crypt
    with pytest.raises(grpc.RpcError) as info:
        rig.controller.CreateVolume(create_request("enc-down", encrypted="true"))
    assert info.value.code() is Code.UNAVAILABLE, info.value.details()
    assert rig.our_lvs() == []


def test_a_bad_backends_file_stops_the_driver_at_start(tmp_path: Path) -> None:
    from csi_lvm.server import build_encryption
    from tests.csi.conftest import make_config

    bad = tmp_path / "b.yaml"
    bad.write_text("backends:\n  n:\n    type: vault\n")
    with pytest.raises(ValueError, match="unknown type 'vault'"):
        build_encryption(make_config("vg", tmp_path, encryption_backends_file=str(bad)))


def test_a_backend_that_stops_answering_shows_in_the_condition_until_it_answers_again(
        tmp_path: Path, local_enc: tuple[VolumeEncryption, Path]) -> None:
    enc, ring = local_enc
    dev = blank_file(tmp_path)
    enc.write_header(str(dev), enc.prepare("node"))
    away = ring.with_suffix(".away")
    ring.rename(away)
    outcome = enc.rewrap_all([("vg/lv", str(dev))])
    assert outcome["vg/lv"].startswith("failed:") and "unreadable" in outcome["vg/lv"]
    assert "cannot be checked" in (enc.problem("vg/lv") or "")
    away.rename(ring)
    assert enc.rewrap_all([("vg/lv", str(dev))]) == {"vg/lv": "current"}
    assert enc.problem("vg/lv") is None


def test_key_operations_are_counted_by_outcome_never_with_key_material(tmp_path: Path) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from csi_lvm.encryption import KeyMetrics

    ring = tmp_path / "keyring.json"
    local.keygen(ring, "node-ring")
    registry = CollectorRegistry()
    backends = KeyBackends(parse_backends({"backends": {"node": {"type": "local",
                                                                  "keyring": str(ring)}}}))
    enc = VolumeEncryption(backends, kernel_problem=lambda: None, metrics=KeyMetrics(registry))
    a, b = blank_file(tmp_path), blank_file(tmp_path)
    key_a, key_b = enc.prepare("node"), enc.prepare("node")
    enc.write_header(str(a), key_a)
    enc.write_header(str(b), key_b)
    enc._unwrap("vg/b", str(b))
    enc.crypt.import_token(str(a), key_b.wrapped.token_json(), replace=True)
    with pytest.raises(FailedPrecondition):
        enc._unwrap("vg/a", str(a))

    def count(operation: str, result: str) -> float | None:
        return registry.get_sample_value("csi_lvm_volume_key_operations_total",
                                         {"operation": operation, "result": result})

    assert (count("wrap", "ok"), count("unwrap", "ok"), count("unwrap", "error")) == (2, 1, 1)
    text = generate_latest(registry)
    assert key_a.secret.hex().encode() not in text and key_a.wrapped.wrapped not in text
    backends.close()


def test_a_node_without_cryptsetup_or_dm_crypt_says_which_is_missing(tmp_path: Path) -> None:
    from csi_lvm.encryption import dm_crypt_problem

    missing = VolumeEncryption(KeyBackends(None), Cryptsetup(binary="/nonexistent/cryptsetup"),
                               kernel_problem=lambda: None)
    with pytest.raises(FailedPrecondition, match="cryptsetup is not installed"):
        missing.require_node_support()
    misc = tmp_path / "misc"
    misc.write_text(" 62 rfkill\n")
    assert "no device-mapper" in (dm_crypt_problem(misc, tmp_path, tmp_path) or "")
    misc.write_text(" 62 rfkill\n236 device-mapper\n")
    assert "no dm-crypt" in (dm_crypt_problem(misc, tmp_path, tmp_path) or "")
    (tmp_path / "dm_crypt").mkdir()  # /sys/module/dm_crypt: loaded
    assert dm_crypt_problem(misc, tmp_path, tmp_path) is None
