"""Fuzz of KMS v2 and v1beta1 requests over the real socket (issue 14, "Tests").

Seeded random mutations of valid requests and random garbage: every answer is the right
plaintext (only for the untouched request) or a clean refusal (INVALID_ARGUMENT, or
FAILED_PRECONDITION for a record naming an unknown root key); never INTERNAL or UNKNOWN, never
another plaintext, and the plugin keeps serving.  The seed is printed on failure.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable

import grpc
import pytest

from edge_common.server import unix_channel
from edge_proto.kms.v1beta1 import service_pb2 as v1_pb2
from edge_proto.kms.v1beta1 import service_pb2_grpc as v1_grpc
from edge_proto.kms.v2 import service_pb2, service_pb2_grpc
from tests.kms.conftest import BackendRig, StartPlugin

ROUNDS = 250
SEED = int(os.environ.get("KMS_FUZZ_SEED", "1414"))
REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION}


def _mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    kind = rng.randrange(6)
    b = bytearray(data)
    if kind == 0 and b:
        b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    elif kind == 1:
        b = b[: rng.randrange(len(b) + 1)]
    elif kind == 2:
        b += rng.randbytes(rng.randrange(1, 64))
    elif kind == 3:
        b = bytearray(rng.randbytes(rng.randrange(0, 300)))
    elif kind == 4 and b:
        i = rng.randrange(len(b))
        b[i:i] = rng.randbytes(rng.randrange(1, 8))
    else:
        b = bytearray()
    return bytes(b)


def _call(fn: Callable[[], object]) -> tuple[grpc.StatusCode, object]:
    try:
        return grpc.StatusCode.OK, fn()
    except grpc.RpcError as exc:
        return exc.code(), exc.details()


def test_mutated_v2_decrypt_requests_are_refused_cleanly(
    local_backend_rig: BackendRig, start_plugin: StartPlugin
):
    rng = random.Random(SEED)
    rp = start_plugin(local_backend_rig)
    with unix_channel(rp.endpoint) as ch:
        stub = service_pb2_grpc.KeyManagementServiceStub(ch)
        seed = os.urandom(32)
        enc = stub.Encrypt(service_pb2.EncryptRequest(plaintext=seed, uid="f"), timeout=5)
        original = (bytes(enc.ciphertext), enc.key_id, dict(enc.annotations))
        for i in range(ROUNDS):
            ct, key_id, ann = original[0], original[1], dict(original[2])
            target = rng.randrange(4)
            if target == 0:
                ct = _mutate_bytes(rng, ct)
            elif target == 1:
                key_id = _mutate_bytes(rng, key_id.encode()).decode("utf-8", "replace")
            elif target == 2 and ann:
                name = rng.choice(list(ann))
                ann[name] = _mutate_bytes(rng, ann[name])
            else:
                ann[rng.choice(["x.example.com", "kms.edge.io", ""])[:40] or "a.b"] = (
                    rng.randbytes(rng.randrange(0, 40)))
                if rng.random() < 0.5 and len(ann) > 1:
                    ann.pop(rng.choice(list(ann)))
            req = service_pb2.DecryptRequest(ciphertext=ct, key_id=key_id, annotations=ann,
                                             uid=f"fuzz-{i}")
            code, answer = _call(lambda req=req: stub.Decrypt(req, timeout=5))
            untouched = (ct, key_id, ann) == original
            if code == grpc.StatusCode.OK:
                assert untouched and answer.plaintext == seed, (SEED, i)  # type: ignore[attr-defined]
            else:
                assert code in REFUSALS, (SEED, i, code, answer)
        for size in (0, 1, 32, 1024, 1025, 4096, 70000):  # Encrypt's input is the plaintext
            code, _ = _call(lambda size=size: stub.Encrypt(
                service_pb2.EncryptRequest(plaintext=os.urandom(size), uid="e"), timeout=5))
            assert code in {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}, (size, code)
        # still serving, and the original still decrypts
        assert stub.Decrypt(service_pb2.DecryptRequest(
            ciphertext=original[0], key_id=original[1], annotations=original[2]),
            timeout=5).plaintext == seed
        assert stub.Status(service_pb2.StatusRequest(), timeout=5).healthz == "ok"


def test_mutated_v1beta1_requests_are_refused_cleanly(
    local_backend_rig: BackendRig, start_plugin: StartPlugin
):
    rng = random.Random(SEED + 1)
    rp = start_plugin(local_backend_rig)
    with unix_channel(rp.endpoint) as ch:
        v1 = v1_grpc.KeyManagementServiceStub(ch)
        dek = os.urandom(32)
        blob = bytes(v1.Encrypt(v1_pb2.EncryptRequest(version="v1beta1", plain=dek),
                                timeout=5).cipher)
        for i in range(ROUNDS):
            cipher = _mutate_bytes(rng, blob)
            version = "v1beta1" if rng.random() < 0.9 else rng.choice(["", "v1", "v2", "\x00"])
            code, answer = _call(lambda c=cipher, v=version: v1.Decrypt(
                v1_pb2.DecryptRequest(version=v, cipher=c), timeout=5))
            if code == grpc.StatusCode.OK:
                assert cipher == blob and answer.plain == dek, (SEED, i)  # type: ignore[attr-defined]
            else:
                assert code in REFUSALS, (SEED, i, code, answer)
        assert v1.Decrypt(v1_pb2.DecryptRequest(version="v1beta1", cipher=blob),
                          timeout=5).plain == dek


@pytest.mark.parametrize("api", ["v2", "v1beta1"])
def test_pure_garbage_on_every_method_never_crashes_a_handler(
    api: str, local_backend_rig: BackendRig, start_plugin: StartPlugin
):
    rng = random.Random(SEED + 2)
    rp = start_plugin(local_backend_rig)
    service = ("v2.KeyManagementService" if api == "v2"
               else "v1beta1.KeyManagementService")
    methods = ["Status", "Encrypt", "Decrypt"] if api == "v2" else ["Version", "Encrypt",
                                                                      "Decrypt"]
    with unix_channel(rp.endpoint) as ch:
        for i in range(120):
            method = rng.choice(methods)
            call = ch.unary_unary(f"/{service}/{method}")
            code, answer = _call(lambda call=call: call(rng.randbytes(rng.randrange(0, 200)),
                                                        timeout=5))
            if answer == "Exception deserializing request!":
                continue  # grpcio refuses unparsable bytes itself; no handler ran
            assert code not in {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}, (
                SEED, i, method, code, answer)
        requests = rp.plugin.metrics.registry.get_sample_value
        assert not requests("kms_plugin_requests_total",
                            {"api": api, "method": "Decrypt", "code": "INTERNAL"})


def test_a_bug_in_a_handler_is_internal_naming_only_the_exception_type(
    local_backend_rig: BackendRig, start_plugin: StartPlugin, caplog: pytest.LogCaptureFixture
):
    rp = start_plugin(local_backend_rig)

    def broken(plaintext: bytes) -> object:
        raise RuntimeError("details that must not reach the caller")

    rp.plugin.keys.encrypt_seed = broken  # type: ignore[method-assign]
    with unix_channel(rp.endpoint) as ch:
        stub = service_pb2_grpc.KeyManagementServiceStub(ch)
        code, details = _call(lambda: stub.Encrypt(
            service_pb2.EncryptRequest(plaintext=b"s" * 32, uid="bug"), timeout=5))
        assert code == grpc.StatusCode.INTERNAL
        assert details == "internal error: RuntimeError"
        assert stub.Status(service_pb2.StatusRequest(), timeout=5).healthz == "ok"
    assert "rpc crashed" in caplog.text
    assert rp.plugin.metrics.registry.get_sample_value(
        "kms_plugin_requests_total", {"api": "v2", "method": "Encrypt", "code": "INTERNAL"}) == 1
