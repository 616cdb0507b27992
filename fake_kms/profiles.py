"""Emulation profiles: make the fake KMS answer like another AWS KMS emulator.

The ``awskms`` backend has to work against AWS and against the emulators people run in its
place.  Each profile reproduces the *observable* differences of one of them (what goes over
the wire), as read from their sources and documentation; nothing else about them:

``aws``
    AWS KMS itself (the default): every operation the fake has; DescribeKey reports
    ``CurrentKeyMaterialId``; an unknown ``X-Amz-Target`` is HTTP 400
    ``UnknownOperationException``; errors ``{"__type", "message"}`` plus ``x-amzn-ErrorType``;
    the SigV4 scope must name the server's region.

``local-kms``
    nsmithuk/local-kms 3.x (Go; default port 8080, region eu-west-2, account 111122223333).
    No ListKeyRotations and no RotateKeyOnDemand: an unimplemented target is HTTP 501 with
    a plain-text body (under a JSON content type).  DescribeKey has no
    ``CurrentKeyMaterialId`` (and, depending on the version, no KeySpec; ``Description`` is
    ``null`` when unset; ``CreationDate`` whole seconds).  GetKeyRotationStatus answers only
    ``KeyRotationEnabled``.  Encrypt/Decrypt answer just ``KeyId`` (the ARN) and the blob.
    Errors carry no ``x-amzn-ErrorType`` header; AccessDeniedException and
    UnsupportedOperationException use ``Message`` (capital M); InvalidCiphertextException
    has no message.  Decrypt with a KeyId that is not the blob's key is AccessDeniedException
    (AWS: IncorrectKeyException).  Requests are not authenticated (any or no SigV4 header,
    any region); ARNs always use the configured region.  Keys rotate by themselves (yearly,
    once rotation is enabled, or by seeding several backing keys): :meth:`FakeKms.rotate_key`
    stands for that.  Operations with an empty result answer 200 with an empty body.

``localstack``
    LocalStack 4.x (port 4566, account 000000000000 for access key ``test``, region from the
    SigV4 scope).  RotateKeyOnDemand works (at most 10 per key, then LimitExceededException)
    and every old key material still decrypts, but ListKeyRotations is not implemented:
    HTTP 501 ``InternalFailure`` "... not yet implemented ...".  DescribeKey reports a
    ``CurrentKeyMaterialId`` that an on-demand rotation does not change.
    GetKeyRotationStatus answers the bare key id.  No ``x-amzn-ErrorType`` header.  A key
    ARN of another region than the request's scope is NotFoundException ("Invalid arn").

``localstack-legacy``
    LocalStack 4.3 to mid-2025: as ``localstack`` without ``CurrentKeyMaterialId``.

``moto-legacy``
    moto's server before ListKeyRotations/RotateKeyOnDemand existed: an unimplemented action
    is a bare HTTP 500 HTML page (Werkzeug's), no ``CurrentKeyMaterialId``, optional fields
    as ``null``, GetKeyRotationStatus with ``KeyRotationEnabled`` only, and a disabled key
    still encrypts and decrypts (only DescribeKey shows the state).
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass


class UnsupportedStyle(enum.Enum):
    """How an operation the emulator does not implement is answered."""

    AWS = "aws"  # 400 {"__type": "UnknownOperationException"}
    PLAIN_501 = "plain-501"  # local-kms: 501, plain text
    INTERNAL_FAILURE_501 = "internal-failure-501"  # LocalStack: 501 InternalFailure JSON
    HTML_500 = "html-500"  # moto's server: 500 text/html


class ScopeRegion(enum.Enum):
    """What happens when the SigV4 scope names another region than the server's."""

    REJECT = "reject"  # AWS: InvalidSignatureException
    NOT_FOUND = "not-found"  # LocalStack/moto: another region's (empty) store
    IGNORE = "ignore"  # local-kms: the scope is not looked at


class RotationStatusStyle(enum.Enum):
    AWS = "aws"  # KeyId (ARN), KeyRotationEnabled, RotationPeriodInDays, OnDemandRotationStartDate
    ENABLED_ONLY = "enabled-only"  # local-kms, moto: KeyRotationEnabled
    LOCALSTACK = "localstack"  # KeyId (bare), KeyRotationEnabled, NextRotationDate, period


