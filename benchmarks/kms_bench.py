"""KMS plugin benchmark: the plugin beside a floor, over real unix sockets, in one run.

    python benchmarks/kms_bench.py [--calls 2000] [--write-docs]

Every server runs in its own process and every load generator in a separate client process
(Python threads, one gRPC channel per simulated client, like one kube-apiserver each):

1. floor: a bare Python gRPC server implementing KMS v2 Encrypt/Decrypt that only AES-GCM-wraps
   the 32 bytes with a fixed key (no formats, no validation, no metrics, no logs);
2. the plugin (`kms-plugin serve`, local backend, default settings incl. audit log lines);
3. Encrypt of a 32-byte seed and Decrypt of its ciphertext, 1 and 4 concurrent clients:
   ops/s, p50, p99 and the plugin/floor p50 ratio;
4. backend calls during 10,000 Encrypts (plugin metrics; background health probes shown apart);
5. a restart, then 200 seeds (written under several local KEKs: --kek-max-uses 50) decrypted
   by 16 concurrent cold clients: backend calls vs distinct local KEKs;
6. Status latency (p99) of one poller while 32 clients decrypt, for the floor and the plugin,
   and for the plugin with that restart storm added (kube-apiserver polls Status with a short
   timeout and marks the provider unhealthy when it is late);
7. resident memory (VmRSS) of the idle plugin, and the time from process start to the first
   Status answering `ok` (median of 5 starts).
Targets (issues 3 and 14): p50 within 1.15x of the floor at 1 and 4 clients; <= 2 backend calls
per 10,000 Encrypts; <= 1 backend call per distinct local KEK after a restart; Status p99 <
100 ms during the storm; idle RSS < 60 MB; first ok < 1 s.
With --write-docs the figures replace the "KMS plugin" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.report import rss_kib, write_section  # noqa: E402

SECTION = "## KMS plugin"
CLIENT_COUNTS = (1, 4)
P50_TARGET = 1.15
ENV = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}


# --- the floor server ---------------------------------------------------------------------


def run_floor(endpoint: str) -> int:
    """A bare KMS v2 gRPC server: AES-GCM of the plaintext with one fixed key, nothing else."""
    from concurrent import futures

    import grpc
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from edge_common.server import parse_endpoint
    from edge_proto.kms.v2 import service_pb2, service_pb2_grpc

    aead = AESGCM(AESGCM.generate_key(bit_length=256))

    class Floor(service_pb2_grpc.KeyManagementServiceServicer):
        def Status(self, request: Any, context: Any) -> Any:  # noqa: N802
            return service_pb2.StatusResponse(version="v2", healthz="ok", key_id="floor")

        def Encrypt(self, request: Any, context: Any) -> Any:  # noqa: N802
            nonce = os.urandom(12)
            return service_pb2.EncryptResponse(
                ciphertext=nonce + aead.encrypt(nonce, request.plaintext, None), key_id="floor"
            )

        def Decrypt(self, request: Any, context: Any) -> Any:  # noqa: N802
            ct = request.ciphertext
            return service_pb2.DecryptResponse(plaintext=aead.decrypt(ct[:12], ct[12:], None))

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    service_pb2_grpc.add_KeyManagementServiceServicer_to_server(Floor(), server)
    server.add_insecure_port(parse_endpoint(endpoint).grpc_address)
    server.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    server.stop(1).wait()
    return 0


# --- the client process -------------------------------------------------------------------


def run_client(endpoint: str, op: str, clients: int, calls: int, data_file: str | None) -> int:
    """Drive one server from this (separate) process; print JSON with every latency."""
    import grpc

    from edge_common.server import unix_channel
    from edge_proto.kms.v2 import service_pb2, service_pb2_grpc

    channels = [unix_channel(endpoint) for _ in range(clients)]
    stubs = [service_pb2_grpc.KeyManagementServiceStub(ch) for ch in channels]
    seeds: list[Any] = []
    if op == "decrypt-file":
        assert data_file
        seeds = [
            service_pb2.DecryptRequest(
                ciphertext=bytes.fromhex(d["ct"]), key_id=d["key_id"],
                annotations={k: bytes.fromhex(v) for k, v in d["ann"].items()}, uid="bench",
            )
            for d in json.loads(Path(data_file).read_text())
        ]
    if op != "decrypt-file":
        enc = stubs[0].Encrypt(service_pb2.EncryptRequest(plaintext=os.urandom(32)), timeout=5)
        dec_req = service_pb2.DecryptRequest(
            ciphertext=enc.ciphertext, key_id=enc.key_id, annotations=dict(enc.annotations),
            uid="bench",
        )
    latencies: list[list[float]] = [[] for _ in range(clients)]
    dumped: list[dict[str, Any]] = []
    errors: list[str] = []
    barrier = threading.Barrier(clients)

    def worker(i: int) -> None:
        stub = stubs[i]
        lat = latencies[i]
        seed = os.urandom(32)
        try:
            if op in ("encrypt", "decrypt"):  # warm-up outside the measurement
                for _ in range(20):
                    stub.Encrypt(service_pb2.EncryptRequest(plaintext=seed), timeout=5)
            barrier.wait()
            if op == "status":  # a poller, as kube-apiserver's health check (but faster)
                for _ in range(calls):
                    t0 = time.perf_counter()
                    stub.Status(service_pb2.StatusRequest(), timeout=5)
                    lat.append(time.perf_counter() - t0)
                    time.sleep(0.005)
                return
            if op == "decrypt-file":
                for req in seeds[i::clients]:
                    t0 = time.perf_counter()
                    stub.Decrypt(req, timeout=5)
                    lat.append(time.perf_counter() - t0)
                return
            for n in range(calls):
                t0 = time.perf_counter()
                if op == "decrypt":
                    stub.Decrypt(dec_req, timeout=5)
                else:
                    resp = stub.Encrypt(
                        service_pb2.EncryptRequest(plaintext=seed, uid="bench"), timeout=5
                    )
                lat.append(time.perf_counter() - t0)
                if op == "encrypt-dump":
                    dumped.append({"ct": resp.ciphertext.hex(), "key_id": resp.key_id,
                                   "ann": {k: v.hex() for k, v in resp.annotations.items()}})
                    del n
        except grpc.RpcError as exc:
            errors.append(f"{exc.code().name}: {exc.details()}")  # type: ignore[attr-defined]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    if op == "encrypt-dump" and data_file:
        Path(data_file).write_text(json.dumps(dumped))
    flat = [x for lat in latencies for x in lat]
    print(json.dumps({"latencies": flat, "wall": wall, "errors": errors}))
    for ch in channels:
        ch.close()
    return 0


def client(endpoint: str, op: str, clients: int, calls: int,
           data_file: str | None = None) -> dict[str, Any]:
    argv = [sys.executable, str(Path(__file__).resolve()), "client", "--endpoint", endpoint,
            "--op", op, "--clients", str(clients), "--calls", str(calls)]
    if data_file:
        argv += ["--data-file", data_file]
    out = subprocess.run(argv, capture_output=True, env=ENV, timeout=900, check=True)
    result: dict[str, Any] = json.loads(out.stdout)
    if result["errors"]:
        raise RuntimeError(f"client errors: {result['errors'][:3]}")
    return result


def summarize(result: dict[str, Any]) -> dict[str, float]:
    lat = sorted(result["latencies"])
    return {
        "ops": len(lat) / result["wall"],
        "p50": statistics.median(lat),
        "p99": lat[min(len(lat) - 1, int(len(lat) * 0.99))],
    }


# --- servers ------------------------------------------------------------------------------


class Server:
    def __init__(self, argv: list[str], endpoint: str, log: Path) -> None:
        self.endpoint = endpoint
        self.log_path = log
        self.started = time.perf_counter()
        with log.open("wb") as fh:
            self.proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=ENV,
                                         cwd=str(REPO), start_new_session=True)

    def wait_ok(self, timeout: float = 30.0) -> float:
        """Poll Status until it answers ok; seconds since the process was started."""
        import grpc

        from edge_common.server import unix_channel
        from edge_proto.kms.v2 import service_pb2, service_pb2_grpc

        deadline = time.monotonic() + timeout
        path = self.endpoint[len("unix://"):]
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log_path.read_text()[-2000:]}")
            if os.path.exists(path):
                with unix_channel(self.endpoint) as ch:
                    try:
                        st = service_pb2_grpc.KeyManagementServiceStub(ch).Status(
                            service_pb2.StatusRequest(), timeout=1)
                        if st.healthz == "ok":
                            return time.perf_counter() - self.started
                    except grpc.RpcError:
                        pass
            time.sleep(0.002)
        raise RuntimeError("server did not become ready")

    def metrics_port(self) -> int:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            m = re.search(r'"metrics_port": (\d+)', self.log_path.read_text())
            if m:
                return int(m.group(1))
            time.sleep(0.01)
        raise RuntimeError("no metrics port in the log")

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process so far."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mib(self) -> float:
        return rss_kib(self.proc.pid) / 1024

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


def metric_sum(port: int, name: str, **labels: str) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    total = 0.0
    for line in body.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


@contextlib.contextmanager
def plugin(workdir: Path, keyring: Path, name: str, *extra: str) -> Iterator[Server]:
    endpoint = f"unix://{workdir}/{name}.sock"
    argv = [sys.executable, "-m", "kms_plugin", "serve", "--backend", "local",
            "--local-keyring", str(keyring), "--endpoint", endpoint, "--metrics-port", "0",
            *extra]
    server = Server(argv, endpoint, workdir / f"{name}.log")
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def floor(workdir: Path) -> Iterator[Server]:
    endpoint = f"unix://{workdir}/floor.sock"
    server = Server([sys.executable, str(Path(__file__).resolve()), "floor", "--endpoint",
                     endpoint], endpoint, workdir / "floor.log")
    try:
        yield server
    finally:
        server.stop()


# --- the run ------------------------------------------------------------------------------


def status_under_storm(endpoint: str, cold_data: str | None) -> dict[str, Any]:
    """Status latencies of one poller while 32 clients decrypt (and 16 cold ones, if given)."""
    out: dict[str, Any] = {}

    def background(name: str, op: str, clients: int, calls: int,
                   data_file: str | None = None) -> threading.Thread:
        def go() -> None:
            out[name] = client(endpoint, op, clients, calls, data_file)
        t = threading.Thread(target=go)
        t.start()
        return t

    threads = [background("hot", "decrypt", 32, 200), background("status", "status", 1, 300)]
    if cold_data:
        threads.append(background("cold", "decrypt-file", 16, 0, cold_data))
    for t in threads:
        t.join()
    return dict(out["status"])


def run(calls: int, rounds: int) -> dict[str, Any]:
    from kms_plugin.backends import local

    results: dict[str, Any] = {"latency": {}, "load": " ".join(
        f"{x:.1f}" for x in os.getloadavg())}
    workdir = Path(tempfile.mkdtemp(prefix="kmsb-", dir="/tmp"))
    keyring = workdir / "keyring.json"
    local.keygen(keyring, "bench")

    with floor(workdir) as fl, plugin(workdir, keyring, "plugin") as pl:
        fl.wait_ok()
        pl.wait_ok()
        time.sleep(7)
        results["floor_rss_mib"] = fl.rss_mib()
        results["fresh_rss_mib"] = pl.rss_mib()
        # interleaved rounds (floor, plugin, plugin, floor ...): drift and noise from other
        # processes hit both alike; each figure is the median over the rounds
        samples: dict[str, list[dict[str, float]]] = {}
        for n in range(rounds):
            pair = (("floor", fl), ("plugin", pl))
            for clients in CLIENT_COUNTS:
                per_client = max(50, calls // clients)
                for op in ("encrypt", "decrypt"):
                    for label, server in pair if n % 2 == 0 else pair[::-1]:
                        key = f"{op}/{clients}/{label}"
                        cpu_before = server.cpu_seconds()
                        got = summarize(client(server.endpoint, op, clients, per_client))
                        got["cpu"] = (server.cpu_seconds() - cpu_before) / (
                            per_client * clients)
                        samples.setdefault(key, []).append(got)
                        print(f"  {key}: {got}", file=sys.stderr)
        for key, runs in samples.items():
            results["latency"][key] = {
                field: statistics.median(r[field] for r in runs)
                for field in ("ops", "p50", "p99", "cpu")
            }
        # the ratio of each round's adjacent floor and plugin runs, then the median: a burst
        # of load from elsewhere hits one pair, not the whole figure
        results["ratio"] = {
            key.rsplit("/", 1)[0]: statistics.median(
                p["p50"] / f["p50"]
                for f, p in zip(runs, samples[key.replace("/floor", "/plugin")], strict=True)
            )
            for key, runs in samples.items() if key.endswith("/floor")
        }

        port = pl.metrics_port()
        before = metric_sum(port, "kms_plugin_backend_calls_total")
        probes_before = metric_sum(port, "kms_plugin_health_probes_total")
        client(pl.endpoint, "encrypt", 16, 625)  # 10,000 Encrypts
        results["calls_per_10k"] = metric_sum(port, "kms_plugin_backend_calls_total") - before
        probes = metric_sum(port, "kms_plugin_health_probes_total")
        results["probes_in_10k"] = probes - probes_before

    # restart, then 200 seeds written under several local KEKs, decrypted by cold clients
    data = workdir / "seeds.json"
    with plugin(workdir, keyring, "writer", "--kek-max-uses", "50") as writer:
        writer.wait_ok()
        client(writer.endpoint, "encrypt-dump", 1, 200, str(data))
    seeds = json.loads(data.read_text())
    results["storm_keks"] = len({json.dumps(s["ann"], sort_keys=True) for s in seeds})
    with plugin(workdir, keyring, "writer", "--kek-max-uses", "50") as restarted:
        restarted.wait_ok()
        port = restarted.metrics_port()
        before = metric_sum(port, "kms_plugin_backend_calls_total", operation="unwrap")
        storm = client(restarted.endpoint, "decrypt-file", 16, 0, str(data))
        results["storm_unwraps"] = (
            metric_sum(port, "kms_plugin_backend_calls_total", operation="unwrap") - before
        )
        results["storm_wall"] = storm["wall"]
        results["storm_p99"] = summarize(storm)["p99"]
        time.sleep(7)  # idle: the plugin returns what the burst left within 5 s
        results["idle_rss_mib"] = restarted.rss_mib()

    # Status while Decrypts storm in: the floor and the plugin under the same load (32 clients
    # decrypting a seed they wrote); the plugin once more with 16 cold clients added (a fresh
    # process: nothing cached, every local KEK is unwrapped through the backend)
    with floor(workdir) as fl2:
        fl2.wait_ok()
        out = status_under_storm(fl2.endpoint, None)
        results["status_storm_floor_p99"] = summarize(out)["p99"]
    with plugin(workdir, keyring, "storm", "--kek-max-uses", "50") as stormed:
        stormed.wait_ok()
        out = status_under_storm(stormed.endpoint, None)
        results["status_storm_p99"] = summarize(out)["p99"]
    with plugin(workdir, keyring, "storm2", "--kek-max-uses", "50") as stormed:
        stormed.wait_ok()
        out = status_under_storm(stormed.endpoint, str(data))
        results["status_cold_storm_p99"] = summarize(out)["p99"]

    starts = []
    for i in range(5):
        with plugin(workdir, keyring, f"start{i}") as p:
            starts.append(p.wait_ok())
    results["start_to_ok"] = statistics.median(starts)
    shutil.rmtree(workdir, ignore_errors=True)
    return results


def report(r: dict[str, Any], calls: int, rounds: int) -> str:
    lat = r["latency"]

    def ms(x: float) -> str:
        return f"{x * 1000:.2f} ms"

    lines = [
        SECTION,
        "",
        f"`python benchmarks/kms_bench.py --calls {calls} --rounds {rounds}` on "
        f"{platform.node() or 'this host'} ({os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, load average {r['load']}), {time.strftime('%Y-%m-%d')}. "
        "Servers and clients are separate processes on unix sockets; the floor is a bare Python "
        "gRPC server that only AES-GCM-wraps the 32 bytes. The plugin runs with its defaults "
        "(local backend, audit line per call, metrics). Each figure is the median of the "
        "interleaved rounds; the ratio is the median of each round's plugin/floor p50 (the two "
        "runs next to each other in time). CPU/call is the server process's user + system time "
        "per call (whole process, 10 ms ticks): less sensitive to other load than latency.",
        "",
        "| operation | clients | floor ops/s | floor p50 | floor p99 | floor CPU/call | "
        "plugin ops/s | plugin p50 | plugin p99 | plugin CPU/call | p50 plugin/floor |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    worst = 0.0
    for op in ("encrypt", "decrypt"):
        for clients in CLIENT_COUNTS:
            f = lat[f"{op}/{clients}/floor"]
            p = lat[f"{op}/{clients}/plugin"]
            ratio = r["ratio"][f"{op}/{clients}"]
            worst = max(worst, ratio)
            lines.append(
                f"| {op.capitalize()} | {clients} | {f['ops']:.0f} | {ms(f['p50'])} | "
                f"{ms(f['p99'])} | {f['cpu'] * 1e6:.0f} µs | {p['ops']:.0f} | {ms(p['p50'])} | "
                f"{ms(p['p99'])} | {p['cpu'] * 1e6:.0f} µs | {ratio:.2f}x |"
            )
    ok = "met" if worst <= P50_TARGET else "NOT met"
    calls10k = r["calls_per_10k"]
    probes = r["probes_in_10k"]
    encrypt_caused = max(0.0, calls10k - 3 * probes)
    lines += [
        "",
        "| figure | result | target |",
        "|---|---|---|",
        f"| worst p50 ratio plugin/floor | {worst:.2f}x | <= {P50_TARGET}x: {ok} |",
        f"| backend calls during 10,000 Encrypts | {encrypt_caused:.0f} caused by Encrypt "
        f"({calls10k:.0f} in total incl. {probes:.0f} background health probe(s) of 3 calls) "
        f"| <= 2: {'met' if encrypt_caused <= 2 else 'NOT met'} |",
        f"| backend calls to decrypt 200 seeds after a restart (16 cold clients) | "
        f"{r['storm_unwraps']:.0f} for {r['storm_keks']} distinct local KEKs "
        f"(wall {r['storm_wall'] * 1000:.0f} ms, p99 {ms(r['storm_p99'])}) | "
        f"<= 1 per local KEK: {'met' if r['storm_unwraps'] <= r['storm_keks'] else 'NOT met'} |",
        f"| Status p99 while 32 clients decrypt (floor under the same load) | "
        f"{ms(r['status_storm_p99'])} (floor {ms(r['status_storm_floor_p99'])}); with 16 cold "
        f"clients added: {ms(r['status_cold_storm_p99'])} | < 100 ms: "
        f"{'met' if max(r['status_storm_p99'], r['status_cold_storm_p99']) < 0.1 else 'NOT met'}"
        " |",
        f"| idle plugin memory (VmRSS) after the decrypt storm | {r['idle_rss_mib']:.1f} MiB "
        f"= {r['idle_rss_mib'] * 1.048576:.1f} MB (freshly started: {r['fresh_rss_mib']:.1f} MiB; "
        f"the bare floor server: {r['floor_rss_mib']:.1f} MiB) | < 60 MB: "
        f"{'met' if r['idle_rss_mib'] * 1.048576 < 60 else 'NOT met'} |",
        f"| process start to first `ok` Status (median of 5) | {r['start_to_ok'] * 1000:.0f} ms "
        f"| < 1 s: {'met' if r['start_to_ok'] < 1 else 'NOT met'} |",
        "",
    ]
    return "\n".join(lines)


def write_docs(section: str) -> None:
    write_section(SECTION, section)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode")
    f = sub.add_parser("floor", help="(internal) run the floor server")
    f.add_argument("--endpoint", required=True)
    c = sub.add_parser("client", help="(internal) run a load generator")
    c.add_argument("--endpoint", required=True)
    c.add_argument("--op", required=True,
                   choices=("encrypt", "decrypt", "encrypt-dump", "decrypt-file", "status"))
    c.add_argument("--clients", type=int, default=1)
    c.add_argument("--calls", type=int, default=1000)
    c.add_argument("--data-file")
    parser.add_argument("--calls", type=int, default=2000,
                        help="measured calls per scenario (split over the clients)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved floor/plugin rounds per scenario (median reported)")
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    if args.mode == "floor":
        return run_floor(args.endpoint)
    if args.mode == "client":
        return run_client(args.endpoint, args.op, args.clients, args.calls, args.data_file)
    results = run(args.calls, args.rounds)
    section = report(results, args.calls, args.rounds)
    print(section)
    if args.write_docs:
        write_docs(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
