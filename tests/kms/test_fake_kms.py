"""The fake KMS itself, spoken to over raw HTTP: protocol, auth checks, keys, faults, admin."""

from __future__ import annotations

import base64
import http.client
import json
import threading
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import pytest

from fake_kms import TEST_ACCESS_KEY_ID, TEST_SECRET_ACCESS_KEY, FakeKms
from kms_plugin.backends.awskms import sigv4
from kms_plugin.backends.awskms.credentials import AwsCredentials
from tests.kms.awskms_rig import FakeKmsRig

CREDS = AwsCredentials(TEST_ACCESS_KEY_ID, TEST_SECRET_ACCESS_KEY)


def raw(
    endpoint: str,
    operation: str,
    payload: dict[str, Any] | None = None,
    *,
    creds: AwsCredentials | None = CREDS,
    region: str = "us-east-1",
    service: str = "kms",
    content_type: str = "application/x-amz-json-1.1",
    now: datetime | None = None,
    authorization: str | None = None,
) -> tuple[int, dict[str, Any]]:
    """One KMS JSON request; returns (status, decoded body)."""
    url = urlsplit(endpoint)
    body = json.dumps(payload or {}).encode()
    headers = {
        "Host": url.netloc,
        "Content-Type": content_type,
        "X-Amz-Target": f"TrentService.{operation}",
    }
    if creds is not None:
        signed = sigv4.sign(
            method="POST",
            path="/",
            headers=headers,
            body=body,
            credentials=creds,
            region=region,
            service=service,
            now=now or datetime.now(UTC),
        )
        headers = signed.headers
    if authorization is not None:
        headers["Authorization"] = authorization
        headers["X-Amz-Date"] = sigv4.amz_date(datetime.now(UTC))
    conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=10)
    try:
        conn.request("POST", "/", body=body, headers=headers)
        response = conn.getresponse()
        data = response.read()
        return response.status, json.loads(data) if data else {}
    finally:
        conn.close()


def admin(endpoint: str, method: str, path: str, spec: dict[str, Any] | None = None) -> Any:
    url = urlsplit(endpoint)
    conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=10)
    try:
        body = json.dumps(spec).encode() if spec is not None else b""
        headers = {"Content-Length": str(len(body)), "Content-Type": "application/json"}
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        conn.close()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def encrypt(rig: FakeKmsRig, plaintext: bytes, context: dict[str, str] | None = None) -> str:
    payload: dict[str, Any] = {"KeyId": rig.key_arn, "Plaintext": b64(plaintext)}
    if context:
        payload["EncryptionContext"] = context
    status, answer = raw(rig.endpoint, "Encrypt", payload)
    assert status == 200, answer
    blob: str = answer["CiphertextBlob"]
    return blob


# -- protocol and authentication ----------------------------------------------------------


def test_unsigned_request_is_missing_authentication_token(fake_kms: FakeKmsRig) -> None:
    status, answer = raw(fake_kms.endpoint, "DescribeKey", {"KeyId": fake_kms.key_arn}, creds=None)
    assert status == 400
    assert answer["__type"] == "MissingAuthenticationTokenException"


def test_malformed_authorization_is_incomplete_signature(fake_kms: FakeKmsRig) -> None:
    status, answer = raw(
        fake_kms.endpoint,
        "DescribeKey",
        {"KeyId": fake_kms.key_arn},
        creds=None,
        authorization="AWS4-HMAC-SHA256 Credential=nonsense",
    )
    assert (status, answer["__type"]) == (400, "IncompleteSignatureException")


def test_scope_for_another_service_is_refused(fake_kms: FakeKmsRig) -> None:
    status, answer = raw(
        fake_kms.endpoint, "DescribeKey", {"KeyId": fake_kms.key_arn}, service="s3"
    )
    assert (status, answer["__type"]) == (400, "InvalidSignatureException")
    assert "'kms'" in answer["message"]


