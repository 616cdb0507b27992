"""A moto-like fake AWS KMS, shipped with the plugin for tests, demos and benchmarks.

In process::

    from kms_plugin.fake_kms import FakeKms
    with FakeKms() as kms:
        arn = kms.create_key()
        kms.inject_throttling(ops="Encrypt", count=2)
        ...  # point the awskms backend at kms.endpoint

From a shell: ``kms-plugin fake-kms --port 4599 --create-key`` (or
``python -m kms_plugin.fake_kms``), which prints one JSON line with the endpoint and keys.

``FakeKms(profile="local-kms")`` (``--profile``) answers like another AWS KMS emulator
instead of AWS: ``local-kms``, ``localstack``, ``localstack-legacy``, ``moto-legacy``
(:mod:`kms_plugin.fake_kms.profiles`).
"""

from kms_plugin.fake_kms.cli import main
from kms_plugin.fake_kms.faults import Fault, FaultKind
from kms_plugin.fake_kms.profiles import PROFILES, EmulationProfile, get_profile
from kms_plugin.fake_kms.server import TEST_ACCESS_KEY_ID, TEST_SECRET_ACCESS_KEY, FakeKms, serve
from kms_plugin.fake_kms.store import KeyStore, KmsApiError

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
