"""The plugin as kube-apiserver sees it, over a real unix socket, on every backend."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

import grpc
import pytest
from cryptography.exceptions import InvalidTag

from edge_common.server import unix_channel
from edge_proto.kms.v1beta1 import service_pb2 as v1_pb2
from edge_proto.kms.v1beta1 import service_pb2_grpc as v1_grpc
from edge_proto.kms.v2 import service_pb2, service_pb2_grpc
from kms_plugin.envelope import ANNOTATION_KEY, KekRecord, derive_key_id
from tests.kms.apiserver import FakeApiserver, is_fqdn
from tests.kms.conftest import BackendRig, StartPlugin
from tests.kms.faulty import FaultyBackend


def slow_unwrap(rig: BackendRig, seconds: float = 0.2) -> FaultyBackend:
    """The rig's real backend, with unwraps slow enough that concurrent requests overlap."""
    backend = FaultyBackend(rig.make_backend())
    backend.latency["unwrap"] = seconds
    return backend


def wait_for(predicate: Callable[[], bool], timeout: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what or predicate}")


def secret_key(i: int) -> str:
    return f"/registry/secrets/ns-{i % 3}/secret-{i}"


def test_status_answers_v2_ok_and_a_valid_key_id(
    backend_rig: BackendRig, start_plugin: StartPlugin
):
    rp = start_plugin(backend_rig)
    calls_before = sum(rp.calls.values())
    with FakeApiserver(rp.endpoint) as api:
        for _ in range(20):
            status = api.status()
            assert status.version == "v2"
            assert status.healthz == "ok"
            assert 1 <= len(status.key_id.encode()) <= 1024
    assert sum(rp.calls.values()) == calls_before, "Status must not call the backend"


def test_encrypt_of_a_seed_returns_the_status_key_id_and_valid_annotations(
    backend_rig: BackendRig, start_plugin: StartPlugin
):
    rp = start_plugin(backend_rig)
    calls_before = sum(rp.calls.values())
    with FakeApiserver(rp.endpoint) as api:
        state = api.sync()  # raises if the apiserver would refuse the answer
        status = api.status()
    assert state.key_id == status.key_id
    assert 1 <= len(state.ciphertext) <= 1024
    assert list(state.annotations) == [ANNOTATION_KEY]
    assert is_fqdn(ANNOTATION_KEY) and "/" not in ANNOTATION_KEY
    assert sum(len(k) + len(v) for k, v in state.annotations.items()) <= 32 * 1024
    assert state.seed not in state.ciphertext
    record = KekRecord.decode(state.annotations[ANNOTATION_KEY])
    assert record.backend == backend_rig.backend
    assert sum(rp.calls.values()) == calls_before, "Encrypt must not call the backend"


def test_secrets_written_like_the_apiserver_are_read_back_by_a_cold_client(
    backend_rig: BackendRig, start_plugin: StartPlugin
):
    rp = start_plugin(backend_rig)
    values = {}
    with FakeApiserver(rp.endpoint) as writer:
        for i in range(20):
            values[secret_key(i)] = (f"secret-{i}".encode() * (i + 1), None)
        stored = {k: writer.write(k, data) for k, (data, _) in values.items()}
    with FakeApiserver(rp.endpoint) as reader:  # cold: empty cache, must Decrypt
        for key, raw in stored.items():
            assert reader.read(key, raw) == values[key][0]
        assert reader.calls["Decrypt"] == 1  # one seed behind all of them
        with pytest.raises(InvalidTag):  # the etcd key is bound: moving a value breaks it
            reader.read(secret_key(99), stored[secret_key(0)])