def test_scope_for_another_region_is_refused(fake_kms: FakeKmsRig) -> None:
    status, answer = raw(
        fake_kms.endpoint, "DescribeKey", {"KeyId": fake_kms.key_arn}, region="eu-west-1"
    )
    assert (status, answer["__type"]) == (400, "InvalidSignatureException")


def test_wrong_secret_fails_signature_verification(fake_kms: FakeKmsRig) -> None:
    wrong = AwsCredentials(TEST_ACCESS_KEY_ID, "wrong-secret")
    status, answer = raw(fake_kms.endpoint, "DescribeKey", {"KeyId": fake_kms.key_arn}, creds=wrong)
    assert (status, answer["__type"]) == (400, "InvalidSignatureException")


def test_stale_signature_is_expired(fake_kms: FakeKmsRig) -> None:
    status, answer = raw(
        fake_kms.endpoint,
        "DescribeKey",
        {"KeyId": fake_kms.key_arn},
        now=datetime.now(UTC) - timedelta(hours=1),
    )
    assert (status, answer["__type"]) == (400, "InvalidSignatureException")
    assert "expired" in answer["message"]


def test_without_known_credentials_any_well_formed_signature_is_accepted() -> None:
    with FakeKms() as fake:
        arn = fake.create_key()
        other = AwsCredentials("AKIAANYONE", "any-secret")
        status, answer = raw(fake.endpoint, "DescribeKey", {"KeyId": arn}, creds=other)
        assert status == 200 and answer["KeyMetadata"]["Arn"] == arn
        assert fake.scopes_seen["us-east-1/kms"] == 1


def test_unknown_operation_and_wrong_content_type(fake_kms: FakeKmsRig) -> None:
    status, answer = raw(fake_kms.endpoint, "MakeCoffee", {})
    assert (status, answer["__type"]) == (400, "UnknownOperationException")
    status, answer = raw(fake_kms.endpoint, "ListKeys", {}, content_type="application/json")
    assert (status, answer["__type"]) == (400, "SerializationException")


# -- keys and ciphertexts -----------------------------------------------------------------


def test_encrypt_decrypt_round_trip_and_blob_format(fake_kms: FakeKmsRig) -> None:
    blob = encrypt(fake_kms, b"hello", {"a": "1"})
    assert base64.b64decode(blob)[:3] == b"FK\x01"
    status, answer = raw(
        fake_kms.endpoint, "Decrypt", {"CiphertextBlob": blob, "EncryptionContext": {"a": "1"}}
    )
    assert status == 200
    assert base64.b64decode(answer["Plaintext"]) == b"hello"
    assert answer["KeyId"] == fake_kms.key_arn


def test_decrypt_under_another_context_is_invalid_ciphertext(fake_kms: FakeKmsRig) -> None:
    blob = encrypt(fake_kms, b"hello", {"a": "1"})
    for context in ({"a": "2"}, {}, {"a": "1", "b": "2"}):
        status, answer = raw(
            fake_kms.endpoint, "Decrypt", {"CiphertextBlob": blob, "EncryptionContext": context}
        )
        assert (status, answer["__type"]) == (400, "InvalidCiphertextException")


def test_every_tampered_byte_is_invalid_ciphertext(fake_kms: FakeKmsRig) -> None:
    blob = base64.b64decode(encrypt(fake_kms, b"hello"))
    for index in range(len(blob)):
        bad = bytearray(blob)
        bad[index] ^= 0x80
        status, answer = raw(fake_kms.endpoint, "Decrypt", {"CiphertextBlob": b64(bytes(bad))})
        assert status == 400, index
        assert answer["__type"] in ("InvalidCiphertextException", "NotFoundException"), index
    status, answer = raw(fake_kms.endpoint, "Decrypt", {"CiphertextBlob": b64(blob[:20])})
    assert answer["__type"] == "InvalidCiphertextException"


def test_decrypt_naming_another_key_is_incorrect_key(fake_kms: FakeKmsRig) -> None:
    blob = encrypt(fake_kms, b"hello")
    other = fake_kms.create_key()
    status, answer = raw(fake_kms.endpoint, "Decrypt", {"CiphertextBlob": blob, "KeyId": other})
    assert (status, answer["__type"]) == (400, "IncorrectKeyException")


