"""The awskms backend against moto's KMS server: a second, independent implementation.

moto checks no signatures but routes each request by the service in the SigV4 credential
scope, so these also pin that our scope says ``kms``.  Differences from AWS that matter here:
moto reports no CurrentKeyMaterialId (the version comes from ListKeyRotations) and lets a
disabled key encrypt and decrypt (only DescribeKey shows the state).
"""

from __future__ import annotations

import pytest

from kms_plugin.backends import errors
from kms_plugin.backends.base import RootKeyVersion
from tests.kms.awskms_rig import MotoKms

pytestmark = pytest.mark.moto

SEED = bytes(range(100, 132))
CONTEXT = {"kms-plugin.example.com/kek": "moto-1"}


def test_round_trip_on_moto(moto_kms: MotoKms) -> None:
    with moto_kms.backend() as backend:
        key = backend.current_key()
        assert key.key_ref == moto_kms.key_arn
        wrapped = backend.wrap(SEED, CONTEXT)
        assert wrapped.key == key
        assert backend.unwrap(wrapped.ciphertext, wrapped.key, CONTEXT) == SEED


def test_context_binding_on_moto(moto_kms: MotoKms) -> None:
    with moto_kms.backend() as backend:
        wrapped = backend.wrap(SEED, CONTEXT)
        with pytest.raises(errors.InvalidCiphertext):
            backend.unwrap(wrapped.ciphertext, wrapped.key, {"kms-plugin.example.com/kek": "x"})


def test_tampered_blob_on_moto_is_invalid_ciphertext(moto_kms: MotoKms) -> None:
    with moto_kms.backend() as backend:
        wrapped = backend.wrap(SEED, CONTEXT)
        blob = bytearray(wrapped.ciphertext)
        blob[-1] ^= 0x01
        with pytest.raises(errors.InvalidCiphertext):
            backend.unwrap(bytes(blob), wrapped.key, CONTEXT)


def test_rotation_on_moto_changes_the_version_and_old_blobs_unwrap(moto_kms: MotoKms) -> None:
    arn = moto_kms.create_key()
    with moto_kms.backend(key_id=arn) as backend:
        before = backend.current_key()
        assert before.version == "r0"
        old = backend.wrap(SEED, CONTEXT)
        moto_kms.rotate_key(arn)
        after = backend.current_key()
        assert after.key_ref == before.key_ref == arn
        assert after.version.startswith("r1-")
        moto_kms.rotate_key(arn)
        assert backend.current_key().version.startswith("r2-")
        assert backend.unwrap(old.ciphertext, old.key, CONTEXT) == SEED


def test_alias_on_moto_resolves_to_the_key_arn(moto_kms: MotoKms) -> None:
    arn = moto_kms.create_key()
    alias = f"alias/edge-{arn.rsplit('/', 1)[-1][:8]}"
    moto_kms.call("CreateAlias", {"AliasName": alias, "TargetKeyId": arn.rsplit("/", 1)[-1]})
    with moto_kms.backend(key_id=alias) as backend:
        assert backend.current_key().key_ref == arn


def test_disabled_key_on_moto_is_key_disabled(moto_kms: MotoKms) -> None:
    arn = moto_kms.create_key()
    with moto_kms.backend(key_id=arn) as backend:
        backend.current_key()
        moto_kms.disable_key(arn)
        with pytest.raises(errors.KeyDisabled, match="Disabled"):
            backend.current_key()
        moto_kms.enable_key(arn)
        assert backend.current_key().key_ref == arn


def test_key_pending_deletion_on_moto_is_key_disabled(moto_kms: MotoKms) -> None:
    arn = moto_kms.create_key()
    with moto_kms.backend(key_id=arn) as backend:
        moto_kms.schedule_deletion(arn)
        with pytest.raises(errors.KeyDisabled, match="PendingDeletion"):
            backend.current_key()


def test_unknown_key_on_moto_is_key_not_found(moto_kms: MotoKms) -> None:
    missing = moto_kms.key_arn.rsplit("/", 1)[0] + "/00000000-0000-4000-8000-000000000000"
    with moto_kms.backend(key_id=missing) as backend:
        with pytest.raises(errors.KeyNotFound, match="NotFoundException"):
            backend.current_key()
        with pytest.raises(errors.KeyNotFound):
            backend.wrap(SEED, CONTEXT)


def test_blob_named_with_another_key_on_moto_is_refused(moto_kms: MotoKms) -> None:
    other = moto_kms.create_key()
    with moto_kms.backend() as backend:
        wrapped = backend.wrap(SEED, CONTEXT)
        with pytest.raises(errors.BackendError):
            backend.unwrap(wrapped.ciphertext, RootKeyVersion(other, wrapped.key.version), CONTEXT)
