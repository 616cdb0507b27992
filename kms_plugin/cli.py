"""``kms-plugin``: serve | keygen | rotate | selftest | inspect.

Every sub-command takes the plugin options (``--config FILE``, flags,
``KMS_PLUGIN_*`` environment), so ``selftest`` and ``inspect --decrypt`` use exactly the
backend the running plugin uses.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edge_common.config import ConfigError, add_arguments, resolve
from edge_common.log import setup_logging
from edge_common.server import EndpointError
from edge_common.version import project_version
from kms_plugin.backends.errors import BackendConfigError, BackendError
from kms_plugin.config import ENV_PREFIX, LogFormat, PluginConfig

PROG = "kms-plugin"

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def _config(ns: argparse.Namespace) -> PluginConfig:
    return resolve(PluginConfig, ns, env_prefix=ENV_PREFIX)


def _setup_logging(config: PluginConfig) -> None:
    setup_logging(config.log_level, json_format=config.log_format is LogFormat.JSON)


def _print(obj: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(obj, indent=2, sort_keys=False))
        return
    for key, value in obj.items():
        if isinstance(value, dict):
            print(f"{key}:")
            for k, v in value.items():
                print(f"  {k}: {v}")
        else:
            print(f"{key}: {value}")


class _VersionAction(argparse.Action):
    """--version, reading the version only when asked (serve never needs it)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 default: Any = argparse.SUPPRESS, help: str = "show the version and exit"
                 ) -> None:
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        print(f"{PROG} {project_version()}")
        parser.exit()


# --- serve -------------------------------------------------------------------------------


def cmd_serve(ns: argparse.Namespace) -> int:
    from kms_plugin.hardening import harden_process
    from kms_plugin.plugin import Plugin

    harden_process()  # before any key is in memory
    config = _config(ns)
    _setup_logging(config)
    notifier = None
    if config.kube_events:
        from kms_plugin.events import KubeEventNotifier

        notifier = KubeEventNotifier.from_environment()  # None (and a warning) when it can't
    plugin = Plugin.create(config, notifier=notifier)
    plugin.run_until_signal()
    return EXIT_OK


# --- keygen / rotate -----------------------------------------------------------------------


def cmd_keygen(ns: argparse.Namespace) -> int:
    config = _config(ns)
    if config.backend == "local":
        from kms_plugin.backends import local

        ring = local.keygen(Path(config.local_keyring), ns.key_name, force=ns.force)
        print(f"created keyring {config.local_keyring} ({ring.name}), "
              f"primary {ring.primary.version}")
        return EXIT_OK
    if config.backend == "pkcs11":
        from kms_plugin.backends.pkcs11 import Pkcs11Backend

        backend = Pkcs11Backend.from_options(config.backend_option_map())
        try:
            key = backend.create_key_version(first=True)
        finally:
            backend.close()
        print(f"created HSM key {key.key_ref} version {key.version}")
        return EXIT_OK
    print(f"{PROG}: keygen is not supported for backend {config.backend!r}; create the key with "
          "the backend's own tools", file=sys.stderr)
    return EXIT_USAGE


def cmd_rotate(ns: argparse.Namespace) -> int:
    config = _config(ns)
    if config.backend == "local":
        from kms_plugin.backends import local

        ring = local.rotate(Path(config.local_keyring), reinstate=ns.reinstate, stage=ns.stage,
                            promote=ns.promote, unstage=ns.unstage)
        if ns.unstage:
            print(f"keyring {config.local_keyring}: dropped the staged key {ns.unstage}; "
                  f"primary {ring.primary.version}")
        elif ns.stage:
            staged = max(k.generation for k in ring.keys if k.state == "staged")
            print(f"keyring {config.local_keyring}: staged g{staged}; copy the file to every "
                  f"control-plane node, then run `kms-plugin rotate --promote g{staged}`")
        else:
            print(f"keyring {config.local_keyring}: new primary {ring.primary.version} "
                  f"({len(ring.keys)} keys); running plugins switch within --refresh-interval"
                  "; copy the file to every control-plane node")
        return EXIT_OK
    if config.backend == "pkcs11":
        from kms_plugin.backends.pkcs11 import Pkcs11Backend

        if ns.reinstate or ns.stage or ns.promote or ns.unstage:
            print(f"{PROG}: --reinstate, --stage, --promote and --unstage are only supported by "
                  "the local backend", file=sys.stderr)
            return EXIT_USAGE
        backend = Pkcs11Backend.from_options(config.backend_option_map())
        try:
            key = backend.create_key_version(first=False)
        finally:
            backend.close()
        print(f"HSM key {key.key_ref}: new version {key.version}; running plugins switch within "
              "--refresh-interval")
        return EXIT_OK
    print(f"{PROG}: rotate is not supported for backend {config.backend!r}; rotate the key in "
          "the backend (e.g. aws kms rotate-key-on-demand); the plugin notices within "
          "--refresh-interval", file=sys.stderr)
    return EXIT_USAGE


# --- selftest ---------------------------------------------------------------------------


def cmd_selftest(ns: argparse.Namespace) -> int:
    config = _config(ns)
    if ns.via_socket:
        from kms_plugin.selftest import selftest_socket

        result = selftest_socket(config.endpoint, timeout=ns.timeout)
    else:
        from kms_plugin.selftest import selftest_backend

        result = selftest_backend(config)
    _print(result.as_dict(), ns.json)
    return EXIT_OK if result.ok else EXIT_FAILED


# --- inspect ----------------------------------------------------------------------------


