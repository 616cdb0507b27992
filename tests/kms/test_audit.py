"""The audit trail of key operations."""

from __future__ import annotations

import io
import json
import os

import grpc
import pytest

from edge_common.server import unix_channel
from edge_proto.kms.v2 import service_pb2, service_pb2_grpc
from tests.kms.conftest import BackendRig, StartPlugin


def test_every_encrypt_and_decrypt_leaves_one_audit_line_without_secrets(
    local_backend_rig: BackendRig, start_plugin: StartPlugin
):
    stream = io.StringIO()
    rp = start_plugin(local_backend_rig, audit_stream=stream, log_format="json")
    seed = os.urandom(32)
    with unix_channel(rp.endpoint) as ch:
        stub = service_pb2_grpc.KeyManagementServiceStub(ch)
        enc = stub.Encrypt(service_pb2.EncryptRequest(plaintext=seed, uid="uid-enc"), timeout=3)
        stub.Decrypt(service_pb2.DecryptRequest(ciphertext=enc.ciphertext, key_id=enc.key_id,
                                                annotations=enc.annotations, uid="uid-dec"),
                     timeout=3)
        with pytest.raises(grpc.RpcError):
            stub.Decrypt(service_pb2.DecryptRequest(ciphertext=b"x", key_id=enc.key_id,
                                                    annotations=enc.annotations, uid="uid-bad"),
                         timeout=3)
        stub.Status(service_pb2.StatusRequest(), timeout=3)
    assert rp.plugin.audit is not None
    rp.plugin.audit.flush()
    lines = [json.loads(x) for x in stream.getvalue().splitlines()]
    assert [(x["request_uid"], x["method"], x["code"]) for x in lines] == [
        ("uid-enc", "Encrypt", "OK"),
        ("uid-dec", "Decrypt", "OK"),
        ("uid-bad", "Decrypt", "INVALID_ARGUMENT"),
    ]
    assert all(x["logger"] == "kms_plugin.audit" and x["api"] == "v2" for x in lines)
    assert all(x["key_id_hash"].startswith("sha256:") for x in lines)
    text = stream.getvalue()
    assert seed.hex() not in text and enc.key_id not in text
    assert enc.ciphertext.hex() not in text


def test_no_audit_log_writes_nothing(local_backend_rig: BackendRig, start_plugin: StartPlugin):
    stream = io.StringIO()
    rp = start_plugin(local_backend_rig, audit_stream=stream, audit_log=False)
    with unix_channel(rp.endpoint) as ch:
        stub = service_pb2_grpc.KeyManagementServiceStub(ch)
        stub.Encrypt(service_pb2.EncryptRequest(plaintext=os.urandom(32), uid="u"), timeout=3)
    assert rp.plugin.audit is None and stream.getvalue() == ""


def test_a_json_line_is_exactly_what_json_dumps_writes_even_for_hostile_uids() -> None:
    import time

    from kms_plugin.audit import AuditLog

    log = AuditLog(stream=io.StringIO())
    try:
        for uid, error in (("0f8fad5b-d9cb-469f-a165-70867728950e", ""),
                           ('u"\\\n\u00e9\u2028\x00', 'bad "input" \u00fc')):
            entry = (time.time(), "v1beta1", "Decrypt", "INVALID_ARGUMENT" if error else "OK",
                     uid, "sha256:" + "ab" * 32, error)
            line = log.format(entry)
            parsed = json.loads(line)
            assert parsed["request_uid"] == uid
            assert line == json.dumps({
                "ts": parsed["ts"], "level": parsed["level"], "logger": "kms_plugin.audit",
                "msg": "v1beta1 Decrypt" + (f" refused: {error}" if error else ""),
                "request_uid": uid, "api": "v1beta1", "method": "Decrypt",
                "code": entry[3], "key_id_hash": entry[5],
            })
    finally:
        log.close()
