"""AWS Signature Version 4 (header signing), written from AWS's published description.

The four steps: a canonical request (method, URI, query, headers, signed header names,
payload hash), a string to sign (algorithm, timestamp, credential scope, hash of the canonical
request), a signing key derived by an HMAC chain over date, region and service, and the
signature: HMAC of the string to sign.  Tests pin it to AWS's published test-suite vectors.

Only what a JSON API client needs: no presigned URLs, no chunked payload signing, no S3
path rules.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import quote

from kms_plugin.backends.awskms.credentials import AwsCredentials

ALGORITHM = "AWS4-HMAC-SHA256"
_UNRESERVED = "-_.~"
_SPACES = re.compile(r"\s+")


def amz_date(now: datetime) -> str:
    """``YYYYMMDDTHHMMSSZ`` in UTC."""
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    return now.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def uri_encode(value: str) -> str:
    """Percent-encode everything but the unreserved characters (RFC 3986), UTF-8 first."""
    return quote(value, safe=_UNRESERVED)


def canonical_uri(path: str) -> str:
    """Each path segment encoded once; empty path is ``/``."""
    if not path:
        return "/"
    return "/".join(uri_encode(segment) for segment in path.split("/"))


def canonical_query(query: Iterable[tuple[str, str]]) -> str:
    pairs = sorted((uri_encode(k), uri_encode(v)) for k, v in query)
    return "&".join(f"{k}={v}" for k, v in pairs)


def _header_value(value: str) -> str:
    # Trim, and fold sequential whitespace (also line folds) to one space.
    return _SPACES.sub(" ", value.strip())


def canonical_headers(headers: Iterable[tuple[str, str]]) -> tuple[str, str]:
    """Return (canonical header block, signed header names) for the given headers.

    Repeated names are joined with commas in the order they were given.
    """
    merged: dict[str, list[str]] = {}
    for name, value in headers:
        merged.setdefault(name.strip().lower(), []).append(_header_value(value))
    names = sorted(merged)
    block = "".join(f"{name}:{','.join(merged[name])}\n" for name in names)
    return block, ";".join(names)


def canonical_request(
    method: str,
    path: str,
    query: Iterable[tuple[str, str]],
    headers: Iterable[tuple[str, str]],
    payload_hash: str,
) -> tuple[str, str]:
    """Return (canonical request, signed header names)."""
    block, signed = canonical_headers(headers)
    text = "\n".join(
        [method.upper(), canonical_uri(path), canonical_query(query), block, signed, payload_hash]
    )
    return text, signed


def credential_scope(date_stamp: str, region: str, service: str) -> str:
    return f"{date_stamp}/{region}/{service}/aws4_request"


def string_to_sign(timestamp: str, scope: str, canonical: str) -> str:
    return "\n".join([ALGORITHM, timestamp, scope, sha256_hex(canonical.encode("utf-8"))])


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode("utf-8"), hashlib.sha256).digest()


def signing_key(secret_access_key: str, date_stamp: str, region: str, service: str) -> bytes:
    k_date = _hmac(("AWS4" + secret_access_key).encode("utf-8"), date_stamp)
    k_region = _hmac(k_date, region)
    k_service = _hmac(k_region, service)
    return _hmac(k_service, "aws4_request")


def signature(key: bytes, to_sign: str) -> str:
    return hmac.new(key, to_sign.encode("utf-8"), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class SignedRequest:
    """The headers to send, plus every intermediate value (for tests and debugging)."""

    headers: dict[str, str]
    canonical_request: str
    string_to_sign: str
    signature: str
    authorization: str


def sign(
    *,
    method: str,
    path: str,
    headers: Mapping[str, str] | Sequence[tuple[str, str]],
    body: bytes,
    credentials: AwsCredentials,
    region: str,
    service: str,
    now: datetime,
    query: Sequence[tuple[str, str]] = (),
) -> SignedRequest:
    """Sign a request.  ``headers`` must include ``host``; every header given is signed.

    ``x-amz-date`` (from ``now``) and ``x-amz-security-token`` (if the credentials carry a
    session token) are added when absent.
    """
    items = list(headers.items()) if isinstance(headers, Mapping) else list(headers)
    lower = {name.lower() for name, _ in items}
    if "host" not in lower:
        raise ValueError("the host header must be signed")
    timestamp = amz_date(now)
    if "x-amz-date" not in lower:
        items.append(("X-Amz-Date", timestamp))
    else:
        timestamp = next(v for n, v in items if n.lower() == "x-amz-date").strip()
    if credentials.session_token and "x-amz-security-token" not in lower:
        items.append(("X-Amz-Security-Token", credentials.session_token))
    date_stamp = timestamp[:8]
    creq, signed = canonical_request(method, path, query, items, sha256_hex(body))
    scope = credential_scope(date_stamp, region, service)
    sts = string_to_sign(timestamp, scope, creq)
    sig = signature(signing_key(credentials.secret_access_key, date_stamp, region, service), sts)
    authorization = (
        f"{ALGORITHM} Credential={credentials.access_key_id}/{scope}, "
        f"SignedHeaders={signed}, Signature={sig}"
    )
    out: dict[str, str] = {}
    for name, value in items:
        out[name] = f"{out[name]},{value}" if name in out else value
    out["Authorization"] = authorization
    return SignedRequest(out, creq, sts, sig, authorization)


@dataclass(frozen=True)
class ParsedAuthorization:
    access_key_id: str
    date_stamp: str
    region: str
    service: str
    signed_headers: tuple[str, ...]
    signature: str


_AUTH_RE = re.compile(
    r"^AWS4-HMAC-SHA256\s+"
    r"Credential=(?P<akid>[^/\s,]+)/(?P<date>\d{8})/(?P<region>[a-z0-9-]+)/"
    r"(?P<service>[a-z0-9-]+)/aws4_request\s*,\s*"
    r"SignedHeaders=(?P<signed>[a-z0-9-]+(?:;[a-z0-9-]+)*)\s*,\s*"
    r"Signature=(?P<sig>[0-9a-f]{64})$"
)


def parse_authorization(value: str) -> ParsedAuthorization | None:
    """Parse a SigV4 ``Authorization`` header; ``None`` if it is not well formed."""
    match = _AUTH_RE.match(value.strip())
    if match is None:
        return None
    return ParsedAuthorization(
        access_key_id=match["akid"],
        date_stamp=match["date"],
        region=match["region"],
        service=match["service"],
        signed_headers=tuple(match["signed"].split(";")),
        signature=match["sig"],
    )


def verify(
    *,
    method: str,
    path: str,
    query: Sequence[tuple[str, str]],
    headers: Sequence[tuple[str, str]],
    body: bytes,
    secret_access_key: str,
    parsed: ParsedAuthorization,
) -> bool:
    """Recompute the signature of a received request (server side) and compare."""
    wanted = set(parsed.signed_headers)
    signed_items = [(n, v) for n, v in headers if n.lower() in wanted]
    if {n.lower() for n, _ in signed_items} != wanted:
        return False
    timestamp = next((v for n, v in headers if n.lower() == "x-amz-date"), "").strip()
    if timestamp[:8] != parsed.date_stamp:
        return False
    creq, _ = canonical_request(method, path, query, signed_items, sha256_hex(body))
    scope = credential_scope(parsed.date_stamp, parsed.region, parsed.service)
    sts = string_to_sign(timestamp, scope, creq)
    key = signing_key(secret_access_key, parsed.date_stamp, parsed.region, parsed.service)
    return hmac.compare_digest(signature(key, sts), parsed.signature)


__all__ = [
    "ALGORITHM",
    "ParsedAuthorization",
    "SignedRequest",
    "amz_date",
    "canonical_request",
    "credential_scope",
    "parse_authorization",
    "sign",
    "signature",
    "signing_key",
    "string_to_sign",
    "verify",
]
