"""Part 3: Secrets encrypted at rest through kms-plugin, as kube-apiserver stores them.

First the ``local`` backend (a keyring file made by ``kms-plugin keygen``), then ``awskms``
against the fake AWS KMS of the checkout (``python -m fake_kms``): writes and reads,
a key rotation picked up by the running plugin, ``kms-plugin inspect`` on a stored value, and
the KMS going away while Secrets stay readable.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_demo.apiserver import KubeApiserver
from edge_demo.context import Context
from edge_demo.procs import DemoError, ServiceProcess, run_logged, tool
from edge_demo.steps import StepContext

SECRET_NAMES = ("db-password", "api-token", "registry-credentials", "smtp-password",
                "tls-private-key")
PROVIDER = "edge-demo"  # the provider name of the EncryptionConfiguration
CLI_TIMEOUT = 60.0
READY_TIMEOUT = 60.0
# Demo credentials for the fake KMS (it does not check signatures unless told to).
FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "AKIAEDGEDEMO00000001",
    "AWS_SECRET_ACCESS_KEY": "edge-demo-not-a-real-secret",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/edge-demo-credentials",
    "AWS_CONFIG_FILE": "/nonexistent/edge-demo-config",
    "AWS_EC2_METADATA_DISABLED": "true",
}
# The fake AWS KMS is a module of the checkout, not a command of the product.
CHECKOUT = Path(__file__).resolve().parent.parent
FAKE_KMS = [sys.executable, "-m", "fake_kms"]
CHECKOUT_ON_PATH = {
    "PYTHONPATH": os.pathsep.join(p for p in (str(CHECKOUT), os.environ.get("PYTHONPATH")) if p)
}


def short_key_id(key_id: str, keep: int = 18) -> str:
    return key_id if len(key_id) <= keep + 1 else key_id[:keep] + "…"


def secret_object(name: str, namespace: str = "default") -> tuple[str, bytes, bytes]:
    """(etcd key, the Secret as the apiserver serialises it, the secret value inside)."""
    value = base64.b64encode(os.urandom(18))
    doc = {
        "kind": "Secret", "apiVersion": "v1",
        "metadata": {"name": name, "namespace": namespace, "uid": base64.b16encode(
            os.urandom(8)).decode().lower()},
        "type": "Opaque",
        "data": {"value": base64.b64encode(value).decode()},
    }
    return f"/registry/secrets/{namespace}/{name}", json.dumps(doc).encode(), value


@dataclass
class Etcd:
    """The values the apiserver stored (and their plaintext, to check the reads)."""

    values: dict[str, bytes] = field(default_factory=dict)
    plaintext: dict[str, bytes] = field(default_factory=dict)
    secrets: dict[str, bytes] = field(default_factory=dict)

    def put(self, api: KubeApiserver, name: str) -> bytes:
        key, obj, secret = secret_object(name)
        raw = api.write(key, obj)
        if secret in raw or obj in raw:
            raise DemoError(f"the plaintext of {key} is visible in the stored value")
        self.values[key], self.plaintext[key], self.secrets[key] = raw, obj, secret
        return raw

    def read_all(self, api: KubeApiserver) -> int:
        for key, raw in self.values.items():
            if api.read(key, raw) != self.plaintext[key]:
                raise DemoError(f"{key} read back different bytes")
        return len(self.values)


@dataclass
class Plugin:
    process: ServiceProcess
    endpoint: str
    log: Path

    def metrics_port(self) -> int | None:
        for line in self.process.log_text().splitlines():
            if '"kms plugin started"' in line:
                try:
                    port = json.loads(line).get("metrics_port")
                except ValueError:
                    continue
                return int(port) if isinstance(port, int) else None
        return None

    def http(self, path: str) -> tuple[int, str]:
        port = self.metrics_port()
        if port is None:
            raise DemoError("the plugin's metrics port is not in its log", [self.log])
        return http_get(f"http://127.0.0.1:{port}{path}")


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback
            return int(resp.status), resp.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode(errors="replace")


def http_post(url: str, body: dict[str, Any] | None = None, timeout: float = 5.0) -> Any:
    req = urllib.request.Request(url, data=json.dumps(body or {}).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - loopback
        text = resp.read().decode(errors="replace")
    return json.loads(text) if text.strip() else {}


def wait_until(check: Callable[[], bool], timeout: float, what: str,
               logs: list[Path] | None = None) -> float:
    """Poll ``check`` every 0.1 s; the seconds it took."""
    started = time.monotonic()
    while True:
        try:
            if check():
                return time.monotonic() - started
        except Exception:  # noqa: S110 - not yet
            pass
        if time.monotonic() - started > timeout:
            raise DemoError(f"{what} did not happen within {timeout:.0f}s", logs or [])
        time.sleep(0.1)


def readyz_reason(body: str, limit: int = 150) -> str:
    """The kms check's line of a /readyz answer, shortened for the screen."""
    line = next((x.strip() for x in body.splitlines() if "kms:" in x), " ".join(body.split()))
    return line if len(line) <= limit else line[: limit - 1] + "…"


