"""The wire formats: strict parsing, one error for every bad input, kube-apiserver's rules."""

from __future__ import annotations

import os

import pytest

from kms_plugin.backends.base import RootKeyVersion
from kms_plugin.envelope import (
    ANNOTATION_KEY,
    EnvelopeError,
    KekRecord,
    LegacyBlob,
    SealedSeed,
    annotation_problems,
    derive_key_id,
    is_fully_qualified_domain_name,
    parse_decrypt_request,
    parse_legacy_blob,
)

ROOT = RootKeyVersion("arn:aws:kms:eu-west-1:123456789012:key/abc", "m-1")


def record(**kw: object) -> KekRecord:
    values: dict = {"kek_id": b"k" * 16, "backend": "awskms", "root": ROOT, "wrapped": b"w" * 40}
    values.update(kw)
    return KekRecord(**values)


def test_kek_record_round_trips_and_starts_with_its_version_byte():
    rec = record()
    data = rec.encode()
    assert data[0] == 0x01
    assert KekRecord.decode(data) == rec


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: b"",
        lambda d: b"\x02" + d[1:],  # unknown format version
        lambda d: d[:-1],  # truncated
        lambda d: d + b"\x00",  # trailing bytes
        lambda d: d[:17] + b"\x00" + d[18:],  # empty backend name
        lambda d: d[:17] + b"\x06AWSKMS" + d[24:],  # backend name not lowercase
    ],
    ids=["empty", "version", "truncated", "trailing", "empty-backend", "bad-backend"],
)
def test_malformed_kek_records_are_one_error_type(mutate):
    with pytest.raises(EnvelopeError) as info:
        KekRecord.decode(mutate(record().encode()))
    assert str(info.value) == EnvelopeError.MESSAGE  # the cause is not in the message


def test_key_id_is_stable_and_differs_for_every_backend_key_ref_and_version():
    ids = {
        derive_key_id("local", RootKeyVersion("ring", "g1")),
        derive_key_id("local", RootKeyVersion("ring", "g2")),
        derive_key_id("local", RootKeyVersion("ring2", "g1")),
        derive_key_id("pkcs11", RootKeyVersion("ring", "g1")),
        # no ambiguity from concatenation
        derive_key_id("local", RootKeyVersion("ring", "1g")),
        derive_key_id("local", RootKeyVersion("rin", "gg1")),
    }
    assert len(ids) == 6
    assert derive_key_id("local", RootKeyVersion("ring", "g1")) == derive_key_id(
        "local", RootKeyVersion("ring", "g1")
    )
    assert all(1 <= len(i.encode()) <= 1024 for i in ids)


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("kek.kms-plugin.edge.io", True),
        ("a.b", True),
        ("example.com.", True),
        ("single", False),
        ("Upper.example.com", False),
        ("kms.example.com/key", False),
        ("-bad.example.com", False),
        ("x" * 64 + ".com", False),
        ("", False),
        ("a..b", False),
    ],
)
def test_annotation_keys_follow_kube_apiservers_fqdn_rule(name, ok):
    assert is_fully_qualified_domain_name(name) is ok


def test_annotations_over_32_kib_in_total_are_rejected():
    assert annotation_problems({"a.example.com": b"x" * (32 * 1024 - 13)}) == []
    assert annotation_problems({"a.example.com": b"x" * (32 * 1024 - 12)})


def _request(key_id: str | None = None):
    rec = record()
    sealed = SealedSeed(rec.kek_id, os.urandom(12), os.urandom(48)).encode()
    return sealed, key_id or rec.key_id, {ANNOTATION_KEY: rec.encode()}


def test_decrypt_request_is_accepted_when_every_part_matches():
    ct, key_id, ann = _request()
    parsed = parse_decrypt_request(ct, key_id, ann)
    assert parsed.record.root == ROOT


@pytest.mark.parametrize(
    "change",
    [
        lambda ct, k, a: (ct, "", a),
        lambda ct, k, a: (ct, "x" * 1025, a),
        lambda ct, k, a: (ct, k + "x", a),
        lambda ct, k, a: (b"", k, a),
        lambda ct, k, a: (ct[:40], k, a),
        lambda ct, k, a: (ct + b"\x00" * 1024, k, a),
        lambda ct, k, a: (b"\x02" + ct[1:], k, a),
        lambda ct, k, a: (ct[:1] + b"z" * 16 + ct[17:], k, a),  # another local KEK id
        lambda ct, k, a: (ct, k, {}),
        lambda ct, k, a: (ct, k, {**a, "b.example.com": b""}),
        lambda ct, k, a: (ct, k, {"other.example.com": a[ANNOTATION_KEY]}),
    ],
)
def test_mismatched_or_malformed_decrypt_requests_are_refused_before_any_key_is_used(change):
    with pytest.raises(EnvelopeError):
        parse_decrypt_request(*change(*_request()))


def test_legacy_blob_carries_key_id_and_record_and_is_parsed_strictly():
    rec = record()
    blob = LegacyBlob(rec.key_id, rec.encode(), os.urandom(12), os.urandom(40)).encode()
    legacy, parsed = parse_legacy_blob(blob)
    assert parsed == rec and legacy.key_id == rec.key_id
    for bad in (blob[:-30], b"\x09" + blob[1:], b""):
        with pytest.raises(EnvelopeError):
            parse_legacy_blob(bad)
    other = LegacyBlob("kp1:awskms:other", rec.encode(), os.urandom(12), os.urandom(40))
    with pytest.raises(EnvelopeError):
        parse_legacy_blob(other.encode())
