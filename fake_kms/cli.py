"""``python -m fake_kms``: run the fake AWS KMS in the foreground until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import json
import signal
import ssl
import sys
import threading
from collections.abc import Sequence
from types import FrameType

from fake_kms.profiles import PROFILES
from fake_kms.server import TEST_ACCESS_KEY_ID, TEST_SECRET_ACCESS_KEY, FakeKms


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Add the fake KMS arguments to ``parser`` or a new one."""
    if parser is None:
        parser = argparse.ArgumentParser(
            prog="python -m fake_kms",
            description="Run a fake AWS KMS (JSON API subset) for tests and demos.",
        )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    parser.add_argument(
        "--region", default=None, help="region in ARNs and SigV4 scope (default: the profile's)"
    )
    parser.add_argument(
        "--profile",
        default="aws",
        choices=sorted(PROFILES),
        help="answer like AWS (default) or like another KMS emulator: local-kms, localstack, "
        "localstack-legacy, moto-legacy",
    )
    parser.add_argument(
        "--create-key",
        action="store_true",
        help="create one symmetric key at start and print its ARN",
    )
    parser.add_argument("--alias", help="also give the created key this alias (alias/NAME)")
    parser.add_argument(
        "--verify-signatures",
        action="store_true",
        help="accept only requests signed with --access-key-id/--secret-access-key "
        f"(default: the test credential {TEST_ACCESS_KEY_ID})",
    )
    parser.add_argument("--access-key-id", default=TEST_ACCESS_KEY_ID)
    parser.add_argument("--secret-access-key", default=TEST_SECRET_ACCESS_KEY)
    parser.add_argument("--tls-cert", metavar="FILE", help="serve HTTPS with this PEM certificate")
    parser.add_argument("--tls-key", metavar="FILE", help="private key of --tls-cert (PEM)")
    parser.add_argument(
        "--no-key-material-id",
        action="store_true",
        help="omit CurrentKeyMaterialId/KeyMaterialId, like older KMS and moto",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    """Run with parsed arguments (for a CLI that adds :func:`build_parser` as a sub-command)."""
    credentials = {args.access_key_id: args.secret_access_key} if args.verify_signatures else None
    tls: ssl.SSLContext | None = None
    if args.tls_cert:
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            tls.load_cert_chain(args.tls_cert, args.tls_key)
        except (OSError, ssl.SSLError) as exc:
            sys.stderr.write(f"fake-kms: cannot load --tls-cert/--tls-key: {exc}\n")
            return 1
    fake = FakeKms(
        args.host,
        args.port,
        region=args.region,
        credentials=credentials,
        report_key_material_id=False if args.no_key_material_id else None,
        tls=tls,
        profile=args.profile,
    )
    try:
        fake.start()
    except OSError as exc:
        sys.stderr.write(f"fake-kms: cannot listen on {args.host}:{args.port}: {exc.strerror}\n")
        return 1
    keys: list[str] = []
    if args.create_key or args.alias:
        arn = fake.create_key("created by python -m fake_kms")
        keys.append(arn)
        if args.alias:
            fake.create_alias(args.alias, arn)
    done = threading.Event()

    def _stop(signum: int, frame: FrameType | None) -> None:
        done.set()

    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        sys.stdout.write(
            json.dumps(
                {
                    "endpoint": fake.endpoint,
                    "region": fake.region,
                    "profile": fake.profile.name,
                    "keys": keys,
                }
            )
            + "\n"
        )
        sys.stdout.flush()
        while not done.wait(1.0):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        fake.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: ``main(["--port", "4599", "--create-key"])``; returns the exit code."""
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    return run(args)


__all__ = ["build_parser", "main", "run"]
