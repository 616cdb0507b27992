"""Status has capacity of its own during Decrypt storms (issue 14 point 7).

Requests that wait for the backend hold a server thread each; at most ``max_workers`` of them
wait at once and the server has threads beyond those, so Status (kube-apiserver's health
check, 3 s timeout) and requests answered from memory always find one.
"""

from __future__ import annotations

import os
import threading
import time

import grpc

from edge_common.server import unix_channel
from edge_proto.kms.v2 import service_pb2, service_pb2_grpc
from kms_plugin.keys import KeyManager
from tests.kms.conftest import BackendRig, StartPlugin
from tests.kms.faulty import FaultyBackend

STORM = 40


def _cold_records(rig: BackendRig, n: int) -> list[tuple[bytes, str, dict[str, bytes]]]:
    """n seeds, each under a local KEK of its own that the plugin under test never saw."""
    km = KeyManager(rig.make_backend(), rig.backend)
    km.refresh_root()
    out = []
    for _ in range(n):
        km.rotate_local_kek("test")
        out.append(km.encrypt_seed(os.urandom(32)))
    km.close()
    return out


def test_status_answers_while_a_storm_of_cold_decrypts_waits_for_a_slow_backend(
    local_backend_rig: BackendRig, start_plugin: StartPlugin
):
    records = _cold_records(local_backend_rig, STORM)
    faulty = FaultyBackend(local_backend_rig.make_backend())
    rp = start_plugin(local_backend_rig, backend=faulty, max_workers=8)
    faulty.latency["unwrap"] = 1.5  # an HSM or a cloud KMS having a bad moment
    codes: list[grpc.StatusCode] = []
    lock = threading.Lock()

    def decrypt(rec: tuple[bytes, str, dict[str, bytes]]) -> None:
        ct, key_id, ann = rec
        with unix_channel(rp.endpoint) as ch:
            stub = service_pb2_grpc.KeyManagementServiceStub(ch)
            try:
                stub.Decrypt(service_pb2.DecryptRequest(ciphertext=ct, key_id=key_id,
                                                        annotations=ann, uid="s"), timeout=5)
                code = grpc.StatusCode.OK
            except grpc.RpcError as exc:
                code = exc.code()
        with lock:
            codes.append(code)

    threads = [threading.Thread(target=decrypt, args=(r,)) for r in records]
    for t in threads:
        t.start()
    time.sleep(0.3)  # the storm is in: every slot waits for the backend
    with unix_channel(rp.endpoint) as ch:
        stub = service_pb2_grpc.KeyManagementServiceStub(ch)
        for _ in range(5):  # without a reserve, these would queue behind 1.5 s unwraps
            status = stub.Status(service_pb2.StatusRequest(), timeout=1.0)
            assert status.healthz == "ok"
            enc = stub.Encrypt(service_pb2.EncryptRequest(plaintext=b"s" * 32, uid="e"),
                               timeout=1.0)
            assert enc.key_id == status.key_id
    for t in threads:
        t.join()
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}
    assert codes.count(grpc.StatusCode.OK) >= 8  # every slot did its work
    assert codes.count(grpc.StatusCode.UNAVAILABLE) >= 1  # the rest was shed, not queued
    faulty.heal()
    for rec in records:  # shed requests succeed when tried again
        decrypt(rec)
    assert codes[-STORM:] == [grpc.StatusCode.OK] * STORM
