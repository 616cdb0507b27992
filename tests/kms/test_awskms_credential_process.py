"""awskms credential_process from the shared config file, like the AWS SDKs: a real helper
script on this host, run as an argument list with a timeout; its JSON (Version 1) signs real
calls to the fake KMS; Expiration drives the refresh; bad helpers fail clearly, without their
output in any message."""

from __future__ import annotations

import datetime
import json
import shlex
import sys
import textwrap
from pathlib import Path

import pytest

from kms_plugin.backends import errors
from kms_plugin.backends.awskms import chain
from tests.kms.awskms_rig import FakeKmsRig, isolated_env

SEED = b"0123456789abcdef0123456789abcdef"
CONTEXT = {"edge.example.com/purpose": "test"}


def _helper(tmp_path: Path, body: str) -> Path:
    """An executable helper script (this interpreter); it logs each run's argv to runs.jsonl."""
    script = tmp_path / "creds helper.py"  # a space in the path: quoting must survive
    script.write_text(f"#!{sys.executable}\n" + textwrap.dedent(f'''
        import json, sys, time
        from pathlib import Path
        with open({str(tmp_path / "runs.jsonl")!r}, "a") as log:
            log.write(json.dumps(sys.argv[1:]) + "\\n")
    ''') + textwrap.dedent(body))
    script.chmod(0o700)
    return script


def _runs(tmp_path: Path) -> list[list[str]]:
    path = tmp_path / "runs.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _config(tmp_path: Path, command: str, section: str = "default") -> dict[str, str]:
    config = tmp_path / "config"
    config.write_text(f"[{section}]\nregion = eu-west-1\ncredential_process = {command}\n")
    return isolated_env(AWS_CONFIG_FILE=str(config))


def _issue(fake_kms: FakeKmsRig, tmp_path: Path, expires_in: float | None) -> Path:
    """Register fresh keys with the fake KMS and have the helper print them."""
    access, secret = "ASIAPROCESS1", "process-secret-value-1"
    known = fake_kms.server.credentials
    assert known is not None
    known[access] = secret
    doc: dict[str, object] = {"Version": 1, "AccessKeyId": access, "SecretAccessKey": secret,
                              "SessionToken": "process-session-token"}
    if expires_in is not None:
        when = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=expires_in)
        doc["Expiration"] = when.strftime("%Y-%m-%dT%H:%M:%SZ")
    out = tmp_path / "answer.json"
    out.write_text(json.dumps(doc))
    return out


def _round_trip(backend) -> None:
    wrapped = backend.wrap(SEED, CONTEXT)
    assert backend.unwrap(wrapped.ciphertext, wrapped.key, CONTEXT) == SEED


def test_credential_process_signs_real_calls_and_gets_its_arguments_as_a_list(
    fake_kms: FakeKmsRig, tmp_path: Path
):
    answer = _issue(fake_kms, tmp_path, expires_in=None)
    script = _helper(tmp_path, f"print(open({str(answer)!r}).read())\n")
    tricky = "a b;touch " + str(tmp_path / "pwned")  # one argument; a shell would run touch
    env = _config(tmp_path, f"{shlex.quote(str(script))} --profile x {shlex.quote(tricky)}")
    backend = fake_kms.backend(env=env, access_key_id=None, secret_access_key=None)
    assert backend.credentials_source == f"process:{script}"
    _round_trip(backend)
    _round_trip(backend)
    assert _runs(tmp_path) == [["--profile", "x", tricky]]  # no Expiration: run once
    assert not (tmp_path / "pwned").exists()


def test_a_named_profile_uses_its_profile_section(fake_kms: FakeKmsRig, tmp_path: Path):
    answer = _issue(fake_kms, tmp_path, expires_in=None)
    script = _helper(tmp_path, f"print(open({str(answer)!r}).read())\n")
    env = _config(tmp_path, shlex.quote(str(script)), section="profile kms")
    with pytest.raises(errors.BackendConfigError, match="no AWS credentials"):
        fake_kms.backend(env=env, access_key_id=None, secret_access_key=None)
    backend = fake_kms.backend(env={**env, "AWS_PROFILE": "kms"}, access_key_id=None,
                               secret_access_key=None)
    _round_trip(backend)


def test_expiration_brings_a_new_run_before_the_credentials_expire(
    fake_kms: FakeKmsRig, tmp_path: Path
):
    answer = _issue(fake_kms, tmp_path, expires_in=chain.REFRESH_BEFORE + 3600)
    script = _helper(tmp_path, f"print(open({str(answer)!r}).read())\n")
    backend = fake_kms.backend(env=_config(tmp_path, shlex.quote(str(script))),
                               access_key_id=None, secret_access_key=None)
    _round_trip(backend)
    _round_trip(backend)
    assert len(_runs(tmp_path)) == 1  # valid for an hour: not run again
    provider = backend.client.credentials
    provider._current.expires_at = provider._clock() + chain.REFRESH_BEFORE - 1  # due now
    _round_trip(backend)
    assert len(_runs(tmp_path)) == 2


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("print('{\"Version\": 2, \"AccessKeyId\": \"A\", \"SecretAccessKey\": \"leak-me\"}')",
         "Version is not 1"),
        ("print('not json leak-me')", "malformed output"),
        ("print('{\"Version\": 1, \"AccessKeyId\": \"A\"}')", "malformed output"),
        ("print('leak-me', file=sys.stderr); sys.exit(3)", "exited with status 3"),
        ("time.sleep(5)", "did not finish within"),
    ],
    ids=["version", "not-json", "no-secret", "exit-status", "timeout"],
)
def test_a_bad_helper_is_unavailable_with_a_clear_message_and_no_output_in_it(
    fake_kms: FakeKmsRig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str,
    message: str,
):
    monkeypatch.setattr(chain, "PROCESS_TIMEOUT", 0.5)
    script = _helper(tmp_path, body + "\n")
    backend = fake_kms.backend(env=_config(tmp_path, shlex.quote(str(script))),
                               access_key_id=None, secret_access_key=None, max_attempts=1)
    with pytest.raises(errors.BackendError) as info:
        backend.wrap(SEED, CONTEXT)
    assert message in str(info.value)
    assert "leak-me" not in str(info.value)


def test_a_missing_helper_and_bad_quoting_are_clear_errors(fake_kms: FakeKmsRig, tmp_path: Path):
    backend = fake_kms.backend(env=_config(tmp_path, str(tmp_path / "no-such-helper")),
                               access_key_id=None, secret_access_key=None, max_attempts=1)
    with pytest.raises(errors.BackendError, match="could not run"):
        backend.wrap(SEED, CONTEXT)
    with pytest.raises(errors.BackendConfigError, match="unbalanced quotes"):
        fake_kms.backend(env=_config(tmp_path, "'/bin/helper --x"), access_key_id=None,
                         secret_access_key=None)


def test_the_credentials_file_comes_before_credential_process(
    fake_kms: FakeKmsRig, tmp_path: Path
):
    script = _helper(tmp_path, "print('{}')\n")
    env = _config(tmp_path, shlex.quote(str(script)))
    creds = tmp_path / "credentials"
    creds.write_text(f"[default]\naws_access_key_id = {fake_kms.access_key_id}\n"
                     f"aws_secret_access_key = {fake_kms.secret_access_key}\n")
    env["AWS_SHARED_CREDENTIALS_FILE"] = str(creds)
    backend = fake_kms.backend(env=env, access_key_id=None, secret_access_key=None)
    assert backend.credentials_source.startswith("file:")
    _round_trip(backend)
    assert _runs(tmp_path) == []