def test_rotation_adds_material_and_old_blobs_still_decrypt(fake_kms: FakeKmsRig) -> None:
    _, before = raw(fake_kms.endpoint, "DescribeKey", {"KeyId": fake_kms.key_arn})
    old = encrypt(fake_kms, b"old")
    status, answer = raw(fake_kms.endpoint, "RotateKeyOnDemand", {"KeyId": fake_kms.key_arn})
    assert status == 200
    _, after = raw(fake_kms.endpoint, "DescribeKey", {"KeyId": fake_kms.key_arn})
    assert (
        before["KeyMetadata"]["CurrentKeyMaterialId"]
        != after["KeyMetadata"]["CurrentKeyMaterialId"]
    )
    new = encrypt(fake_kms, b"new")
    assert base64.b64decode(old)[:23] != base64.b64decode(new)[:23]  # other material ordinal
    for blob, plain in ((old, b"old"), (new, b"new")):
        status, answer = raw(fake_kms.endpoint, "Decrypt", {"CiphertextBlob": blob})
        assert status == 200 and base64.b64decode(answer["Plaintext"]) == plain
    _, rotations = raw(fake_kms.endpoint, "ListKeyRotations", {"KeyId": fake_kms.key_arn})
    assert [r["RotationType"] for r in rotations["Rotations"]] == ["ON_DEMAND"]
    assert (
        rotations["Rotations"][0]["KeyMaterialId"] == (after["KeyMetadata"]["CurrentKeyMaterialId"])
    )


def test_list_key_rotations_pages_with_markers(fake_kms: FakeKmsRig) -> None:
    for _ in range(3):
        fake_kms.rotate_key()
    seen: list[str] = []
    marker = None
    for _ in range(10):
        payload: dict[str, Any] = {"KeyId": fake_kms.key_arn, "Limit": 2}
        if marker:
            payload["Marker"] = marker
        status, page = raw(fake_kms.endpoint, "ListKeyRotations", payload)
        assert status == 200
        seen += [r["KeyMaterialId"] for r in page["Rotations"]]
        if not page["Truncated"]:
            break
        marker = page["NextMarker"]
    assert len(seen) == 3 and len(set(seen)) == 3


def test_key_material_ids_can_be_hidden_like_older_kms() -> None:
    with FakeKms(report_key_material_id=False) as fake:
        arn = fake.create_key()
        fake.rotate_key(arn)
        _, described = raw(fake.endpoint, "DescribeKey", {"KeyId": arn})
        assert "CurrentKeyMaterialId" not in described["KeyMetadata"]
        _, rotations = raw(fake.endpoint, "ListKeyRotations", {"KeyId": arn})
        assert len(rotations["Rotations"]) == 1
        assert "KeyMaterialId" not in rotations["Rotations"][0]


def test_key_states_disabled_pending_deletion_and_purged(fake_kms: FakeKmsRig) -> None:
    blob = encrypt(fake_kms, b"x")
    raw(fake_kms.endpoint, "DisableKey", {"KeyId": fake_kms.key_arn})
    status, answer = raw(fake_kms.endpoint, "Decrypt", {"CiphertextBlob": blob})
    assert answer["__type"] == "DisabledException"
    raw(fake_kms.endpoint, "EnableKey", {"KeyId": fake_kms.key_arn})
    status, answer = raw(
        fake_kms.endpoint,
        "ScheduleKeyDeletion",
        {"KeyId": fake_kms.key_arn, "PendingWindowInDays": 6},
    )
    assert answer["__type"] == "ValidationException"
    status, answer = raw(
        fake_kms.endpoint,
        "ScheduleKeyDeletion",
        {"KeyId": fake_kms.key_arn, "PendingWindowInDays": 7},
    )
    assert status == 200 and answer["KeyState"] == "PendingDeletion"
    status, answer = raw(
        fake_kms.endpoint, "Encrypt", {"KeyId": fake_kms.key_arn, "Plaintext": b64(b"x")}
    )
    assert answer["__type"] == "KMSInvalidStateException"
    raw(fake_kms.endpoint, "CancelKeyDeletion", {"KeyId": fake_kms.key_arn})
    assert fake_kms.key_state() == "Disabled"
    fake_kms.delete_key()
    status, answer = raw(fake_kms.endpoint, "DescribeKey", {"KeyId": fake_kms.key_arn})
    assert answer["__type"] == "NotFoundException"
    status, answer = raw(fake_kms.endpoint, "Decrypt", {"CiphertextBlob": blob})
    assert answer["__type"] == "NotFoundException"


