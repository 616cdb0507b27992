"""One reconcile: config + node labels + ONE LVM report -> plan -> changes -> status and events."""

from __future__ import annotations

import datetime as dt
import enum
import logging
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from edge_common.lvm import Lvm, LvmError, LvmReport
from node_resource_manager import events as ev
from node_resource_manager.devices import HostPaths
from node_resource_manager.events import Sink
from node_resource_manager.executor import Execution, execute
from node_resource_manager.identity import Pins
from node_resource_manager.journal import Journal
from node_resource_manager.metrics import Metrics
from node_resource_manager.plan import (
    CreateThinPool,
    CreateVolumeGroup,
    ExtendThinPool,
    ExtendVolumeGroup,
    Plan,
    Planner,
    RetagThinPool,
    extend_pool_text,
    overprovision_tags,
    retag_pool_text,
)
from node_resource_manager.safety import SafetyChecker
from node_resource_manager.topology import ConfigInvalid, Topology, VolumeGroupSpec, gate_open

log = logging.getLogger(__name__)

STATUS_VERSION = 1
MAX_LISTED = 64  # entries per list in the status annotation (annotations are size-limited)


class Outcome(enum.StrEnum):
    CONVERGED = "Converged"
    NOT_ADMITTED = "NotAdmitted"  # the gate label is missing: nothing to do on this node
    NO_CONFIG = "NoConfig"  # the ConfigMap does not exist
    DEVICES_REFUSED = "DevicesRefused"
    CONFIG_INVALID = "ConfigInvalid"
    LVM_ERROR = "LvmError"
    ERROR = "Error"  # anything unexpected (an unreadable sysfs file, a journal write): unknown

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self]


#: ``--once`` / ``--dry-run`` exit codes (documented in docs/node-resource-manager.md).
EXIT_CODES: dict[Outcome, int] = {
    Outcome.CONVERGED: 0,
    Outcome.NOT_ADMITTED: 0,
    Outcome.NO_CONFIG: 0,
    Outcome.CONFIG_INVALID: 1,
    Outcome.DEVICES_REFUSED: 2,
    Outcome.LVM_ERROR: 3,
    Outcome.ERROR: 3,
}


@dataclass(frozen=True)
class ConfigState:
    """The topology as last read: parsed, invalid, or absent."""

    source: str  # e.g. "configmap kube-system/node-resource-topo" or "file /etc/topo.yaml"
    topology: Topology | None = None
    problems: tuple[str, ...] = ()
    generation: str | None = None  # the ConfigMap's resourceVersion, or the file's mtime

    @property
    def found(self) -> bool:
        return self.topology is not None or bool(self.problems)


@dataclass
class ReconcileResult:
    outcome: Outcome
    message: str
    started: float
    duration: float = 0.0
    dry_run: bool = False
    plan: Plan | None = None
    execution: Execution | None = None
    report: LvmReport | None = None
    problems: list[str] = field(default_factory=list)
    lvm_errors: list[str] = field(default_factory=list)
    status: dict[str, Any] = field(default_factory=dict)


