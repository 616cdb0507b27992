"""``node-resource-manager``: the agent, one reconcile (``--once``) or a plan (``--dry-run``).

Exit codes of ``--once`` and ``--dry-run``: 0 converged (or nothing to do on this node),
1 topology config invalid, 2 some listed device refused (or a problem that needs a person),
3 LVM error (state unknown), 4 Kubernetes API error, 64 bad command line.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Protocol

from edge_common.log import setup_logging
from edge_common.lvm import Lvm
from edge_common.metrics import HealthChecks, MetricsServer, parse_host_port
from node_resource_manager.agent import Agent
from node_resource_manager.config import NrmConfig, load_config
from node_resource_manager.events import Deduper, LogSink, Sink
from node_resource_manager.journal import Journal
from node_resource_manager.metrics import Metrics
from node_resource_manager.plan import describe
from node_resource_manager.reconcile import Reconciler, ReconcileResult
from node_resource_manager.safety import SafetyChecker
from node_resource_manager.sources import FileSource, Snapshot

log = logging.getLogger("node_resource_manager")

EXIT_KUBE_ERROR = 4
EXIT_USAGE = 64


class KubeSourceLike(Protocol):
    """What the loop needs from node_resource_manager.kube.KubeSource (imported lazily)."""

    def snapshot(self) -> Snapshot | None: ...

    def sync_once(self) -> Snapshot: ...

    def start(self, trigger: Callable[[str], None], stop: threading.Event) -> None: ...


def main(argv: Sequence[str] | None = None) -> int:
    try:
        cfg = load_config(argv)
    except SystemExit as exc:  # argparse: 0 after --help/--version, 2 on a bad command line
        code = exc.code if isinstance(exc.code, int) else 1
        return EXIT_USAGE if code == 2 else code
    setup_logging(cfg.log_level, cfg.log_json)
    try:
        return run(cfg)
    except KeyboardInterrupt:
        return 130


def run(cfg: NrmConfig) -> int:
    lvm = Lvm(cfg.lvm_settings())
    checker = SafetyChecker(cfg.safety_settings())
    journal = Journal(cfg.state_dir)
    metrics = Metrics()
    deduper = Deduper(cfg.event_repeat_seconds)
    source: FileSource | KubeSourceLike
    sink: Sink
    if cfg.offline:
        source = FileSource(cfg.topology_file, cfg.node_labels)
        sink = LogSink(cfg.status_file or None, deduper)
    else:
        from edge_common.kubeapi import ApiError, make_client
        from node_resource_manager.kube import KubeSink, KubeSource

        try:
            api = make_client(cfg.kubeconfig)
        except ApiError as exc:
            print(f"node-resource-manager: cannot configure the Kubernetes client: {exc}",
                  file=sys.stderr)
            return EXIT_KUBE_ERROR
        kube_source = KubeSource(api, node_name=cfg.node_name,
                                 namespace=cfg.configmap_namespace, configmap=cfg.configmap_name,
                                 key=cfg.configmap_key, watch_timeout=cfg.watch_timeout_seconds)
        sink = KubeSink(api, node_name=cfg.node_name, annotation=cfg.status_annotation,
                        heartbeat=cfg.status_heartbeat_seconds, deduper=deduper,
                        node_uid=lambda: kube_source.node_uid)
        source = kube_source
    reconciler = Reconciler(
        node_name=cfg.node_name, lvm=lvm, checker=checker, journal=journal,
        paths=cfg.host_paths(), gate_key=cfg.gate_label_key, gate_value=cfg.gate_label_value,
        sink=sink, metrics=metrics,
    )

    if cfg.once or cfg.dry_run:
        if isinstance(source, FileSource):
            snap = source.snapshot()
        else:
            from node_resource_manager.kube import KubeError

            try:
                snap = source.sync_once()
            except KubeError as exc:
                print(f"node-resource-manager: {exc}", file=sys.stderr)
                return EXIT_KUBE_ERROR
        result = reconciler.reconcile(snap.config, snap.labels, dry_run=cfg.dry_run)
        print(render(cfg, snap, result))
        return result.outcome.exit_code

    stop = threading.Event()
    agent = Agent(reconciler, source.snapshot, resync_seconds=cfg.resync_seconds,
                  debounce_seconds=cfg.debounce_seconds)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("stopping", extra={"signal": signal.Signals(signum).name})
        agent.stop(stop)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    server: MetricsServer | None = None
    if cfg.metrics_address:
        host, port = parse_host_port(cfg.metrics_address)
        checks = HealthChecks(live={"loop": agent.healthy}, ready={"reconciled": agent.ready})
        server = MetricsServer(host, port, registry=metrics.registry,
                               checks=checks).start()
    source.start(agent.trigger, stop)
    udev = None
    if cfg.udev:
        from node_resource_manager.udev import UdevWatcher

        udev = UdevWatcher(agent.trigger)
        udev.start()
    log.info("node resource manager running", extra={
        "node": cfg.node_name, "topology": cfg.topology_file or
        f"configmap {cfg.configmap_namespace}/{cfg.configmap_name}"})
    try:
        agent.run(stop)
    finally:
        if udev is not None:
            udev.stop()
        if server is not None:
            server.stop()
    return 0


def render(cfg: NrmConfig, snap: Snapshot, result: ReconcileResult) -> str:
    """What ``--once`` and ``--dry-run`` print: the plan, what was done, the result."""
    lines = [f"node {cfg.node_name}: topology from {snap.config.source}"
             + (f" (generation {snap.config.generation})" if snap.config.generation else "")]
    if cfg.dry_run:
        lines.append("DRY RUN: nothing is changed.")
    if result.plan is not None:
        lines.append(describe(result.plan))
    for problem in result.problems:
        if result.plan is None or problem not in result.plan.problems:
            lines.append(f"Problem: {problem}")
    if result.execution is not None:
        for done in result.execution.done:
            lines.append(f"Done: {done.detail}")
        for failed in result.execution.failed:
            lines.append(f"FAILED: {failed.error} (state unknown)")
        for unchanged in result.execution.unchanged:
            lines.append(f"No change needed after re-reading LVM: {type(unchanged).__name__} "
                         f"{unchanged.vg}")
        for skipped in result.execution.skipped:
            lines.append(f"Skipped after a failure: {type(skipped).__name__} {skipped.vg}")
    lines.append(f"result: {result.outcome} (exit {result.outcome.exit_code}): {result.message}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
