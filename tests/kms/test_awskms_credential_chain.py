"""awskms credentials like the AWS SDK (issue 14 point 8): web identity, container
credentials and IMDSv2 on loopback stand-ins, refresh before expiry, https unless loopback,
Decrypt only with the configured key (or an allowed earlier one)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kms_plugin.backends import errors
from kms_plugin.backends.awskms import chain
from kms_plugin.backends.awskms.credentials import AwsCredentials
from tests.kms.awskms_rig import FakeKmsRig, isolated_env
from tests.kms.credential_endpoints import CredentialEndpoints

SEED = b"0123456789abcdef0123456789abcdef"
CONTEXT = {"edge.example.com/purpose": "test"}


@pytest.fixture
def endpoints(fake_kms: FakeKmsRig) -> Iterator[CredentialEndpoints]:
    known = fake_kms.server.credentials
    assert known is not None

    def register(access: str, secret: str) -> None:
        known[access] = secret

    ep = CredentialEndpoints(register).start()
    yield ep
    ep.close()


def _backend(fake_kms: FakeKmsRig, env: dict[str, str]):
    return fake_kms.backend(env=env, access_key_id=None, secret_access_key=None)


def _round_trip(backend) -> None:
    wrapped = backend.wrap(SEED, CONTEXT)
    assert backend.unwrap(wrapped.ciphertext, wrapped.key, CONTEXT) == SEED


def test_web_identity_reads_the_token_file_on_every_refresh(
    fake_kms: FakeKmsRig, endpoints: CredentialEndpoints, tmp_path: Path
):
    token = tmp_path / "token"
    token.write_text("projected-sa-token-1\n")
    env = isolated_env(AWS_WEB_IDENTITY_TOKEN_FILE=str(token),
                       AWS_ROLE_ARN="arn:aws:iam::111122223333:role/kms-plugin",
                       AWS_ENDPOINT_URL_STS=endpoints.url)
    backend = _backend(fake_kms, env)
    assert backend.credentials_source.startswith("web-identity:")
    _round_trip(backend)
    assert endpoints.tokens_seen == ["projected-sa-token-1"]
    _round_trip(backend)
    assert endpoints.calls["sts"] == 1  # cached until shortly before it expires
    token.write_text("projected-sa-token-2\n")  # kubelet rotated the token
    provider = backend.client.credentials
    provider._current.expires_at = 0.0 + provider._clock() + chain.REFRESH_BEFORE - 1
    _round_trip(backend)
    assert endpoints.tokens_seen == ["projected-sa-token-1", "projected-sa-token-2"]


def test_container_credentials_send_the_token_from_its_file(
    fake_kms: FakeKmsRig, endpoints: CredentialEndpoints, tmp_path: Path
):
    auth = tmp_path / "auth"
    auth.write_text(endpoints.container_token)
    env = isolated_env(AWS_CONTAINER_CREDENTIALS_FULL_URI=endpoints.url + "/creds",
                       AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE=str(auth))
    _round_trip(_backend(fake_kms, env))
    assert endpoints.auth_seen == [endpoints.container_token]


def test_container_credentials_over_http_to_another_host_are_refused(fake_kms: FakeKmsRig):
    env = isolated_env(AWS_CONTAINER_CREDENTIALS_FULL_URI="http://10.1.2.3/creds")
    with pytest.raises(errors.BackendConfigError, match="https, or http to loopback"):
        _backend(fake_kms, env)


def test_imdsv2_with_a_session_token_and_never_v1(
    fake_kms: FakeKmsRig, endpoints: CredentialEndpoints
):
    env = isolated_env(AWS_EC2_METADATA_SERVICE_ENDPOINT=endpoints.url)
    del env["AWS_EC2_METADATA_DISABLED"]
    backend = _backend(fake_kms, env)
    assert backend.credentials_source.startswith("imds:")
    _round_trip(backend)
    assert endpoints.calls["imds-token"] == 1 and endpoints.calls["imds"] == 2


def test_the_chain_order_is_the_sdks(
    fake_kms: FakeKmsRig, endpoints: CredentialEndpoints, tmp_path: Path
):
    token = tmp_path / "token"
    token.write_text("t")
    every = isolated_env(
        AWS_WEB_IDENTITY_TOKEN_FILE=str(token), AWS_ROLE_ARN="arn:aws:iam::1:role/r",
        AWS_ENDPOINT_URL_STS=endpoints.url,
        AWS_CONTAINER_CREDENTIALS_FULL_URI=endpoints.url + "/creds",
        AWS_EC2_METADATA_SERVICE_ENDPOINT=endpoints.url,
    )
    del every["AWS_EC2_METADATA_DISABLED"]
    env_keys = {"AWS_ACCESS_KEY_ID": fake_kms.access_key_id,
                "AWS_SECRET_ACCESS_KEY": fake_kms.secret_access_key}
    assert _backend(fake_kms, {**every, **env_keys}).credentials_source == "environment"
    assert _backend(fake_kms, every).credentials_source.startswith("web-identity:")
    del every["AWS_WEB_IDENTITY_TOKEN_FILE"]
    assert _backend(fake_kms, every).credentials_source.startswith("container:")
    del every["AWS_CONTAINER_CREDENTIALS_FULL_URI"]
    assert _backend(fake_kms, every).credentials_source.startswith("imds:")
    with pytest.raises(errors.BackendConfigError, match="no AWS credentials"):
        _backend(fake_kms, {**every, "AWS_EC2_METADATA_DISABLED": "true"})


def test_refresh_happens_before_expiry_and_old_credentials_serve_until_then():
    now = [1000.0]
    issued: list[AwsCredentials] = []
    failing = [False]

    def fetch() -> chain.TemporaryCredentials:
        if failing[0]:
            raise errors.BackendUnavailable("sts down")
        creds = AwsCredentials(f"ASIA{len(issued)}", "s", "t", source="test")
        issued.append(creds)
        return chain.TemporaryCredentials(creds, now[0] + 900.0)

    provider = chain.RefreshingCredentials("test", fetch, clock=lambda: now[0])
    first = provider.get()
    now[0] += 900.0 - chain.REFRESH_BEFORE - 1  # not due yet
    assert provider.get() is first and len(issued) == 1
    now[0] += 2  # within the refresh window: refreshed before it expires
    second = provider.get()
    assert second is not first and len(issued) == 2
    failing[0] = True
    now[0] += 900.0 - chain.REFRESH_BEFORE + 1  # due again, and the source is down
    assert provider.get() is second  # still valid: served, refresh retried later
    fetches = provider.fetches
    assert provider.get() is second and provider.fetches == fetches  # no hammering
    now[0] += chain.REFRESH_BEFORE  # expired now
    with pytest.raises(errors.BackendUnavailable):
        provider.get()
    assert "'s'" not in repr(second) and "'t'" not in repr(second)


def test_plain_http_is_only_for_loopback_unless_allowed(fake_kms: FakeKmsRig):
    from kms_plugin.backends.awskms.credentials import check_endpoint_scheme

    check_endpoint_scheme("http://127.0.0.1:4566", allow_http=False)
    check_endpoint_scheme("http://localhost:4566", allow_http=False)
    check_endpoint_scheme("https://kms.eu-west-1.amazonaws.com", allow_http=False)
    with pytest.raises(errors.BackendConfigError, match="plain http to a non-loopback"):
        fake_kms.backend(endpoint_url="http://kms.internal.example:4566")
    check_endpoint_scheme("http://kms.internal.example:4566", allow_http=True)
    assert fake_kms.backend(endpoint_url="http://kms.internal.example:4566",
                            allow_http="true").endpoint.startswith("http://")


def test_over_the_socket_a_record_naming_another_key_is_refused_unless_allowed(
    fake_kms: FakeKmsRig, start_plugin
):
    import grpc

    from edge_common.server import unix_channel
    from edge_proto.kms.v2 import service_pb2, service_pb2_grpc
    from tests.kms.conftest import fake_kms_rig

    rig = fake_kms_rig(fake_kms)
    other_arn = fake_kms.create_key("someone else's key")
    writer = start_plugin(rig, awskms_key_id=other_arn, backend=fake_kms.backend(
        key_id=other_arn))
    with unix_channel(writer.endpoint) as ch:
        enc = service_pb2_grpc.KeyManagementServiceStub(ch).Encrypt(
            service_pb2.EncryptRequest(plaintext=SEED, uid="w"), timeout=5)
    request = service_pb2.DecryptRequest(ciphertext=enc.ciphertext, key_id=enc.key_id,
                                         annotations=dict(enc.annotations), uid="r")
    reader = start_plugin(rig)  # configured for the rig's own key
    decrypts = fake_kms.calls.get("Decrypt", 0)
    with unix_channel(reader.endpoint) as ch, pytest.raises(grpc.RpcError) as info:
        service_pb2_grpc.KeyManagementServiceStub(ch).Decrypt(request, timeout=5)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "previous_key_arns" in (info.value.details() or "")
    assert fake_kms.calls.get("Decrypt", 0) == decrypts  # the stored ARN never reached KMS
    allowed = start_plugin(rig, backend=fake_kms.backend(previous_key_arns=other_arn))
    with unix_channel(allowed.endpoint) as ch:
        plain = service_pb2_grpc.KeyManagementServiceStub(ch).Decrypt(request, timeout=5)
    assert plain.plaintext == SEED
