"""HTTPS, as real AWS KMS speaks it: the fake behind a self-signed certificate."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fake_kms import TEST_ACCESS_KEY_ID, TEST_SECRET_ACCESS_KEY, FakeKms
from kms_plugin.backends import errors
from kms_plugin.backends.awskms import AwsKmsBackend, AwsKmsOptions
from tests.kms.awskms_rig import FAST_RETRIES, isolated_env


def _self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake-kms.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path = directory / "cert.pem"
    key_path = directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture
def tls_fake(tmp_path: Path) -> Iterator[tuple[FakeKms, str, Path]]:
    cert, key = _self_signed(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    with FakeKms(credentials={TEST_ACCESS_KEY_ID: TEST_SECRET_ACCESS_KEY}, tls=context) as fake:
        yield fake, fake.create_key(), cert


def _backend(fake: FakeKms, arn: str, **extra: object) -> AwsKmsBackend:
    options = {
        "key_id": arn,
        "endpoint_url": fake.endpoint,
        "region": fake.region,
        "access_key_id": TEST_ACCESS_KEY_ID,
        "secret_access_key": TEST_SECRET_ACCESS_KEY,
        **FAST_RETRIES,
        **extra,
    }
    return AwsKmsBackend(AwsKmsOptions.parse(options), env=isolated_env())


def test_round_trip_over_https_with_a_ca_bundle(tls_fake: tuple[FakeKms, str, Path]) -> None:
    fake, arn, cert = tls_fake
    assert fake.endpoint.startswith("https://")
    backend = _backend(fake, arn, ca_bundle=str(cert))
    try:
        wrapped = backend.wrap(b"seed over tls", {"a": "b"})
        assert backend.unwrap(wrapped.ciphertext, wrapped.key, {"a": "b"}) == b"seed over tls"
    finally:
        backend.close()


def test_untrusted_certificate_is_unavailable_and_not_retried(
    tls_fake: tuple[FakeKms, str, Path],
) -> None:
    fake, arn, _ = tls_fake
    backend = _backend(fake, arn, max_attempts=3)
    try:
        with pytest.raises(errors.BackendUnavailable, match="not trusted"):
            backend.current_key()
        assert backend.client.attempts == 1
        assert fake.total_calls == 0
    finally:
        backend.close()
