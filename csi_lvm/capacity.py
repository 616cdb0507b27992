"""What the VGs and thin pools hold, cached: GetCapacity answers from memory.

external-provisioner (capacity tracking) calls GetCapacity for every StorageClass and node,
continually. The cache holds one `lvm fullreport` (VGs, LVs, PVs). It is refreshed every
`refresh_seconds` in a background thread, and marked stale by every change the driver makes;
the next reader after a change refreshes it (once, for all concurrent readers).
The same report feeds the VG and thin-pool gauges at scrape time (no lvm call per scrape).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from csi_lvm.volume import TAG_OVERPROVISION
from edge_common.lvm import LogicalVolume, Lvm, LvmError, LvmReport, VolumeGroup

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ThinPoolSpace:
    pool: LogicalVolume
    ratio: float

    @property
    def physical_free(self) -> int:
        used = (self.pool.data_percent or 0.0) / 100.0
        return max(0, int(self.pool.size * (1.0 - used)))

    @property
    def available(self) -> int:
        """Pool free bytes x overprovision ratio (what GetCapacity reports)."""
        return int(self.physical_free * self.ratio)

    @property
    def maximum(self) -> int:
        """The largest thin volume the pool accepts at all (OUT_OF_RANGE above it)."""
        return int(self.pool.size * self.ratio)


def pool_ratio(pool: LogicalVolume, default: float) -> float:
    for tag in pool.tags:
        if tag.startswith(TAG_OVERPROVISION):
            try:
                value = float(tag[len(TAG_OVERPROVISION):])
            except ValueError:
                continue
            if value > 0 and math.isfinite(value):
                return value
    return default


def max_striped_size(report: LvmReport, vg: VolumeGroup, stripes: int) -> int:
    """The largest striped LV: `stripes` PVs each giving as much as the stripes-th freest has."""
    frees = sorted((pv.free for pv in report.pvs_of(vg.name)), reverse=True)
    if stripes < 1 or len(frees) < stripes:
        return 0
    return frees[stripes - 1] * stripes


class CapacityCache:
    def __init__(self, lvm: Lvm, refresh_seconds: float, default_ratio: float) -> None:
        self._lvm = lvm
        self._refresh_seconds = refresh_seconds
        self.default_ratio = default_ratio
        self._report: LvmReport | None = None
        self._taken = 0.0
        self._generation = 0  # bumped by invalidate()
        self._report_generation = -1
        self._lock = threading.Lock()  # single-flight refresh
        self._state = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_error: str | None = None

    # -------------------------------------------------------------- lifecycle

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="capacity-refresh",
                                            daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(self._refresh_seconds):
            try:
                self.refresh()
            except LvmError as exc:
                log.warning("capacity refresh failed", extra={"error": str(exc)})

    # -------------------------------------------------------------- reading

    def invalidate(self) -> None:
        with self._state:
            self._generation += 1

    def refresh(self) -> LvmReport:
        with self._lock:
            with self._state:
                generation = self._generation
            try:
                report = self._lvm.report()
            except LvmError as exc:
                self.last_error = str(exc)
                raise
            with self._state:
                self._report, self._taken = report, time.monotonic()
                self._report_generation = generation
            self.last_error = None
            return report

    def report(self, *, fresh: bool = False) -> LvmReport:
        """The cached report; refreshed first when `fresh` and it is stale (we changed something
        since), or when there is none yet."""
        with self._state:
            report = self._report
            # Age matters only when the background refresher is late (it refreshes every period).
            stale = self._report_generation != self._generation or (
                time.monotonic() - self._taken > 2 * self._refresh_seconds)
        if report is None or (fresh and stale):
            return self.refresh()
        return report

    def cached(self) -> LvmReport | None:
        with self._state:
            return self._report

    def vg(self, name: str, *, fresh: bool = False) -> VolumeGroup | None:
        found = self.report(fresh=fresh).vg(name)
        if found is None and not fresh:
            found = self.report(fresh=True).vg(name)  # created since the last refresh?
        return found

    def thin_pool(self, vg: str, pool: str, *, fresh: bool = False) -> ThinPoolSpace | None:
        lv = _find_lv(self.report(fresh=fresh), vg, pool)
        if lv is None and not fresh:
            lv = _find_lv(self.report(fresh=True), vg, pool)
        if lv is None or not lv.is_thin_pool:
            return None
        return ThinPoolSpace(lv, pool_ratio(lv, self.default_ratio))


def _find_lv(report: LvmReport, vg: str, name: str) -> LogicalVolume | None:
    return next((lv for lv in report.lvs if lv.vg_name == vg and lv.name == name), None)


class LvmCollector(Collector):
    """VG size/free and thin pool data/metadata percent, from the cache at scrape time."""

    def __init__(self, cache: CapacityCache, vgs: Iterable[str] | None = None) -> None:
        self._cache = cache
        self._vgs = set(vgs) if vgs else None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        report = self._cache.cached()
        size = GaugeMetricFamily("csi_lvm_vg_size_bytes", "Volume group size", labels=["vg"])
        free = GaugeMetricFamily("csi_lvm_vg_free_bytes", "Volume group free bytes",
                                 labels=["vg"])
        data = GaugeMetricFamily("csi_lvm_thin_pool_data_percent", "Thin pool data usage",
                                 labels=["vg", "pool"])
        meta = GaugeMetricFamily("csi_lvm_thin_pool_metadata_percent",
                                 "Thin pool metadata usage", labels=["vg", "pool"])
        if report is not None:
            for vg in report.vgs:
                if self._vgs is not None and vg.name not in self._vgs:
                    continue
                size.add_metric([vg.name], vg.size)
                free.add_metric([vg.name], vg.free)
            for lv in report.lvs:
                if not lv.is_thin_pool or (self._vgs is not None and lv.vg_name not in self._vgs):
                    continue
                if lv.data_percent is not None:
                    data.add_metric([lv.vg_name, lv.name], lv.data_percent)
                if lv.metadata_percent is not None:
                    meta.add_metric([lv.vg_name, lv.name], lv.metadata_percent)
        yield from (size, free, data, meta)