def test_rotation_status_and_aliases(fake_kms: FakeKmsRig) -> None:
    _, answer = raw(fake_kms.endpoint, "GetKeyRotationStatus", {"KeyId": fake_kms.key_arn})
    assert answer["KeyRotationEnabled"] is False
    raw(
        fake_kms.endpoint,
        "EnableKeyRotation",
        {"KeyId": fake_kms.key_arn, "RotationPeriodInDays": 90},
    )
    _, answer = raw(fake_kms.endpoint, "GetKeyRotationStatus", {"KeyId": fake_kms.key_arn})
    assert answer["KeyRotationEnabled"] is True and answer["RotationPeriodInDays"] == 90
    status, _ = raw(
        fake_kms.endpoint,
        "CreateAlias",
        {"AliasName": "alias/edge", "TargetKeyId": fake_kms.key_arn},
    )
    assert status == 200
    status, answer = raw(
        fake_kms.endpoint,
        "CreateAlias",
        {"AliasName": "alias/edge", "TargetKeyId": fake_kms.key_arn},
    )
    assert answer["__type"] == "AlreadyExistsException"
    _, answer = raw(fake_kms.endpoint, "ListAliases", {})
    assert [a["AliasName"] for a in answer["Aliases"]] == ["alias/edge"]
    _, answer = raw(fake_kms.endpoint, "DescribeKey", {"KeyId": "alias/edge"})
    assert answer["KeyMetadata"]["Arn"] == fake_kms.key_arn


def test_only_symmetric_encrypt_decrypt_keys_are_supported(fake_kms: FakeKmsRig) -> None:
    status, answer = raw(fake_kms.endpoint, "CreateKey", {"KeySpec": "RSA_2048"})
    assert (status, answer["__type"]) == (400, "UnsupportedOperationException")


# -- faults and counters ------------------------------------------------------------------


def test_counted_fault_fires_exactly_count_times_on_its_operations(fake_kms: FakeKmsRig) -> None:
    fault = fake_kms.inject_throttling(ops="Encrypt", count=2)
    payload = {"KeyId": fake_kms.key_arn, "Plaintext": b64(b"x")}
    results = [raw(fake_kms.endpoint, "Encrypt", payload)[1].get("__type") for _ in range(3)]
    assert results == ["ThrottlingException", "ThrottlingException", None]
    status, _ = raw(fake_kms.endpoint, "DescribeKey", {"KeyId": fake_kms.key_arn})
    assert status == 200  # another operation is untouched
    assert fault.fired == 2
    assert fake_kms.calls == {"Encrypt": 3, "DescribeKey": 1}


def test_server_error_fault_answers_5xx(fake_kms: FakeKmsRig) -> None:
    fake_kms.inject_server_error(503, error_type="ServiceUnavailableException", count=1)
    status, answer = raw(fake_kms.endpoint, "ListKeys", {})
    assert (status, answer["__type"]) == (503, "ServiceUnavailableException")


def test_drop_fault_closes_the_connection_without_an_answer(fake_kms: FakeKmsRig) -> None:
    fake_kms.inject_drop(count=1)
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
        raw(fake_kms.endpoint, "ListKeys", {})
    assert raw(fake_kms.endpoint, "ListKeys", {})[0] == 200


