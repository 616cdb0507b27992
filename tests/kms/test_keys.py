"""The key manager: one atomic key snapshot, local KEK rotation, key ids that never repeat."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from kms_plugin import keys as keys_mod
from kms_plugin.backends import local
from kms_plugin.backends.errors import BackendUnavailable, KeyDisabled
from kms_plugin.envelope import ANNOTATION_KEY, EnvelopeError, KekRecord
from kms_plugin.keys import KekPolicy, KeyManager


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def ring(tmp_path: Path) -> Path:
    path = tmp_path / "ring.json"
    local.keygen(path, "unit")
    return path


def manager(ring: Path, **policy: object) -> KeyManager:
    km = KeyManager(local.LocalBackend(ring), "local", policy=KekPolicy(**policy))  # type: ignore[arg-type]
    km.refresh_root()
    return km


def test_local_kek_rotation_by_uses_keeps_the_key_id_and_changes_the_annotation(ring: Path):
    due: list[int] = []
    km = KeyManager(local.LocalBackend(ring), "local", policy=KekPolicy(max_uses=3),
                    on_rotation_due=lambda: due.append(1))
    km.refresh_root()
    first = km.encrypt_seed(os.urandom(32))
    km.encrypt_seed(os.urandom(32))
    assert km.rotation_due() is None
    km.encrypt_seed(os.urandom(32))
    assert due == [1] and km.rotation_due() == "uses"
    km.rotate_local_kek("uses")
    second = km.encrypt_seed(os.urandom(32))
    assert second[1] == first[1]
    assert second[2][ANNOTATION_KEY] != first[2][ANNOTATION_KEY]
    assert km.rotation_due() is None


def test_local_kek_rotation_by_age(ring: Path):
    clock = Clock()
    km = KeyManager(local.LocalBackend(ring), "local", policy=KekPolicy(max_age_seconds=60),
                    clock=clock)
    km.refresh_root()
    clock.now += 59
    assert km.rotation_due() is None
    clock.now += 1
    assert km.rotation_due() == "age"


def test_hard_use_limit_refuses_to_encrypt_when_rotation_never_happened(
    ring: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(keys_mod, "HARD_MAX_USES", 4)
    km = manager(ring, max_uses=2)
    for _ in range(3):
        km.encrypt_seed(os.urandom(32))
    with pytest.raises(BackendUnavailable):
        km.encrypt_seed(os.urandom(32))


def test_every_encrypt_returns_the_key_id_of_the_key_that_wrapped_it_during_rotations(ring: Path):
    km = manager(ring)
    stop = threading.Event()
    results = []
    errors: list[BaseException] = []

    def encrypt_loop() -> None:
        try:
            while not stop.is_set():
                seed = os.urandom(32)
                results.append((seed, *km.encrypt_seed(seed)))
                if len(results) > 1500:
                    stop.wait(0.001)  # enough material; keep the test quick
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=encrypt_loop) for _ in range(3)]
    for t in threads:
        t.start()
    seen_ids = {km.status_key_id()}
    for _ in range(15):
        local.rotate(ring)
        km.refresh_root()
        seen_ids.add(km.status_key_id())
    stop.set()
    for t in threads:
        t.join()
    assert not errors
    assert len(seen_ids) == 16
    used = set()
    for seed, ct, key_id, ann in results:
        assert KekRecord.decode(ann[ANNOTATION_KEY]).key_id == key_id
        assert key_id in seen_ids
        assert km.decrypt_seed(ct, key_id, ann) == seed
        used.add(key_id)
    assert len(used) > 1


def test_reinstating_an_old_root_key_gives_a_new_key_id(ring: Path):
    km = manager(ring)
    first_id = km.status_key_id()
    old = km.encrypt_seed(b"s" * 32)
    local.rotate(ring)
    km.refresh_root()
    local.rotate(ring, reinstate="g1")  # the same material as g1, as a new version g3
    km.refresh_root()
    assert km.current is not None and km.current.root.version.startswith("g3.")
    assert km.status_key_id() != first_id
    cold = manager(ring)
    assert cold.decrypt_seed(*old) == b"s" * 32


def test_blocked_encrypt_raises_the_backend_reason_and_can_be_lifted(ring: Path):
    km = manager(ring)
    km.block_encrypt(KeyDisabled("root key disabled"))
    with pytest.raises(KeyDisabled):
        km.encrypt_seed(os.urandom(32))
    with pytest.raises(KeyDisabled):
        km.encrypt_legacy(os.urandom(32))
    km.block_encrypt(None)
    km.encrypt_seed(os.urandom(32))


def test_a_record_naming_another_backend_is_refused_without_a_backend_call(ring: Path):
    km = manager(ring)
    ct, key_id, ann = km.encrypt_seed(os.urandom(32))
    rec = KekRecord.decode(ann[ANNOTATION_KEY])
    forged = KekRecord(rec.kek_id, "pkcs11", rec.root, rec.wrapped)
    with pytest.raises(EnvelopeError):
        km.decrypt_seed(ct, forged.key_id, {ANNOTATION_KEY: forged.encode()})


def test_plaintext_sizes_outside_the_ciphertext_limit_are_refused(ring: Path):
    km = manager(ring)
    with pytest.raises(EnvelopeError):
        km.encrypt_seed(b"")
    with pytest.raises(EnvelopeError):
        km.encrypt_seed(b"x" * 1024)
    ct, _, _ = km.encrypt_seed(b"x" * keys_mod.MAX_SEALED_PLAINTEXT)
    assert len(ct) == 1024


class CacheEvents(keys_mod.KeyEvents):
    def __init__(self) -> None:
        self.events: list[str] = []

    def cache_event(self, kind: str) -> None:
        self.events.append(kind)


@pytest.mark.parametrize(
    "change",
    [
        lambda ct, k, a: (ct, k + "x", a),  # another key_id
        lambda ct, k, a: (ct, "", a),
        lambda ct, k, a: (ct[:1] + b"z" * 16 + ct[17:], k, a),  # another local KEK id
        lambda ct, k, a: (b"\x02" + ct[1:], k, a),  # unknown version
        lambda ct, k, a: (ct[:40], k, a),  # truncated
        lambda ct, k, a: (ct + b"\x00" * 1024, k, a),  # too long
        lambda ct, k, a: (ct, k, {**a, "b.example.com": b""}),  # an extra annotation
        lambda ct, k, a: (ct, k, {}),
    ],
    ids=["key-id", "empty-key-id", "kek-id", "version", "truncated", "too-long",
         "extra-annotation", "no-annotation"],
)
def test_a_request_naming_a_cached_record_still_gets_every_check(ring: Path, change):
    # the hot path compares the request with what the strict parse checked when the record was
    # cached: each mismatch must still be refused, and not be counted as a cache hit
    events = CacheEvents()
    km = KeyManager(local.LocalBackend(ring), "local", events=events)
    km.refresh_root()
    ct, key_id, ann = km.encrypt_seed(b"s" * 32)
    assert km.decrypt_seed(ct, key_id, ann) == b"s" * 32
    assert events.events == ["hit"]
    with pytest.raises(EnvelopeError):
        km.decrypt_seed(*change(ct, key_id, ann))
    assert events.events == ["hit"]
    with pytest.raises(EnvelopeError):  # all parts match, the tag does not: a hit, then refused
        km.decrypt_seed(ct[:-1] + bytes([ct[-1] ^ 1]), key_id, ann)
    assert events.events == ["hit", "hit"]


def test_a_v1beta1_blob_naming_a_cached_record_still_gets_every_check(ring: Path):
    events = CacheEvents()
    km = KeyManager(local.LocalBackend(ring), "local", events=events)
    km.refresh_root()
    blob, key_id = km.encrypt_legacy(b"p" * 40)
    assert km.decrypt_legacy(blob) == (b"p" * 40, key_id)
    assert events.events == ["hit"]
    key_len = int.from_bytes(blob[1:3], "big")
    other_key = key_id[:-1] + ("0" if key_id[-1] != "0" else "1")  # same length, other key_id
    bad = [
        blob[:3] + other_key.encode() + blob[3 + key_len:],
        blob[:3 + key_len + 10],
        b"\x02" + blob[1:],
        b"",
    ]
    for each in bad:
        with pytest.raises(EnvelopeError):
            km.decrypt_legacy(each)
    assert events.events == ["hit"]
    with pytest.raises(EnvelopeError):  # all parts match, the tag does not: a hit, then refused
        km.decrypt_legacy(blob[:-1] + bytes([blob[-1] ^ 1]))
    assert events.events == ["hit", "hit"]
