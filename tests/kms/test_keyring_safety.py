# ruff: noqa: F811  (pytest fixtures imported from the sibling test module)
"""The local keyring never goes back and never loses a rotation (issue 14 point 4)."""

from __future__ import annotations

import json
import multiprocessing
import shutil
from pathlib import Path

import pytest

from edge_common.server import unix_channel
from edge_proto.kms.v2 import service_pb2, service_pb2_grpc
from kms_plugin.backends import local
from kms_plugin.backends.errors import BackendConfigError
from tests.kms.conftest import BackendRig, StartPlugin
from tests.kms.test_cli import run
from tests.kms.test_local_backend import ring  # noqa: F401 - shared fixture

CTX = {"purpose": "test"}


def _backup(ring: Path) -> Path:
    copy = ring.with_name("backup.json")
    shutil.copy2(ring, copy)
    return copy


def _restore(backup: Path, ring: Path) -> None:
    shutil.copy(backup, ring)
    ring.chmod(0o600)


def test_a_reload_with_a_lower_next_generation_is_refused_unless_a_restore_is_intended(
    ring: Path,
):
    old = _backup(ring)
    backend = local.LocalBackend(ring)
    local.rotate(ring)
    g2 = backend.current_key()
    wrapped = backend.wrap(b"k" * 32, CTX)
    _restore(old, ring)  # yesterday's backup copied back over the keyring
    with pytest.raises(local.KeyringRollback, match="next_generation went down from 3 to 2"):
        backend.current_key()
    with pytest.raises(local.KeyringRollback):
        backend.wrap(b"k" * 32, CTX)
    local.rotate(ring)  # someone rotates the old file: g2 again, other material
    with pytest.raises(local.KeyringRollback, match="g2"):
        backend.current_key()
    restoring = local.LocalBackend(ring, allow_rollback=True)
    assert restoring.current_key() != g2
    # with the newest keyring back in place, the running backend carries on
    local.rotate(ring)
    data = json.loads(ring.read_text())
    assert data["next_generation"] == 4
    with pytest.raises(local.KeyringRollback):  # g2 of this file is not the g2 seen
        backend.unwrap(wrapped.ciphertext, wrapped.key, CTX)


def test_a_reload_that_drops_a_generation_seen_is_refused(ring: Path):
    local.rotate(ring)
    backend = local.LocalBackend(ring)
    backend.current_key()
    data = json.loads(ring.read_text())
    data["keys"] = data["keys"][:1]  # g1 removed by hand: its data would become unreadable
    ring.write_text(json.dumps(data))
    with pytest.raises(local.KeyringRollback, match="g1"):
        backend.current_key()


def test_the_restore_flag_is_an_option_of_the_backend(ring: Path):
    assert local.LocalBackend.from_options(
        {"keyring": str(ring), "allow_rollback": "true"}
    ).allow_rollback
    with pytest.raises(BackendConfigError):
        local.LocalBackend.from_options({"keyring": str(ring), "rollback": True})


def test_a_rolled_back_keyring_makes_the_running_plugin_unhealthy_and_loud(
    local_backend_rig: BackendRig, start_plugin: StartPlugin, caplog
):
    ring = local_backend_rig.extra["keyring"]
    old = _backup(ring)
    local.rotate(ring)
    rp = start_plugin(local_backend_rig)
    _restore(old, ring)
    rp.plugin.monitor.probe()
    with unix_channel(rp.endpoint) as channel:
        status = service_pb2_grpc.KeyManagementServiceStub(channel).Status(
            service_pb2.StatusRequest(), timeout=5
        )
    assert status.healthz != "ok" and "ROLLBACK" in status.healthz
    assert "KEYRING ROLLBACK REFUSED" in caplog.text


def _rotate_once(path: str) -> int:
    return local.rotate(Path(path)).next_generation


def test_concurrent_rotations_never_lose_one(ring: Path):
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(8) as pool:
        results = pool.map(_rotate_once, [str(ring)] * 20)
    final = local.load_keyring(ring)
    assert sorted(results) == list(range(3, 23))  # each rotation saw the one before
    assert final.next_generation == 22
    assert sorted(k.generation for k in final.keys) == list(range(1, 22))


def test_a_writer_without_the_lock_is_detected_before_the_rename(ring: Path, monkeypatch):
    real_write = json.dump
    done: list[bool] = []

    def sneaky(obj, fh, **kw):  # another tool replaces the file while we write ours
        if not done:
            done.append(True)
            other = local.load_keyring(ring)
            bumped = local.Keyring(other.name, other.next_generation + 5, other.keys)
            local.write_keyring(ring, bumped)
        return real_write(obj, fh, **kw)

    monkeypatch.setattr(local.json, "dump", sneaky)
    with pytest.raises(local.KeyringError, match="changed while it was being updated"):
        local.rotate(ring)
    monkeypatch.undo()
    assert local.load_keyring(ring).next_generation == 7  # the other writer's file stands


def test_staging_twice_is_refused_and_unstage_or_promote_always_gets_back(
    ring: Path, capsys
):
    local.rotate(ring, stage=True)  # g2 staged
    code, _, err = run(capsys, "rotate", "--local-keyring", str(ring), "--stage")
    assert code != 0 and "--promote g2" in err and "--unstage g2" in err
    code, out, _ = run(capsys, "rotate", "--local-keyring", str(ring), "--unstage", "g2")
    assert code == 0 and "dropped the staged key g2" in out
    assert [k.version for k in local.load_keyring(ring).keys] == ["g1"]
    backend = local.LocalBackend(ring)
    assert backend.current_key().version.startswith("g1.")
    code, _, _ = run(capsys, "rotate", "--local-keyring", str(ring), "--stage")
    assert code == 0  # g3 staged (g2 is never reused)
    code, _, _ = run(capsys, "rotate", "--local-keyring", str(ring), "--promote", "g3")
    assert code == 0
    assert backend.current_key().version.startswith("g3.")


def test_a_file_with_two_staged_keys_from_before_is_not_stuck(ring: Path, capsys):
    local.rotate(ring, stage=True)
    data = json.loads(ring.read_text())  # what the old code let a second --stage write
    second = dict(data["keys"][1], generation=3)
    data["keys"].insert(1, second)
    data["next_generation"] = 4
    ring.write_text(json.dumps(data))
    code, _, err = run(capsys, "rotate", "--local-keyring", str(ring), "--promote", "g3")
    assert code == 0, err
    ring_now = local.load_keyring(ring)
    assert [k.version for k in ring_now.keys] == ["g3", "g1"]
    assert local.LocalBackend(ring).current_key().version.startswith("g3.")