class Reconciler:
    def __init__(
        self,
        *,
        node_name: str,
        lvm: Lvm,
        checker: SafetyChecker,
        journal: Journal,
        paths: HostPaths,
        gate_key: str,
        gate_value: str,
        sink: Sink,
        metrics: Metrics | None = None,
    ) -> None:
        self.node_name = node_name
        self.lvm = lvm
        self.checker = checker
        self.journal = journal
        self.gate_key = gate_key
        self.gate_value = gate_value
        self.sink = sink
        self.metrics = metrics
        self.paths = paths
        self.planner = Planner(checker, journal, paths)

    def reconcile(
        self, config: ConfigState, labels: Mapping[str, str], *, dry_run: bool = False
    ) -> ReconcileResult:
        started = time.time()
        t0 = time.monotonic()
        try:
            result = self._reconcile(config, labels, dry_run=dry_run, started=started)
        except Exception as exc:  # the state is unknown: report it, never guess
            log.exception("reconcile failed unexpectedly")
            result = ReconcileResult(Outcome.ERROR, f"unexpected error, state unknown: "
                                     f"{type(exc).__name__}: {exc}", started, dry_run=dry_run)
        result.duration = time.monotonic() - t0
        result.status = self._status(config, labels, result)
        if not dry_run:
            self._emit(result)
            self.sink.status(result.status)
        if self.metrics is not None and not dry_run:
            self._observe(result)
        log.info("reconcile finished", extra={
            "result": str(result.outcome), "duration_s": round(result.duration, 3),
            "dry_run": dry_run, "detail": result.message})
        return result

    def _reconcile(
        self, config: ConfigState, labels: Mapping[str, str], *, dry_run: bool, started: float
    ) -> ReconcileResult:
        if config.problems:
            return ReconcileResult(Outcome.CONFIG_INVALID, "; ".join(config.problems), started,
                                   dry_run=dry_run, problems=list(config.problems))
        if not gate_open(labels, self.gate_key, self.gate_value):
            return ReconcileResult(
                Outcome.NOT_ADMITTED,
                f"node lacks label {self.gate_key}={self.gate_value}: no disk is managed here",
                started, dry_run=dry_run)
        if config.topology is None:
            return ReconcileResult(Outcome.NO_CONFIG, f"no topology ({config.source} not found)",
                                   started, dry_run=dry_run)
        try:
            specs = config.topology.for_node(labels)
        except ConfigInvalid as exc:
            return ReconcileResult(Outcome.CONFIG_INVALID, str(exc), started, dry_run=dry_run,
                                   problems=list(exc.problems))
        try:
            report = self.lvm.report()
        except LvmError as exc:
            return ReconcileResult(Outcome.LVM_ERROR, f"LVM report failed, state unknown: {exc}",
                                   started, dry_run=dry_run)
        host = self.checker.snapshot(report.pvs)
        # Devices are held open from their first check until the last LVM write is done.
        with Pins(self.paths) as pins:
            try:
                plan = self.planner.plan(specs, report, host, pins)
            except ConfigInvalid as exc:
                return ReconcileResult(Outcome.CONFIG_INVALID, str(exc), started,
                                       dry_run=dry_run, report=report,
                                       problems=list(exc.problems))
            result = ReconcileResult(Outcome.CONVERGED, "", started, dry_run=dry_run,
                                     plan=plan, report=report, problems=list(plan.problems))
            if plan.actions and not dry_run:
                result.execution = execute(plan, self.lvm, self.journal, pins, self.paths)
                plan.refusals.extend(result.execution.refused)
        if result.execution is not None:
            try:
                result.report = self.lvm.report()  # the status shows the state after changes
            except LvmError as exc:
                result.report = None
                result.lvm_errors.append(f"LVM report after changes failed, state unknown: {exc}")
        self._conclude(result, specs)
        return result

    def _conclude(self, result: ReconcileResult, specs: tuple[VolumeGroupSpec, ...]) -> None:
        plan = result.plan
        assert plan is not None
        errors = list(result.lvm_errors)
        if result.execution is not None:
            errors = [str(f.error) for f in result.execution.failed] + errors
        if errors:
            result.outcome = Outcome.LVM_ERROR
            result.message = "; ".join(errors)
            return
        if plan.refusals or plan.problems:
            result.outcome = Outcome.DEVICES_REFUSED
            n = len(plan.refusals)
            result.message = f"{n} listed device(s) refused" + (
                "; " + "; ".join(plan.problems) if plan.problems else "")
            return
        if result.dry_run and plan.actions:
            result.message = f"{len(plan.actions)} change(s) planned"
        else:
            result.message = f"{len(specs)} volume group(s) in place"

    # ------------------------------------------------------------------ status and events

    def _status(
        self, config: ConfigState, labels: Mapping[str, str], result: ReconcileResult
    ) -> dict[str, Any]:
        status: dict[str, Any] = {
            "version": STATUS_VERSION,
            "node": self.node_name,
            "result": str(result.outcome),
            "message": result.message,
            "lastReconcileTime": dt.datetime.fromtimestamp(result.started, dt.UTC)
            .isoformat(timespec="seconds").replace("+00:00", "Z"),
            "durationSeconds": round(result.duration, 3),
            "admitted": gate_open(labels, self.gate_key, self.gate_value),
            "config": {
                "source": config.source,
                "generation": config.generation,
                "digest": config.topology.digest if config.topology else None,
            },
        }
        if result.problems:
            status["problems"] = result.problems[:MAX_LISTED]
        plan = result.plan
        report = result.report
        if plan is None:
            return status
        vgs = []
        for vgp in plan.volume_groups:
            name = vgp.spec.name
            entry: dict[str, Any] = {"name": name}
            vg = report.vg(name) if report is not None else None
            if vg is None:
                entry["state"] = "Missing"
            else:
                entry.update(state="Ready", size=vg.size, free=vg.free,
                             pvs=[pv.name for pv in report.pvs_of(name)] if report else [])
                if vgp.spec.thin_pool is not None and report is not None:
                    pool = next((lv for lv in report.lvs_of(name)
                                 if lv.name == vgp.spec.thin_pool.name and lv.is_thin_pool), None)
                    # What LVM holds (what the CSI driver acts on), not what the config says.
                    ratios = overprovision_tags(pool) if pool is not None else []
                    entry["thinPool"] = None if pool is None else {
                        "name": pool.name, "size": pool.size, "dataPercent": pool.data_percent,
                        "metadataSize": pool.metadata_size,
                        "sizePercent": round(pool.size * 100 / vg.size) if vg.size else None,
                        "overprovisionRatio": _ratio(ratios)}
                    if pool is not None and len(ratios) != 1:
                        entry["thinPool"]["overprovisionTags"] = ratios
                    if pool is not None:  # what the config asks, to show any drift
                        entry["thinPool"]["configured"] = {
                            "sizePercent": vgp.spec.thin_pool.size_percent,
                            "overprovisionRatio": vgp.spec.thin_pool.overprovision_ratio}
                    grown = [d.detail for d in (result.execution.done if result.execution
                                                else ())
                             if isinstance(d.action, ExtendThinPool) and d.action.vg == name]
                    if pool is not None and grown:
                        entry["thinPool"]["extended"] = grown[-1]
            vgs.append(entry)
        status["volumeGroups"] = vgs
        status["excludedDevices"] = [r.to_dict() for r in plan.refusals][:MAX_LISTED]
        if plan.skipped:
            status["skippedPatternMatches"] = [r.to_dict() for r in plan.skipped][:MAX_LISTED]
        status["removedFromConfig"] = [
            {"volumeGroup": r.vg, "device": r.pv,
             "note": "no longer listed; left in the volume group (never removed)"}
            for r in plan.removed][:MAX_LISTED]
        if result.dry_run:
            status["plannedActions"] = [_action_text(a) for a in plan.actions]
        return status

    def _emit(self, result: ReconcileResult) -> None:
        if result.outcome is Outcome.CONFIG_INVALID:
            self.sink.event(ev.CONFIG_INVALID, f"topology config invalid: {result.message}",
                            warning=True)
        if result.plan is not None:
            for refusal in result.plan.refusals:
                text = "; ".join(f"{r.reason}: {r.message}" for r in refusal.refusals)
                self.sink.event(ev.DEVICE_REJECTED,
                                f"volume group {refusal.vg}: device {refusal.listed} refused: "
                                f"{text}", warning=True)
        if result.execution is not None:
            for done in result.execution.done:
                reason = {CreateVolumeGroup: ev.VOLUME_GROUP_CREATED,
                          ExtendVolumeGroup: ev.VOLUME_GROUP_EXTENDED,
                          CreateThinPool: ev.THIN_POOL_CREATED,
                          ExtendThinPool: ev.THIN_POOL_EXTENDED,
                          RetagThinPool: ev.THIN_POOL_SETTINGS_CHANGED}[type(done.action)]
                self.sink.event(reason, done.detail, warning=False)
            for failed in result.execution.failed:
                self.sink.event(ev.LVM_FAILED,
                                f"volume group {failed.action.vg}: {failed.error} (state "
                                "unknown; retried on the next reconcile)", warning=True)
        elif result.outcome in (Outcome.LVM_ERROR, Outcome.ERROR):
            self.sink.event(ev.LVM_FAILED, result.message, warning=True)

    def _observe(self, result: ReconcileResult) -> None:
        m = self.metrics
        assert m is not None
        m.reconciles.labels(str(result.outcome)).inc()
        m.reconcile_duration.observe(result.duration)
        if result.outcome in (Outcome.LVM_ERROR, Outcome.ERROR, Outcome.CONFIG_INVALID):
            m.reconcile_errors.inc()
        if result.plan is not None:
            counts = Counter(str(r.refusals[0].reason) for r in result.plan.refusals)
            m.set_rejected(dict(counts))
            if result.report is not None:
                names = {vgp.spec.name for vgp in result.plan.volume_groups}
                vgs = [vg for vg in result.report.vgs if vg.name in names]
                pv_counts = {n: len(result.report.pvs_of(n)) for n in names}
                m.set_volume_groups(vgs, pv_counts)
        elif result.outcome in (Outcome.NOT_ADMITTED, Outcome.CONFIG_INVALID, Outcome.NO_CONFIG):
            m.set_rejected({})
        if result.execution is not None:
            for done in result.execution.done:
                m.actions.labels(type(done.action).__name__, "ok").inc()
            for failed in result.execution.failed:
                m.actions.labels(type(failed.action).__name__, "error").inc()


def _ratio(values: list[str]) -> float | None:
    """The ratio when exactly one overprovision tag carries a number; None otherwise."""
    if len(values) != 1:
        return None
    try:
        return float(values[0])
    except ValueError:
        return None


def _action_text(
    action: CreateVolumeGroup | ExtendVolumeGroup | CreateThinPool | ExtendThinPool
    | RetagThinPool,
) -> str:
    if isinstance(action, ExtendThinPool):
        return extend_pool_text(action)
    if isinstance(action, RetagThinPool):
        return retag_pool_text(action)
    if isinstance(action, CreateThinPool):
        return f"create thin pool {action.vg}/{action.spec.name}"
    verb = "create" if isinstance(action, CreateVolumeGroup) else "extend"
    return (f"{verb} volume group {action.vg} with "
            f"{', '.join(d.lvm_path for d in action.devices)}")