def test_disabled_exception_fault_without_touching_the_key(fake_kms: FakeKmsRig) -> None:
    fake_kms.inject_error("DisabledException", ops=["Decrypt"])
    blob = encrypt(fake_kms, b"x")
    _, answer = raw(fake_kms.endpoint, "Decrypt", {"CiphertextBlob": blob})
    assert answer["__type"] == "DisabledException"
    assert fake_kms.key_state() == "Enabled"


@pytest.mark.timeout(30)
def test_stop_ends_requests_held_by_a_latency_fault() -> None:
    fake = FakeKms().start()
    fake.inject_latency(600)
    outcome: list[object] = []

    def call() -> None:
        try:
            outcome.append(raw(fake.endpoint, "ListKeys", {})[0])
        except (OSError, http.client.HTTPException) as exc:
            outcome.append(exc)

    worker = threading.Thread(target=call)
    worker.start()
    while fake.total_calls == 0 and worker.is_alive():
        worker.join(0.01)
    fake.stop()
    worker.join(20)
    assert not worker.is_alive()
    assert outcome and isinstance(outcome[0], (OSError, http.client.HTTPException))


# -- admin HTTP path ----------------------------------------------------------------------


def test_admin_http_controls_faults_counters_and_keys(fake_kms: FakeKmsRig) -> None:
    endpoint = fake_kms.endpoint
    status, answer = admin(
        endpoint,
        "POST",
        "/_fake/faults",
        {"kind": "error", "error_type": "ThrottlingException", "ops": ["DescribeKey"], "count": 1},
    )
    assert status == 200 and answer["id"] >= 1
    assert admin(endpoint, "GET", "/_fake/faults")[1]["faults"][0]["remaining"] == 1
    _, answer = raw(endpoint, "DescribeKey", {"KeyId": fake_kms.key_arn})
    assert answer["__type"] == "ThrottlingException"
    assert admin(endpoint, "GET", "/_fake/calls")[1] == {"calls": {"DescribeKey": 1}}
    admin(endpoint, "POST", "/_fake/calls/reset", {})
    assert admin(endpoint, "GET", "/_fake/calls")[1] == {"calls": {}}

    admin(endpoint, "POST", "/_fake/faults", {"kind": "latency", "seconds": 0.01})
    admin(endpoint, "DELETE", "/_fake/faults")
    assert admin(endpoint, "GET", "/_fake/faults")[1] == {"faults": []}

    status, created = admin(endpoint, "POST", "/_fake/keys", {"description": "via admin"})
    arn = created["arn"]
    assert status == 200 and arn.startswith("arn:aws:kms:us-east-1:")
    status, rotated = admin(endpoint, "POST", f"/_fake/keys/{arn}/rotate", {})
    assert status == 200 and len(rotated["key_material_id"]) == 64
    admin(endpoint, "POST", f"/_fake/keys/{arn}/disable", {})
    assert fake_kms.key_state(arn) == "Disabled"
    admin(endpoint, "POST", f"/_fake/keys/{arn}/enable", {})
    admin(endpoint, "POST", f"/_fake/keys/{arn}/schedule-deletion", {"days": 7})
    assert fake_kms.key_state(arn) == "PendingDeletion"
    admin(endpoint, "POST", f"/_fake/keys/{arn}/delete", {})
    status, answer = admin(endpoint, "POST", f"/_fake/keys/{arn}/enable", {})
    assert (status, answer["__type"]) == (400, "NotFoundException")


def test_admin_http_refuses_unknown_routes_and_bad_specs(fake_kms: FakeKmsRig) -> None:
    assert admin(fake_kms.endpoint, "GET", "/_fake/nothing")[0] == 404
    assert admin(fake_kms.endpoint, "GET", "/elsewhere")[0] == 404
    status, _ = admin(fake_kms.endpoint, "POST", "/_fake/faults", {"kind": "meteor"})
    assert status == 400
    status, _ = admin(fake_kms.endpoint, "POST", "/_fake/faults", {"kind": "latency"})
    assert status == 400