def test_plugin_restart_then_decrypt_storm_costs_one_backend_call_per_local_kek(
    backend_rig: BackendRig, start_plugin: StartPlugin
):
    # 60 apiservers each wrap their own seed; the local KEK rotates every 20 uses
    first = start_plugin(backend_rig, kek_max_uses=20)
    seeds = []
    for i in range(60):
        with FakeApiserver(first.endpoint) as api:
            state = api.sync()
            seeds.append((api.write(secret_key(i), b"v%d" % i), state))
        if i % 20 == 19:
            first.plugin.monitor.run_once()  # let the due rotation happen now
    distinct_keks = {s.annotations[ANNOTATION_KEY] for _, s in seeds}
    assert len(distinct_keks) >= 2
    first.stop()

    # a restarted plugin: empty cache; slow unwraps so that the storm really overlaps
    second = start_plugin(backend_rig, backend=slow_unwrap(backend_rig), kek_max_uses=20)
    unwraps_before = second.calls.get("unwrap", 0)
    results: dict[int, bytes] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(seeds))

    def read(i: int, raw: bytes) -> None:
        try:
            with FakeApiserver(second.endpoint) as api:
                barrier.wait()
                results[i] = api.read(secret_key(i), raw)
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=read, args=(i, raw)) for i, (raw, _) in enumerate(seeds)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert results == {i: b"v%d" % i for i in range(len(seeds))}
    unwraps = second.calls.get("unwrap", 0) - unwraps_before
    assert unwraps <= len(distinct_keks)


def test_identical_concurrent_decrypts_cost_at_most_one_backend_call(
    backend_rig: BackendRig, start_plugin: StartPlugin
):
    writer_plugin = start_plugin(backend_rig)
    with FakeApiserver(writer_plugin.endpoint) as api:
        state = api.sync()
    # never saw this local KEK; slow unwraps so that the 32 requests really overlap
    reader_plugin = start_plugin(backend_rig, backend=slow_unwrap(backend_rig))
    before = reader_plugin.calls.get("unwrap", 0)
    n = 32
    barrier = threading.Barrier(n)
    out: list[bytes] = []
    errors: list[BaseException] = []

    def decrypt() -> None:
        try:
            with unix_channel(reader_plugin.endpoint) as ch:
                stub = service_pb2_grpc.KeyManagementServiceStub(ch)
                req = service_pb2.DecryptRequest(
                    ciphertext=state.ciphertext, key_id=state.key_id,
                    annotations=state.annotations, uid="storm",
                )
                barrier.wait()
                out.append(stub.Decrypt(req, timeout=3).plaintext)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=decrypt) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert out == [state.seed] * n
    assert reader_plugin.calls.get("unwrap", 0) - before <= 1


def test_root_key_rotation_changes_key_id_without_restart_and_old_data_stays_readable(
    backend_rig: BackendRig, start_plugin: StartPlugin
):
    rp = start_plugin(backend_rig, refresh_interval=0.05)
    with FakeApiserver(rp.endpoint) as api:
        old = api.sync()
        old_value = api.write(secret_key(1), b"before rotation")
        backend_rig.rotate()
        wait_for(lambda: api.status().key_id != old.key_id, what="a new key_id in Status")
        new = api.sync()  # the apiserver notices and wraps a new seed
        assert new.key_id != old.key_id
        assert new.seed != old.seed
        new_value = api.write(secret_key(2), b"after rotation")
    with FakeApiserver(rp.endpoint) as cold:
        assert cold.read(secret_key(1), old_value) == b"before rotation"
        assert cold.read(secret_key(2), new_value) == b"after rotation"
        assert cold.status().key_id == new.key_id


def test_key_ids_never_repeat_across_rotations(backend_rig: BackendRig, start_plugin: StartPlugin):
    rp = start_plugin(backend_rig, refresh_interval=0.05)
    seen = [rp.plugin.keys.status_key_id()]
    with FakeApiserver(rp.endpoint) as api:
        for _ in range(2):
            backend_rig.rotate()
            wait_for(lambda: api.status().key_id != seen[-1], what="a new key_id")
            seen.append(api.status().key_id)
    assert len(set(seen)) == len(seen)