def _read_input(ns: argparse.Namespace) -> bytes:
    if ns.file in (None, "-"):
        raw = sys.stdin.buffer.read()
    else:
        raw = Path(ns.file).read_bytes()
    if ns.input_format == "base64":
        return base64.b64decode(raw.strip(), validate=True)
    if ns.input_format == "hex":
        return binascii.unhexlify(raw.strip())
    return raw


def cmd_inspect(ns: argparse.Namespace) -> int:
    from kms_plugin.inspect import inspect_value

    config = _config(ns)
    if ns.decrypt and not ns.etcd_key:
        print(f"{PROG} inspect: --decrypt needs --etcd-key /registry/secrets/NS/NAME",
              file=sys.stderr)
        return EXIT_USAGE
    try:
        raw = _read_input(ns)
    except (OSError, ValueError, binascii.Error) as exc:
        print(f"{PROG} inspect: cannot read the value: {exc}", file=sys.stderr)
        return EXIT_USAGE
    report, ok = inspect_value(
        raw,
        config,
        decrypt=ns.decrypt,
        etcd_key=ns.etcd_key,
        show_secret=ns.show_secret,
        via_socket=ns.via_socket,
    )
    _print(report, ns.json)
    return EXIT_OK if ok else EXIT_FAILED


# --- the parser -------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="KMS v2 (and v1beta1) encryption provider for kube-apiserver with a local "
        "key hierarchy over pluggable root-key backends (local keyring, PKCS#11 HSM, AWS KMS).",
    )
    parser.add_argument("--version", action=_VersionAction)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("serve", help="serve KMS v2 and v1beta1 on the unix socket",
                       description="Serve KMS v2 and v1beta1 on one unix socket until SIGTERM.")
    add_arguments(p, PluginConfig)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("keygen", help="create the root key (local keyring file or HSM key)",
                       description="Create the root key: a new keyring file for the local "
                       "backend, the first key object in the token for pkcs11.")
    p.add_argument("--key-name", default="local",
                   help="name (key_ref) of a new local keyring (default: local)")
    p.add_argument("--force", action="store_true", help="overwrite an existing keyring file")
    add_arguments(p, PluginConfig)
    p.set_defaults(func=cmd_keygen)

    p = sub.add_parser("rotate", help="add a new primary root key version",
                       description="Add a new primary root key version (local keyring or HSM). "
                       "Running plugins report the new key_id within --refresh-interval; data "
                       "written before stays readable.")
    p.add_argument("--reinstate", metavar="VERSION",
                   help="local backend: put the material of an old key (e.g. g2) back into "
                   "service under a new version (key ids never repeat)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--stage", action="store_true",
                       help="local backend: add the new key as staged (it decrypts, it does not "
                       "encrypt) so it can reach every control-plane node first")
    group.add_argument("--promote", metavar="VERSION",
                       help="local backend: make the staged key VERSION the primary")
    group.add_argument("--unstage", metavar="VERSION",
                       help="local backend: drop the staged key VERSION (it never encrypted "
                       "anything); the way out when a stage is abandoned")
    add_arguments(p, PluginConfig)
    p.set_defaults(func=cmd_rotate)

    p = sub.add_parser("selftest", help="round trip through the configured backend; exit code "
                       "tells", description="Encrypt a random seed with the configured backend "
                       "and decrypt it in a second, cold key manager (or, with --via-socket, "
                       "through the running plugin). Exit 0: works; 1: failed; 2: bad usage.")
    p.add_argument("--via-socket", action="store_true",
                   help="test the running plugin at --endpoint instead of the backend")
    p.add_argument("--timeout", type=float, default=5.0, help="per-call timeout (seconds)")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_arguments(p, PluginConfig)
    p.set_defaults(func=cmd_selftest)

    p = sub.add_parser("inspect", help="explain (and prove decryptable) a raw etcd value",
                       description="Read a raw etcd value of an encrypted resource "
                       "(k8s:enc:kms:v2:<provider>: + EncryptedObject), print provider, key_id, "
                       "DEK source type and annotations; with --decrypt prove that the "
                       "configured backend can decrypt it. The secret is printed only with "
                       "--show-secret.")
    p.add_argument("file", nargs="?", default="-",
                   help="file with the value (default: stdin), e.g. from "
                   "`etcdctl get --print-value-only /registry/secrets/NS/NAME`")
    p.add_argument("--input-format", choices=("raw", "base64", "hex"), default="raw")
    p.add_argument("--decrypt", action="store_true", help="decrypt through the backend")
    p.add_argument("--etcd-key", metavar="KEY",
                   help="the value's etcd key, e.g. /registry/secrets/default/db (the AAD)")
    p.add_argument("--show-secret", action="store_true",
                   help="also print the decrypted object (base64)")
    p.add_argument("--via-socket", action="store_true",
                   help="decrypt through the running plugin at --endpoint")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_arguments(p, PluginConfig)
    p.set_defaults(func=cmd_inspect)

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    ns = parser.parse_args(args)
    try:
        return int(ns.func(ns))
    except ConfigError as exc:
        print(f"{PROG}: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BackendConfigError as exc:
        print(f"{PROG}: backend configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BackendError as exc:
        print(f"{PROG}: backend error ({type(exc).__name__}): {exc}", file=sys.stderr)
        return EXIT_FAILED
    except EndpointError as exc:
        print(f"{PROG}: cannot serve: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as exc:  # keyring problems and the like: one line, no traceback
        from kms_plugin.backends.local import KeyringError

        if isinstance(exc, KeyringError | OSError):
            print(f"{PROG}: {exc}", file=sys.stderr)
            return EXIT_FAILED
        raise


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
