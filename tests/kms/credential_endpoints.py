"""Loopback stand-ins for the AWS credential endpoints (test-only, never shipped).

One HTTP server answers like three AWS services, from their published API shapes:

* STS ``AssumeRoleWithWebIdentity`` (POST form, XML answer) at ``/``;
* container credentials (GET JSON, ``Authorization`` header checked) at ``/creds``;
* IMDSv2: ``PUT /latest/api/token`` then the role and its credentials, each GET refused
  (401) without the session token, as IMDS does with v1 turned off.

Every issued credential is a fresh access key registered with the fake KMS, so a signed KMS
call proves which source the backend used.
"""

from __future__ import annotations

import collections
import datetime
import json
import secrets
import threading
import urllib.parse
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

ROLE = "kms-plugin-node"


class CredentialEndpoints:
    def __init__(self, register: Callable[[str, str], None]) -> None:
        self.register = register  # access key id, secret -> known to the fake KMS
        self.lifetime = 3600.0  # seconds each issued credential lives
        self.calls: collections.Counter[str] = collections.Counter()
        self.tokens_seen: list[str] = []  # web identity tokens, in order
        self.auth_seen: list[str] = []  # container Authorization headers
        self.container_token = "container-auth-" + secrets.token_hex(4)
        self.fail = False  # answer 500 to everything
        self._imds_tokens: set[str] = set()
        handler = self._handler()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> CredentialEndpoints:
        self.thread.start()
        return self

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def issue(self) -> dict[str, str]:
        access = "ASIA" + secrets.token_hex(8).upper()
        secret = secrets.token_urlsafe(30)
        self.register(access, secret)
        expires = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=self.lifetime)
        return {"AccessKeyId": access, "SecretAccessKey": secret,
                "Token": "session-" + secrets.token_hex(8),
                "Expiration": expires.strftime("%Y-%m-%dT%H:%M:%SZ")}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, code: int, body: bytes, ctype: str = "application/json") -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_PUT(self) -> None:  # noqa: N802
                outer.calls["imds-token"] += 1
                if outer.fail or self.path != "/latest/api/token" or not self.headers.get(
                    "X-aws-ec2-metadata-token-ttl-seconds"
                ):
                    self._send(400 if not outer.fail else 500, b"{}")
                    return
                token = secrets.token_hex(16)
                outer._imds_tokens.add(token)
                self._send(200, token.encode(), "text/plain")

            def do_GET(self) -> None:  # noqa: N802
                if outer.fail:
                    self._send(500, b"{}")
                    return
                if self.path == "/creds":
                    outer.calls["container"] += 1
                    outer.auth_seen.append(self.headers.get("Authorization", ""))
                    if self.headers.get("Authorization") != outer.container_token:
                        self._send(401, b"{}")
                        return
                    self._send(200, json.dumps(outer.issue()).encode())
                    return
                prefix = "/latest/meta-data/iam/security-credentials/"
                if self.path.startswith(prefix):
                    outer.calls["imds"] += 1
                    if self.headers.get("X-aws-ec2-metadata-token") not in outer._imds_tokens:
                        self._send(401, b"")  # IMDSv1 is off
                        return
                    if self.path == prefix:
                        self._send(200, ROLE.encode(), "text/plain")
                    elif self.path == prefix + ROLE:
                        self._send(200, json.dumps({"Code": "Success", **outer.issue()}).encode())
                    else:
                        self._send(404, b"")
                    return
                self._send(404, b"")

            def do_POST(self) -> None:  # noqa: N802
                outer.calls["sts"] += 1
                length = int(self.headers.get("Content-Length", "0"))
                form = urllib.parse.parse_qs(self.rfile.read(length).decode())
                if outer.fail or form.get("Action") != ["AssumeRoleWithWebIdentity"]:
                    self._send(500, b"<Error/>", "text/xml")
                    return
                outer.tokens_seen.append(form["WebIdentityToken"][0])
                c = outer.issue()
                ns = "https://sts.amazonaws.com/doc/2011-06-15/"
                xml = (
                    f'<AssumeRoleWithWebIdentityResponse xmlns="{ns}">'
                    "<AssumeRoleWithWebIdentityResult><Credentials>"
                    f"<AccessKeyId>{c['AccessKeyId']}</AccessKeyId>"
                    f"<SecretAccessKey>{c['SecretAccessKey']}</SecretAccessKey>"
                    f"<SessionToken>{c['Token']}</SessionToken>"
                    f"<Expiration>{c['Expiration']}</Expiration>"
                    "</Credentials></AssumeRoleWithWebIdentityResult>"
                    "</AssumeRoleWithWebIdentityResponse>"
                )
                self._send(200, xml.encode(), "text/xml")

        return Handler