def _mutations(state_ct: bytes, key_id: str, annotations: dict[str, bytes],
               other: tuple[bytes, str, dict[str, bytes]]) -> dict[str, tuple[bytes, str, dict]]:
    record = annotations[ANNOTATION_KEY]
    rec = KekRecord.decode(record)
    cases: dict[str, tuple[bytes, str, dict]] = {}
    for pos in (0, 1, 17, 29, len(state_ct) - 1):
        ct = bytearray(state_ct)
        ct[pos] ^= 0x01
        cases[f"ciphertext bit {pos}"] = (bytes(ct), key_id, annotations)
    cases["ciphertext truncated"] = (state_ct[:-1], key_id, annotations)
    cases["ciphertext extended"] = (state_ct + b"\x00", key_id, annotations)
    cases["ciphertext empty"] = (b"", key_id, annotations)
    cases["key_id changed"] = (state_ct, key_id + "x", annotations)
    cases["key_id empty"] = (state_ct, "", annotations)
    cases["key_id of another version"] = (
        state_ct, derive_key_id(rec.backend, type(rec.root)(rec.root.key_ref, rec.root.version
                                                             + "0")), annotations)
    cases["annotation removed"] = (state_ct, key_id, {})
    cases["annotation added"] = (state_ct, key_id, {**annotations, "extra.example.com": b"x"})
    cases["annotation key not fqdn"] = (state_ct, key_id, {"kek": record})
    for pos in (0, 1, 20, len(record) - 1):
        r = bytearray(record)
        r[pos] ^= 0x01
        cases[f"record bit {pos}"] = (state_ct, key_id, {ANNOTATION_KEY: bytes(r)})
    cases["record of another encrypt"] = (state_ct, key_id, other[2])
    cases["ciphertext of another encrypt"] = (other[0], key_id, annotations)
    return cases


def test_tampered_ciphertext_annotations_or_key_id_are_refused_never_decrypted(
    backend_rig: BackendRig, start_plugin: StartPlugin
):
    rp = start_plugin(backend_rig, kek_max_uses=1)
    with unix_channel(rp.endpoint) as ch:
        stub = service_pb2_grpc.KeyManagementServiceStub(ch)
        seed = os.urandom(32)
        enc = stub.Encrypt(service_pb2.EncryptRequest(plaintext=seed, uid="t"), timeout=3)
        rp.plugin.monitor.run_once()  # the local KEK rotates (max uses 1)
        other = stub.Encrypt(service_pb2.EncryptRequest(plaintext=os.urandom(32)), timeout=3)
        annotations = dict(enc.annotations)
        assert annotations != dict(other.annotations)
        cases = _mutations(enc.ciphertext, enc.key_id, annotations,
                           (other.ciphertext, other.key_id, dict(other.annotations)))
        for name, (ct, key_id, ann) in cases.items():
            with pytest.raises(grpc.RpcError) as info:
                stub.Decrypt(
                    service_pb2.DecryptRequest(ciphertext=ct, key_id=key_id, annotations=ann),
                    timeout=3,
                )
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
            assert seed.hex() not in (info.value.details() or ""), name
        # and the untouched request still works
        ok = stub.Decrypt(
            service_pb2.DecryptRequest(
                ciphertext=enc.ciphertext, key_id=enc.key_id, annotations=annotations
            ),
            timeout=3,
        )
        assert ok.plaintext == seed


def test_v1beta1_is_served_on_the_same_socket(backend_rig: BackendRig, start_plugin: StartPlugin):
    rp = start_plugin(backend_rig)
    with unix_channel(rp.endpoint) as ch:
        v1 = v1_grpc.KeyManagementServiceStub(ch)
        version = v1.Version(v1_pb2.VersionRequest(version="v1beta1"), timeout=3)
        assert version.version == "v1beta1"
        assert version.runtime_name
        dek = os.urandom(32)
        calls_before = sum(rp.calls.values())
        blobs = [
            v1.Encrypt(v1_pb2.EncryptRequest(version="v1beta1", plain=dek), timeout=3).cipher
            for _ in range(5)
        ]
        assert sum(rp.calls.values()) == calls_before, "v1 Encrypt must not call the backend"
        assert len(set(blobs)) == 5  # a fresh nonce every time
        v2 = service_pb2_grpc.KeyManagementServiceStub(ch)
        assert v2.Status(service_pb2.StatusRequest(), timeout=3).version == "v2"
    cold = start_plugin(backend_rig)
    with unix_channel(cold.endpoint) as ch:
        v1 = v1_grpc.KeyManagementServiceStub(ch)
        for blob in blobs:
            plain = v1.Decrypt(v1_pb2.DecryptRequest(version="v1beta1", cipher=blob), timeout=3)
            assert plain.plain == dek
        tampered = bytearray(blobs[0])
        tampered[-3] ^= 0x80
        with pytest.raises(grpc.RpcError) as info:
            v1.Decrypt(v1_pb2.DecryptRequest(version="v1beta1", cipher=bytes(tampered)), timeout=3)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
