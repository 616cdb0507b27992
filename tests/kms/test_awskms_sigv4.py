"""SigV4 signing, pinned to the values AWS publishes in its Signature Version 4 test suite.

Every vector uses the suite's fixed inputs: access key AKIDEXAMPLE, the documented example
secret, region us-east-1, service ``service``, time 2015-08-30T12:36:00Z, host
example.amazonaws.com.  The expected hashes and signatures are AWS's published numbers.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from kms_plugin.backends.awskms import sigv4
from kms_plugin.backends.awskms.credentials import AwsCredentials

SUITE_CREDS = AwsCredentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY")
SUITE_TIME = datetime(2015, 8, 30, 12, 36, 0, tzinfo=UTC)
SUITE_SCOPE = "20150830/us-east-1/service/aws4_request"
HOST = ("Host", "example.amazonaws.com")
# The session token the suite's get-vanilla-with-session-token vector is computed with.
SUITE_SESSION_TOKEN = "6e86291e8372ff2a2260956d9b8aae1d763fbf315fa00fa31553b73ebf194267"


def _sign(
    method: str,
    headers: list[tuple[str, str]],
    body: bytes = b"",
    query: tuple[tuple[str, str], ...] = (),
    creds: AwsCredentials = SUITE_CREDS,
) -> sigv4.SignedRequest:
    return sigv4.sign(
        method=method,
        path="/",
        headers=headers,
        body=body,
        credentials=creds,
        region="us-east-1",
        service="service",
        now=SUITE_TIME,
        query=query,
    )


def test_get_vanilla_matches_published_canonical_request_hash_and_signature() -> None:
    signed = _sign("GET", [HOST])
    lines = signed.string_to_sign.split("\n")
    assert lines == [
        "AWS4-HMAC-SHA256",
        "20150830T123600Z",
        SUITE_SCOPE,
        "bb579772317eb040ac9ed261061d46c1f17a8133879d6129b6e1c25292927e63",
    ]
    assert signed.signature == "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"
    assert signed.authorization == (
        f"AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/{SUITE_SCOPE}, "
        f"SignedHeaders=host;x-amz-date, Signature={signed.signature}"
    )
    assert signed.headers["X-Amz-Date"] == "20150830T123600Z"


def test_post_vanilla_matches_published_canonical_request_hash_and_signature() -> None:
    signed = _sign("POST", [HOST])
    assert signed.string_to_sign.split("\n")[3] == (
        "553f88c9e4d10fc9e109e2aeb65f030801b70c2f6468faca261d401ae622fc87"
    )
    assert signed.signature == "5da7c1a2acd57cee7505fc6676e4e544621c30862966e37dddb68e92efbe5d6b"


def test_post_with_a_body_and_content_type_matches_published_signature() -> None:
    signed = _sign(
        "POST",
        [("Content-Type", "application/x-www-form-urlencoded"), HOST],
        body=b"Param1=value1",
    )
    assert "SignedHeaders=content-type;host;x-amz-date," in signed.authorization
    assert signed.signature == "ff11897932ad3f4e8b18135d722051e5ac45fc38421b1da7b9d196a0fe09473a"


def test_query_parameters_are_sorted_as_in_the_published_vector() -> None:
    signed = _sign("GET", [HOST], query=(("Param2", "value2"), ("Param1", "value1")))
    assert signed.signature == "b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500"


def test_header_values_are_trimmed_and_spaces_folded_as_in_the_published_vector() -> None:
    signed = _sign("GET", [HOST, ("My-Header1", " value1"), ("My-Header2", ' "a   b   c"')])
    assert signed.signature == "acc3ed3afb60bb290fc8d2dd0098b9911fcaa05412b367055dee359757a9c736"


def test_session_token_is_added_signed_and_matches_published_signature() -> None:
    creds = AwsCredentials(
        SUITE_CREDS.access_key_id, SUITE_CREDS.secret_access_key, SUITE_SESSION_TOKEN
    )
    signed = _sign("GET", [HOST], creds=creds)
    assert signed.headers["X-Amz-Security-Token"] == SUITE_SESSION_TOKEN
    assert "SignedHeaders=host;x-amz-date;x-amz-security-token," in signed.authorization
    assert signed.signature == "07ec1639c89043aa0e3e2de82b96708f198cceab042d4a97044c66dd9f74e7f8"


def test_signing_key_matches_the_documented_derivation_example() -> None:
    key = sigv4.signing_key(SUITE_CREDS.secret_access_key, "20120215", "us-east-1", "iam")
    assert key.hex() == "f4780e2d9f65fa895f9c67b32ce1baf0b0d8a43505a000a1a9e090d414db404d"


def test_signing_requires_the_host_header() -> None:
    with pytest.raises(ValueError, match="host"):
        _sign("GET", [("X-Other", "1")])


def test_parse_authorization_reads_scope_and_rejects_garbage() -> None:
    signed = _sign("POST", [HOST])
    parsed = sigv4.parse_authorization(signed.authorization)
    assert parsed is not None
    assert (parsed.access_key_id, parsed.date_stamp, parsed.region, parsed.service) == (
        "AKIDEXAMPLE",
        "20150830",
        "us-east-1",
        "service",
    )
    assert parsed.signed_headers == ("host", "x-amz-date")
    assert parsed.signature == signed.signature
    assert sigv4.parse_authorization("AWS4-HMAC-SHA256 Credential=x") is None
    assert sigv4.parse_authorization("Basic dXNlcjpwYXNz") is None


def _verify(signed: sigv4.SignedRequest, body: bytes, secret: str) -> bool:
    parsed = sigv4.parse_authorization(signed.authorization)
    assert parsed is not None
    return sigv4.verify(
        method="POST",
        path="/",
        query=[],
        headers=list(signed.headers.items()),
        body=body,
        secret_access_key=secret,
        parsed=parsed,
    )


def test_verify_accepts_the_signed_request_and_rejects_tampering() -> None:
    body = b'{"KeyId":"k"}'
    signed = _sign("POST", [HOST, ("X-Amz-Target", "TrentService.Encrypt")], body=body)
    assert _verify(signed, body, SUITE_CREDS.secret_access_key)
    assert not _verify(signed, b'{"KeyId":"other"}', SUITE_CREDS.secret_access_key)
    assert not _verify(signed, body, "another-secret")
    tampered = sigv4.SignedRequest(
        {**signed.headers, "X-Amz-Target": "TrentService.Decrypt"},
        signed.canonical_request,
        signed.string_to_sign,
        signed.signature,
        signed.authorization,
    )
    assert not _verify(tampered, body, SUITE_CREDS.secret_access_key)