@dataclass(frozen=True)
class EmulationProfile:
    name: str
    region: str = "us-east-1"
    account_id: str = "111122223333"
    unsupported_ops: frozenset[str] = frozenset()
    unsupported_style: UnsupportedStyle = UnsupportedStyle.AWS
    report_key_material_id: bool = True
    material_id_follows_rotation: bool = True
    minimal_fields: bool = False  # local-kms: fewer metadata/response fields
    null_fields: bool = False  # moto: optional fields present as null
    rotation_status: RotationStatusStyle = RotationStatusStyle.AWS
    error_type_header: bool = True
    error_type_prefix: str = ""  # e.g. "com.amazonaws.kms#" (Smithy-style servers)
    capital_message_types: frozenset[str] = frozenset()
    omit_empty_message: bool = False
    bare_invalid_ciphertext: bool = False  # InvalidCiphertextException without a text
    decrypt_key_mismatch: str = "IncorrectKeyException"
    scope_region: ScopeRegion = ScopeRegion.REJECT
    authenticate: bool = True  # require a well-formed SigV4 Authorization header
    disabled_key_usable: bool = False
    on_demand_rotation_limit: int | None = None
    empty_body_for_empty_result: bool = False

    def replace(self, **changes: object) -> EmulationProfile:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


AWS = EmulationProfile(name="aws")

LOCAL_KMS = EmulationProfile(
    name="local-kms",
    region="eu-west-2",
    account_id="111122223333",
    unsupported_ops=frozenset({"ListKeyRotations", "RotateKeyOnDemand"}),
    unsupported_style=UnsupportedStyle.PLAIN_501,
    report_key_material_id=False,
    minimal_fields=True,
    rotation_status=RotationStatusStyle.ENABLED_ONLY,
    error_type_header=False,
    capital_message_types=frozenset({"AccessDeniedException", "UnsupportedOperationException"}),
    omit_empty_message=True,
    bare_invalid_ciphertext=True,
    decrypt_key_mismatch="AccessDeniedException",
    scope_region=ScopeRegion.IGNORE,
    authenticate=False,
    empty_body_for_empty_result=True,
)

LOCALSTACK = EmulationProfile(
    name="localstack",
    region="us-east-1",
    account_id="000000000000",
    unsupported_ops=frozenset({"ListKeyRotations"}),
    unsupported_style=UnsupportedStyle.INTERNAL_FAILURE_501,
    material_id_follows_rotation=False,
    rotation_status=RotationStatusStyle.LOCALSTACK,
    error_type_header=False,
    bare_invalid_ciphertext=True,
    scope_region=ScopeRegion.NOT_FOUND,
    on_demand_rotation_limit=10,
)

LOCALSTACK_LEGACY = LOCALSTACK.replace(name="localstack-legacy", report_key_material_id=False)

MOTO_LEGACY = EmulationProfile(
    name="moto-legacy",
    region="us-east-1",
    account_id="123456789012",
    unsupported_ops=frozenset({"ListKeyRotations", "RotateKeyOnDemand"}),
    unsupported_style=UnsupportedStyle.HTML_500,
    report_key_material_id=False,
    null_fields=True,
    rotation_status=RotationStatusStyle.ENABLED_ONLY,
    scope_region=ScopeRegion.NOT_FOUND,
    disabled_key_usable=True,
)

PROFILES: dict[str, EmulationProfile] = {
    p.name: p for p in (AWS, LOCAL_KMS, LOCALSTACK, LOCALSTACK_LEGACY, MOTO_LEGACY)
}


def get_profile(profile: EmulationProfile | str) -> EmulationProfile:
    """A profile by name (``aws``, ``local-kms``, ``localstack``, ...) or as given."""
    if isinstance(profile, EmulationProfile):
        return profile
    try:
        return PROFILES[profile]
    except KeyError:
        raise ValueError(
            f"unknown fake KMS profile {profile!r}; known: {', '.join(PROFILES)}"
        ) from None


__all__ = [
    "AWS",
    "LOCALSTACK",
    "LOCALSTACK_LEGACY",
    "LOCAL_KMS",
    "MOTO_LEGACY",
    "PROFILES",
    "EmulationProfile",
    "RotationStatusStyle",
    "ScopeRegion",
    "UnsupportedStyle",
    "get_profile",
]
