"""A moto-like fake AWS KMS for tests, demos and benchmarks.

A development tool of the source checkout: the product wheel and image do not ship it.

In process::

    from fake_kms import FakeKms
    with FakeKms() as kms:
        arn = kms.create_key()
        kms.inject_throttling(ops="Encrypt", count=2)
        ...  # point the awskms backend at kms.endpoint

From a shell in the checkout: ``python -m fake_kms --port 4599 --create-key``, which prints
one JSON line with the endpoint and keys.

``FakeKms(profile="local-kms")`` (``--profile``) answers like another AWS KMS emulator
instead of AWS: ``local-kms``, ``localstack``, ``localstack-legacy``, ``moto-legacy``
(:mod:`fake_kms.profiles`).
"""

from fake_kms.cli import main
from fake_kms.faults import Fault, FaultKind
from fake_kms.profiles import PROFILES, EmulationProfile, get_profile
from fake_kms.server import TEST_ACCESS_KEY_ID, TEST_SECRET_ACCESS_KEY, FakeKms, serve
from fake_kms.store import KeyStore, KmsApiError

__all__ = [
    "PROFILES",
    "TEST_ACCESS_KEY_ID",
    "TEST_SECRET_ACCESS_KEY",
    "EmulationProfile",
    "FakeKms",
    "Fault",
    "FaultKind",
    "KeyStore",
    "KmsApiError",
    "get_profile",
    "main",
    "serve",
]
