"""Credentials, region and endpoint: options, environment, shared credentials file, profiles.

The fake verifies every signature against the test credential, so a round trip proves
which credentials the backend actually signed with.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kms_plugin.backends import errors
from kms_plugin.backends.awskms.credentials import (
    read_credentials_file,
    resolve_credentials,
    resolve_endpoint,
    resolve_region,
)
from tests.kms.awskms_rig import FakeKmsRig, isolated_env

SEED = b"0123456789abcdef0123456789abcdef"
CONTEXT = {"edge.example.com/purpose": "test"}
WRONG_SECRET = "definitely-not-the-secret"


def _round_trip(fake_kms: FakeKmsRig, *, env: dict[str, str], **overrides: object) -> None:
    backend = fake_kms.backend(env=env, access_key_id=None, secret_access_key=None, **overrides)
    wrapped = backend.wrap(SEED, CONTEXT)
    assert backend.unwrap(wrapped.ciphertext, wrapped.key, CONTEXT) == SEED


def _write_credentials(path: Path, profiles: dict[str, tuple[str, str]]) -> Path:
    lines = []
    for name, (access, secret) in profiles.items():
        lines += [f"[{name}]", f"aws_access_key_id = {access}", f"aws_secret_access_key = {secret}"]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_credentials_from_the_environment(fake_kms: FakeKmsRig) -> None:
    env = isolated_env(
        AWS_ACCESS_KEY_ID=fake_kms.access_key_id,
        AWS_SECRET_ACCESS_KEY=fake_kms.secret_access_key,
    )
    _round_trip(fake_kms, env=env)
    assert (
        fake_kms.backend(env=env, access_key_id=None, secret_access_key=None).credentials_source
        == "environment"
    )


def test_wrong_secret_is_refused_by_the_fake_and_not_retried(fake_kms: FakeKmsRig) -> None:
    env = isolated_env(AWS_ACCESS_KEY_ID=fake_kms.access_key_id, AWS_SECRET_ACCESS_KEY=WRONG_SECRET)
    backend = fake_kms.backend(env=env, access_key_id=None, secret_access_key=None, max_attempts=3)
    with pytest.raises(errors.BackendError, match="InvalidSignatureException"):
        backend.current_key()
    assert fake_kms.calls["DescribeKey"] == 1


def test_unknown_access_key_is_unrecognized_client(fake_kms: FakeKmsRig) -> None:
    backend = fake_kms.backend(access_key_id="AKIAUNKNOWN000000000")
    with pytest.raises(errors.BackendError, match="UnrecognizedClientException"):
        backend.current_key()


def test_options_win_over_the_environment(fake_kms: FakeKmsRig) -> None:
    env = isolated_env(AWS_ACCESS_KEY_ID="AKIAWRONG", AWS_SECRET_ACCESS_KEY=WRONG_SECRET)
    backend = fake_kms.backend(env=env)  # the rig passes the right keys as options
    assert backend.credentials_source == "options"
    backend.current_key()


def test_default_profile_of_the_shared_credentials_file(
    fake_kms: FakeKmsRig, tmp_path: Path
) -> None:
    path = _write_credentials(
        tmp_path / "credentials",
        {"default": (fake_kms.access_key_id, fake_kms.secret_access_key)},
    )
    _round_trip(fake_kms, env=isolated_env(AWS_SHARED_CREDENTIALS_FILE=str(path)))


def test_home_credentials_file_is_the_last_resort(fake_kms: FakeKmsRig, tmp_path: Path) -> None:
    (tmp_path / ".aws").mkdir()
    _write_credentials(
        tmp_path / ".aws" / "credentials",
        {"default": (fake_kms.access_key_id, fake_kms.secret_access_key)},
    )
    _round_trip(fake_kms, env=isolated_env(HOME=str(tmp_path)))


def test_profile_option_selects_its_section(fake_kms: FakeKmsRig, tmp_path: Path) -> None:
    path = _write_credentials(
        tmp_path / "credentials",
        {
            "default": (fake_kms.access_key_id, WRONG_SECRET),
            "edge": (fake_kms.access_key_id, fake_kms.secret_access_key),
        },
    )
    env = isolated_env()
    _round_trip(fake_kms, env=env, credentials_file=str(path), profile="edge")
    # The same file without the profile signs with the default section's (wrong) secret.
    backend = fake_kms.backend(
        env=env, access_key_id=None, secret_access_key=None, credentials_file=str(path)
    )
    with pytest.raises(errors.BackendError, match="InvalidSignatureException"):
        backend.current_key()


def test_aws_profile_environment_selects_the_section(fake_kms: FakeKmsRig, tmp_path: Path) -> None:
    path = _write_credentials(
        tmp_path / "credentials",
        {
            "default": (fake_kms.access_key_id, WRONG_SECRET),
            "edge": (fake_kms.access_key_id, fake_kms.secret_access_key),
        },
    )
    _round_trip(
        fake_kms,
        env=isolated_env(AWS_SHARED_CREDENTIALS_FILE=str(path), AWS_PROFILE="edge"),
    )


def test_environment_keys_win_over_the_credentials_file(
    fake_kms: FakeKmsRig, tmp_path: Path
) -> None:
    path = _write_credentials(
        tmp_path / "credentials", {"default": (fake_kms.access_key_id, WRONG_SECRET)}
    )
    env = isolated_env(
        AWS_SHARED_CREDENTIALS_FILE=str(path),
        AWS_ACCESS_KEY_ID=fake_kms.access_key_id,
        AWS_SECRET_ACCESS_KEY=fake_kms.secret_access_key,
    )
    _round_trip(fake_kms, env=env)


def test_rewritten_credentials_file_is_picked_up_without_restart(
    fake_kms: FakeKmsRig, tmp_path: Path
) -> None:
    path = _write_credentials(
        tmp_path / "credentials", {"default": (fake_kms.access_key_id, WRONG_SECRET)}
    )
    backend = fake_kms.backend(
        env=isolated_env(), access_key_id=None, secret_access_key=None, credentials_file=str(path)
    )
    with pytest.raises(errors.BackendError, match="InvalidSignatureException"):
        backend.current_key()
    _write_credentials(path, {"default": (fake_kms.access_key_id, fake_kms.secret_access_key)})
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert backend.current_key().key_ref == fake_kms.key_arn


def test_missing_profile_is_a_config_error(tmp_path: Path) -> None:
    path = _write_credentials(tmp_path / "credentials", {"default": ("AKIAX", "secret")})
    with pytest.raises(errors.BackendConfigError, match="'edge'"):
        resolve_credentials(
            access_key_id=None,
            secret_access_key=None,
            session_token=None,
            credentials_file=str(path),
            profile="edge",
            env=isolated_env(),
        )


def test_no_credentials_anywhere_is_a_config_error() -> None:
    with pytest.raises(errors.BackendConfigError, match="no AWS credentials"):
        resolve_credentials(
            access_key_id=None,
            secret_access_key=None,
            session_token=None,
            credentials_file=None,
            profile=None,
            env=isolated_env(),
        )


def test_half_given_credentials_are_a_config_error() -> None:
    with pytest.raises(errors.BackendConfigError, match="together"):
        resolve_credentials(
            access_key_id="AKIAX",
            secret_access_key=None,
            session_token=None,
            credentials_file=None,
            profile=None,
            env=isolated_env(),
        )
    with pytest.raises(errors.BackendConfigError, match="together"):
        resolve_credentials(
            access_key_id=None,
            secret_access_key=None,
            session_token=None,
            credentials_file=None,
            profile=None,
            env=isolated_env(AWS_ACCESS_KEY_ID="AKIAX"),
        )


def test_session_token_from_the_file_and_secrets_out_of_repr(tmp_path: Path) -> None:
    path = tmp_path / "credentials"
    path.write_text(
        "[default]\naws_access_key_id = AKIAX\naws_secret_access_key = s3cret-value\n"
        "aws_session_token = t0ken-value\n"
    )
    creds = read_credentials_file(path, "default")
    assert creds.session_token == "t0ken-value"
    assert "s3cret-value" not in repr(creds) and "t0ken-value" not in repr(creds)


def test_malformed_credentials_file_error_does_not_quote_the_file(tmp_path: Path) -> None:
    path = tmp_path / "credentials"
    path.write_text("aws_secret_access_key = s3cret-value-outside-any-section\n")
    with pytest.raises(errors.BackendConfigError, match="malformed") as caught:
        read_credentials_file(path, "default")
    assert "s3cret" not in str(caught.value)


def test_region_precedence_option_then_environment_then_key_arn() -> None:
    arn = "arn:aws:kms:eu-central-1:111122223333:key/abc"
    env = isolated_env(AWS_REGION="eu-west-1", AWS_DEFAULT_REGION="eu-west-2")
    assert resolve_region("ap-south-1", arn, env) == "ap-south-1"
    assert resolve_region(None, arn, env) == "eu-west-1"
    assert resolve_region(None, arn, isolated_env(AWS_DEFAULT_REGION="eu-west-2")) == "eu-west-2"
    assert resolve_region(None, arn, isolated_env()) == "eu-central-1"
    with pytest.raises(errors.BackendConfigError, match="region"):
        resolve_region(None, "alias/edge", isolated_env())


def test_endpoint_precedence_option_then_kms_specific_then_generic_then_aws() -> None:
    env = isolated_env(
        AWS_ENDPOINT_URL_KMS="http://kms.local:1", AWS_ENDPOINT_URL="http://all.local:2"
    )
    assert resolve_endpoint("http://opt:3", "us-east-1", env) == "http://opt:3"
    assert resolve_endpoint(None, "us-east-1", env) == "http://kms.local:1"
    assert (
        resolve_endpoint(None, "us-east-1", isolated_env(AWS_ENDPOINT_URL="http://all.local:2"))
        == "http://all.local:2"
    )
    assert resolve_endpoint(None, "eu-west-1", isolated_env()) == (
        "https://kms.eu-west-1.amazonaws.com"
    )
    assert resolve_endpoint(None, "cn-north-1", isolated_env()) == (
        "https://kms.cn-north-1.amazonaws.com.cn"
    )


def test_endpoint_from_the_environment_reaches_the_fake(fake_kms: FakeKmsRig) -> None:
    backend = fake_kms.backend(
        env=isolated_env(AWS_ENDPOINT_URL_KMS=fake_kms.endpoint, AWS_REGION=fake_kms.region),
        endpoint_url=None,
        region=None,
    )
    assert backend.endpoint == fake_kms.endpoint
    assert backend.current_key().key_ref == fake_kms.key_arn