class KmsPart:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        fast = ctx.options.fast
        self.refresh = 0.5 if fast else 1.0
        self.health = 1.0 if fast else 2.0
        self.count = 3 if fast else len(SECRET_NAMES)
        self.cli_log = ctx.log("kms-plugin-cli")
        self.kms = tool("kms-plugin", "kms_plugin")

    def start_plugin(self, name: str, options: list[str],
                     env: dict[str, str] | None = None) -> Plugin:
        socket = self.ctx.work / f"kms-{name}.sock"
        endpoint = f"unix://{socket}"
        log = self.ctx.log(f"kms-plugin-{name}")
        argv = [*self.kms, "serve", "--endpoint", endpoint, "--metrics-port", "0",
                "--refresh-interval", str(self.refresh), "--health-interval", str(self.health),
                "--retry-interval", "0.5", *options]
        process = ServiceProcess(f"kms-plugin ({name})", argv, log, env=env)
        self.ctx.cleanup.push(f"kms-plugin {name}", process.stop)
        process.start()
        plugin = Plugin(process, endpoint, log)

        def healthy() -> bool:
            with KubeApiserver(endpoint, PROVIDER) as api:
                return api.status().healthz == "ok"

        process.wait_for(healthy, timeout=READY_TIMEOUT, what="Status healthz ok", interval=0.1)
        return plugin

    def status_line(self, plugin: Plugin) -> str:
        with KubeApiserver(plugin.endpoint, PROVIDER) as api:
            status = api.status()
        return (f"Status: healthz {status.healthz}, version {status.version}, key_id "
                f"{short_key_id(status.key_id)}")

    def current_key_id(self, plugin: Plugin) -> str:
        with KubeApiserver(plugin.endpoint, PROVIDER) as api:
            return str(api.status().key_id)

    def write_and_read(self, step: StepContext, plugin: Plugin, etcd: Etcd, label: str) -> None:
        with KubeApiserver(plugin.endpoint, PROVIDER) as api:
            api.sync()
            first = ""
            for name in SECRET_NAMES[: self.count]:
                key_name = f"{label}-{name}" if label else name
                etcd.put(api, key_name)
                first = first or key_name
            sample_key = f"/registry/secrets/default/{first}"
            sample = etcd.values[sample_key]
            prefix = f"k8s:enc:kms:v2:{PROVIDER}:".encode()
            step.detail(f"etcd {sample_key} = {prefix.decode()} + EncryptedObject "
                        f"({len(sample) - len(prefix)} bytes; the secret value is not in it)")
            encrypts = api.calls["Encrypt"]
        with KubeApiserver(plugin.endpoint, PROVIDER) as cold:
            read = etcd.read_all(cold)
            decrypts = cold.calls["Decrypt"]
        step.detail(f"writes: {api.calls['Status']} Status + {encrypts} Encrypt (one seed, "
                    f"a fresh HKDF-derived DEK per Secret)")
        step.detail(f"reads by a freshly started apiserver: {read} Secrets, {decrypts} Decrypt "
                    "(one per seed)")
        step.note = (f"{self.count} Secrets written, {read} read back by a cold apiserver; "
                     f"{encrypts} Encrypt + {decrypts} Decrypt calls")

    def rotation(self, step: StepContext, plugin: Plugin, etcd: Etcd, rotate: Callable[[], str],
                 label: str) -> None:
        old = self.current_key_id(plugin)
        started = time.monotonic()
        how = rotate()
        wait_until(lambda: self.current_key_id(plugin) != old, 10 * self.refresh + 15,
                   "the new key_id in Status", [plugin.log])
        took = time.monotonic() - started
        new = self.current_key_id(plugin)
        with KubeApiserver(plugin.endpoint, PROVIDER) as api:
            api.sync()
            if api.seed is None or api.seed.key_id != new:
                raise DemoError("Encrypt did not use the new key_id")
            etcd.put(api, f"{label}-after-rotation")
        with KubeApiserver(plugin.endpoint, PROVIDER) as cold:
            read = etcd.read_all(cold)
        step.detail(how)
        step.detail(f"key_id {old}")
        step.detail(f"     → {new}")
        step.note = (f"new key_id in Status after {took:.1f}s, no restart; a new Secret under "
                     f"it, all {read} Secrets readable")

    # ------------------------------------------------------------------- the part

    def run(self) -> None:
        ctx, runner = self.ctx, self.ctx.runner
        keyring = ctx.work / "kms" / "keyring.json"
        keyring.parent.mkdir(mode=0o700)
        local_opts = ["--backend", "local", "--local-keyring", str(keyring)]
        etcd = Etcd()

        with runner.step("local backend: kms-plugin keygen, serve") as step:
            step.log(self.cli_log)
            out = run_logged([*self.kms, "keygen", *local_opts], self.cli_log,
                             timeout=CLI_TIMEOUT)
            step.detail("$ kms-plugin keygen → " + out.stdout_text.strip())
            local = self.start_plugin("local", local_opts)
            step.log(local.log)
            step.note = self.status_line(local)

        with runner.step("Secrets written and read as kube-apiserver does (local)") as step:
            step.log(local.log)
            self.write_and_read(step, local, etcd, "")

        def rotate_local() -> str:
            out = run_logged([*self.kms, "rotate", *local_opts], self.cli_log,
                             timeout=CLI_TIMEOUT)
            return "$ kms-plugin rotate → " + out.stdout_text.strip()

        with runner.step("Key rotation picked up live (kms-plugin rotate)") as step:
            step.log(local.log)
            self.rotation(step, local, etcd, rotate_local, "local")

        with runner.step("kms-plugin inspect --decrypt on a stored Secret") as step:
            key = f"/registry/secrets/default/{SECRET_NAMES[0]}"
            value_file = ctx.work / "kms" / "etcd-value.bin"
            value_file.write_bytes(etcd.values[key])
            out = run_logged([*self.kms, "inspect", *local_opts, "--decrypt", "--etcd-key", key,
                              str(value_file)], self.cli_log, timeout=CLI_TIMEOUT, check=False)
            step.log(self.cli_log)
            step.detail(f"$ kms-plugin inspect --decrypt --etcd-key {key} etcd-value.bin")
            for line in out.stdout_text.rstrip().splitlines():
                step.detail("  " + line)
            if out.returncode != 0 or "decrypt: ok" not in out.stdout_text:
                raise DemoError(f"inspect exited {out.returncode}: {out.stderr_text}")
            if etcd.secrets[key].decode() in out.stdout_text:
                raise DemoError("inspect printed the secret without --show-secret")
            step.note = "provider, key_id, DEK source and annotations shown; decrypts (secret " \
                        "not printed)"
        local.process.stop()

        # --- awskms against the fake AWS KMS ---------------------------------------------
        fake_log = ctx.log("fake-kms")
        fake = ServiceProcess("fake-kms", [*FAKE_KMS, "--create-key", "--alias", "alias/edge-demo"],
                              fake_log, env=CHECKOUT_ON_PATH)
        with runner.step("awskms backend against the fake AWS KMS (python -m fake_kms)") as step:
            step.log(fake_log)
            ctx.cleanup.push("fake-kms", fake.stop)
            fake.start()
            info: dict[str, Any] = {}

            def announced() -> bool:
                for line in fake.log_text().splitlines():
                    if line.startswith("{") and '"endpoint"' in line:
                        info.update(json.loads(line))
                        return True
                return False

            fake.wait_for(announced, timeout=READY_TIMEOUT, what="its endpoint")
            arn = str(info["keys"][0])
            endpoint = str(info["endpoint"])
            aws_opts = ["--backend", "awskms", "--awskms-key-id", "alias/edge-demo",
                        "--awskms-region", str(info.get("region", "us-east-1")),
                        "--awskms-endpoint-url", endpoint]
            aws = self.start_plugin("awskms", aws_opts, env=FAKE_AWS_ENV)
            step.log(aws.log)
            step.detail(f"fake AWS KMS at {endpoint}, key {arn} (alias/edge-demo)")
            step.note = self.status_line(aws)

        with runner.step("Secrets through AWS KMS: almost no remote calls") as step:
            step.log(aws.log)
            http_post(f"{endpoint}/_fake/calls/reset")
            aws_etcd = Etcd()
            self.write_and_read(step, aws, aws_etcd, "aws")
            calls = http_get(f"{endpoint}/_fake/calls")[1]
            counted = json.loads(calls).get("calls", {})
            data_calls = {op: n for op, n in counted.items() if op in ("Encrypt", "Decrypt")}
            step.detail("calls the fake AWS KMS saw meanwhile: " + (", ".join(
                f"{op} {n}" for op, n in sorted(counted.items())) or "none"))
            step.note += (f"; AWS KMS Encrypt/Decrypt calls: "
                          f"{sum(data_calls.values())} (the local KEK wraps the seeds)")

        def rotate_aws() -> str:
            http_post(f"{endpoint}/_fake/keys/{arn}/rotate")
            return "AWS KMS: on-demand rotation of the key (new key material)"

        with runner.step("AWS KMS key rotation picked up live") as step:
            step.log(aws.log)
            self.rotation(step, aws, aws_etcd, rotate_aws, "aws")

        with runner.step("AWS KMS down: Secrets stay readable") as step:
            step.log(aws.log)
            fake.stop()
            took = wait_until(lambda: "degraded" in aws.http("/readyz")[1],
                              10 * self.health + 20, "the plugin noticing the outage",
                              [aws.log])
            code, ready = aws.http("/readyz")
            metrics = aws.http("/metrics")[1]
            reachable = next((line for line in metrics.splitlines()
                              if line.startswith("kms_plugin_backend_reachable")), "")
            with KubeApiserver(aws.endpoint, PROVIDER) as cold:
                cold.sync()  # a restarted apiserver: Status, then Encrypt of a new seed
                aws_etcd.put(cold, "aws-during-outage")
            with KubeApiserver(aws.endpoint, PROVIDER) as cold:
                read = aws_etcd.read_all(cold)
            step.detail(f"fake KMS stopped; the plugin noticed after {took:.1f}s")
            step.detail(self.status_line(aws) + " (by policy: cached keys still serve)")
            step.detail(f"/readyz {code}: {readyz_reason(ready)}")
            if reachable:
                step.detail(f"metric {reachable}")
            step.note = (f"a restarted apiserver wrote 1 Secret and read all {read} while the "
                         "KMS is unreachable")
        aws.process.stop()


def run_part(ctx: Context) -> None:
    KmsPart(ctx).run()


__all__ = ["Etcd", "KmsPart", "run_part", "secret_object", "short_key_id"]
