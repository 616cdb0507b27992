"""The local keyring backend."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kms_plugin.backends import local
from kms_plugin.backends.base import RootKeyVersion
from kms_plugin.backends.errors import (
    BackendConfigError,
    InvalidCiphertext,
    KeyDisabled,
    KeyNotFound,
)

CTX = {"purpose": "test"}


@pytest.fixture
def ring(tmp_path: Path) -> Path:
    path = tmp_path / "ring.json"
    local.keygen(path, "cluster-a")
    return path


def test_keygen_writes_a_0600_keyring_with_one_aes256_key_and_refuses_to_overwrite(ring: Path):
    assert ring.stat().st_mode & 0o777 == 0o600
    data = json.loads(ring.read_text())
    assert data["format"] == local.FORMAT and len(data["keys"]) == 1
    with pytest.raises(local.KeyringError):
        local.keygen(ring, "again")


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644, 0o610])
def test_a_keyring_readable_by_group_or_others_is_refused(ring: Path, mode: int):
    ring.chmod(mode)
    with pytest.raises(BackendConfigError) as info:
        local.LocalBackend.from_options({"keyring": str(ring)})
    assert "chmod 600" in str(info.value)


def generation(key: RootKeyVersion) -> str:
    """The operator's name of a key (gN) out of the reported version gN.<fingerprint>."""
    gen, _, fingerprint = key.version.partition(".")
    assert len(fingerprint) == 12
    return gen


def test_separately_made_keyrings_never_share_a_key_id(tmp_path: Path):
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    for path in (first, second):
        local.keygen(path, name="cluster-a")
    a, b = local.LocalBackend(first), local.LocalBackend(second)
    assert generation(a.current_key()) == generation(b.current_key()) == "g1"
    assert a.current_key() != b.current_key()
    wrapped = a.wrap(b"k" * 32, CTX)
    with pytest.raises(KeyNotFound):  # same name and generation, other material
        b.unwrap(wrapped.ciphertext, wrapped.key, CTX)


def test_wrap_is_bound_to_the_context_and_the_version(ring: Path):
    backend = local.LocalBackend(ring)
    result = backend.wrap(b"k" * 32, CTX)
    assert result.key.key_ref == "cluster-a" and generation(result.key) == "g1"
    assert backend.unwrap(result.ciphertext, result.key, CTX) == b"k" * 32
    with pytest.raises(InvalidCiphertext):
        backend.unwrap(result.ciphertext, result.key, {"purpose": "other"})
    with pytest.raises(InvalidCiphertext):
        backend.unwrap(result.ciphertext[:-1] + b"\x00", result.key, CTX)


def test_rotate_adds_a_new_primary_that_a_running_backend_picks_up(ring: Path):
    backend = local.LocalBackend(ring)
    old = backend.wrap(b"a" * 32, CTX)
    local.rotate(ring)
    assert backend.current_key().key_ref == "cluster-a"
    assert generation(backend.current_key()) == "g2"
    new = backend.wrap(b"b" * 32, CTX)
    assert new.key == backend.current_key()
    assert backend.unwrap(old.ciphertext, old.key, CTX) == b"a" * 32


def test_generations_are_never_reused_and_a_hand_edited_primary_is_refused(ring: Path):
    local.rotate(ring)
    ring2 = local.rotate(ring, reinstate="g1")
    assert [k.version for k in ring2.keys] == ["g3", "g2", "g1"]
    assert ring2.keys[0].key == ring2.keys[2].key
    data = json.loads(ring.read_text())
    data["keys"] = [data["keys"][2], data["keys"][0], data["keys"][1]]  # g1 back in front
    ring.write_text(json.dumps(data))
    with pytest.raises(BackendConfigError) as info:
        local.LocalBackend(ring)
    assert "highest generation" in str(info.value)


def test_missing_versions_are_not_found_and_disabled_keys_refuse(ring: Path):
    backend = local.LocalBackend(ring)
    result = backend.wrap(b"k" * 32, CTX)
    with pytest.raises(KeyNotFound):
        backend.unwrap(result.ciphertext, RootKeyVersion("cluster-a", "g9"), CTX)
    with pytest.raises(KeyNotFound):
        backend.unwrap(result.ciphertext, RootKeyVersion("other", "g1"), CTX)
    local.set_state(ring, "g1", "disabled")
    with pytest.raises(KeyDisabled):
        backend.wrap(b"k" * 32, CTX)
    with pytest.raises(KeyDisabled):
        backend.unwrap(result.ciphertext, result.key, CTX)


def test_a_keyring_broken_while_running_keeps_the_loaded_keys_out_of_use_and_says_why(ring: Path):
    backend = local.LocalBackend(ring)
    ring.write_text("{not json")
    ring.chmod(0o600)
    with pytest.raises(local.KeyringUnusable, match="invalid JSON"):
        backend.current_key()
    ring.write_bytes(b'{"format": "\xff\xfe"}')
    with pytest.raises(local.KeyringUnusable, match="not UTF-8"):
        backend.current_key()


def test_unknown_options_are_a_config_error(ring: Path):
    with pytest.raises(BackendConfigError):
        local.LocalBackend.from_options({"keyring": str(ring), "colour": "blue"})
    with pytest.raises(BackendConfigError):
        local.LocalBackend.from_options({})


def test_staged_keys_unwrap_but_never_wrap_until_promoted(ring: Path):
    node_a = local.LocalBackend(ring)
    local.rotate(ring, stage=True)  # g2 staged: every node gets the file first
    assert generation(node_a.current_key()) == "g1"
    staged_key = local.load_keyring(ring).find("g2")
    assert staged_key is not None and staged_key.state == "staged"
    ring_b = ring.with_name("node-b.json")  # the copy another control-plane node has
    ring_b.write_bytes(ring.read_bytes())
    ring_b.chmod(0o600)
    node_b = local.LocalBackend(ring_b)
    local.rotate(ring, promote="g2")  # node A promotes before node B got the new file
    assert generation(node_a.current_key()) == "g2"
    new = node_a.wrap(b"n" * 32, CTX)
    assert generation(new.key) == "g2"
    assert generation(node_b.current_key()) == "g1"
    assert node_b.unwrap(new.ciphertext, new.key, CTX) == b"n" * 32
    with pytest.raises(local.KeyringError):
        local.rotate(ring, promote="g1")  # only staged keys can be promoted


def test_a_staged_key_older_than_the_primary_is_refused(ring: Path):
    local.rotate(ring)
    data = json.loads(ring.read_text())
    data["keys"][1]["state"] = "staged"  # g1 "staged" behind primary g2: not newer
    ring.write_text(json.dumps(data))
    with pytest.raises(BackendConfigError):
        local.LocalBackend(ring)
