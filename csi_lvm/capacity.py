"""What the VGs and thin pools hold, cached: GetCapacity answers from memory.

external-provisioner (capacity tracking) calls GetCapacity for every StorageClass and node,
continually. The cache holds one `lvm fullreport` (VGs, LVs, PVs). It is refreshed every
`refresh_seconds` in a background thread, and marked stale by every change the driver makes
and by every change others make that csi_lvm.lvmwatch notices (LVM's metadata backups, block
device events); the next fresh reader (GetCapacity) after a change refreshes it (once, for all
concurrent readers). Nobody reading: no lvm call.
The same report feeds the VG and thin-pool gauges at scrape time (no lvm call per scrape).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from csi_lvm.volume import TAG_OVERPROVISION
from edge_common.lvm import LogicalVolume, Lvm, LvmError, LvmReport, VolumeGroup

if TYPE_CHECKING:
    from csi_lvm.config import CsiConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PoolThresholds:
    """Usage (percent) from which a thin pool counts as full: see pool_problems()."""

    data_percent: float = 90.0
    metadata_percent: float = 80.0

    @classmethod
    def of(cls, config: CsiConfig) -> PoolThresholds:
        return cls(config.thin_pool_data_threshold_percent,
                   config.thin_pool_metadata_threshold_percent)


#: What LVM's health character of a thin pool means (lv_attr bit 9).
_POOL_HEALTH = {
    "D": "out of data space",
    "M": "metadata read-only",
    "F": "failed",
}


def pool_problems(pool: LogicalVolume, thresholds: PoolThresholds) -> list[str]:
    """Why this thin pool counts as full or broken (empty: it is fine).

    LVM's own health flag comes first (a full pool answers writes with errors); usage at or
    above a threshold is reported before that happens."""
    problems = []
    if pool.attr.health in _POOL_HEALTH:
        problems.append(_POOL_HEALTH[pool.attr.health])
    data, meta = pool.data_percent, pool.metadata_percent
    if data is not None and data >= thresholds.data_percent:
        problems.append(f"data {data:g}% used (threshold {thresholds.data_percent:g}%)")
    if meta is not None and meta >= thresholds.metadata_percent:
        problems.append(f"metadata {meta:g}% used (threshold {thresholds.metadata_percent:g}%)")
    return problems


@dataclass(frozen=True)
class ThinPoolSpace:
    """A thin pool's room for thin volumes (TopoLVM's rule): pool size x overprovision ratio
    minus the virtual sizes already handed out; nothing while the pool is past a threshold."""

    pool: LogicalVolume
    ratio: float
    virtual_used: int  # sum of the virtual sizes of every thin LV in the pool
    problems: tuple[str, ...] = ()

    @property
    def capacity(self) -> int:
        """Virtual bytes the pool may promise in all: pool size x ratio."""
        return int(self.pool.size * self.ratio)

    @property
    def full(self) -> bool:
        return bool(self.problems)

    @property
    def available(self) -> int:
        """Virtual bytes still to be promised (GetCapacity and maximum_volume_size)."""
        if self.full:
            return 0
        return max(0, self.capacity - self.virtual_used)

    @property
    def maximum(self) -> int:
        """The largest new thin volume (or growth of one) the pool accepts now."""
        return self.available

    def refusal(self, growth: int) -> str | None:
        """Why `growth` more virtual bytes are refused (None: they fit)."""
        name = f"{self.pool.vg_name}/{self.pool.name}"
        if self.full:
            return f"thin pool {name} is full: {'; '.join(self.problems)}"
        if growth > self.available:
            return (f"thin pool {name} has room for {self.available} more bytes ({self.pool.size}"
                    f" bytes x overprovision ratio {self.ratio:g} - {self.virtual_used} bytes "
                    f"already given to thin volumes); {growth} needed")
        return None


def pool_ratio(pool: LogicalVolume, default: float) -> float:
    """The overprovision ratio the pool carries (its tag, as LVM reported it just now), or
    `default` when it carries none (or only unreadable ones)."""
    for tag in pool.tags:
        if tag.startswith(TAG_OVERPROVISION):
            try:
                value = float(tag[len(TAG_OVERPROVISION):])
            except ValueError:
                continue
            if value > 0 and math.isfinite(value):
                return value
    return default


def pool_space(report: LvmReport, vg: str, pool: str, default_ratio: float,
               thresholds: PoolThresholds) -> ThinPoolSpace | None:
    """The accounting of thin pool vg/pool from one report (None: no such thin pool)."""
    lv = _find_lv(report, vg, pool)
    if lv is None or not lv.is_thin_pool:
        return None
    used = sum(t.size for t in report.lvs
               if t.vg_name == vg and t.pool_lv == pool and t.is_thin)
    return ThinPoolSpace(lv, pool_ratio(lv, default_ratio), used,
                         tuple(pool_problems(lv, thresholds)))


def thin_refusal(report: LvmReport, vg: str, pool: str, size: int, replacing: str,
                 default_ratio: float, thresholds: PoolThresholds) -> str | None:
    """Why thin pool vg/pool cannot take a thin LV of `size` virtual bytes in place of its
    LV `replacing` (if it has one: a grown or re-created volume counts once); None: it can."""
    space = pool_space(report, vg, pool, default_ratio, thresholds)
    if space is None:
        return f"thin pool {vg}/{pool} does not exist"
    old = next((lv.size for lv in report.lvs if replacing and lv.name == replacing
                and lv.vg_name == vg and lv.pool_lv == pool), 0)
    return space.refusal(size - old)


def max_striped_size(report: LvmReport, vg: VolumeGroup, stripes: int) -> int:
    """The largest striped LV: `stripes` PVs each giving as much as the stripes-th freest has."""
    frees = sorted((pv.free for pv in report.pvs_of(vg.name)), reverse=True)
    if stripes < 1 or len(frees) < stripes:
        return 0
    return frees[stripes - 1] * stripes


#: In the window after a block device event a report at least this old is re-read.
SUSPECT_MIN_AGE = 1.0


class CapacityCache:
    def __init__(self, lvm: Lvm, refresh_seconds: float, default_ratio: float,
                 thresholds: PoolThresholds | None = None, recheck_seconds: float = 2.0) -> None:
        self._lvm = lvm
        self._refresh_seconds = refresh_seconds
        self.default_ratio = default_ratio
        self.thresholds = thresholds or PoolThresholds()
        self._recheck_seconds = recheck_seconds
        self._rechecked = -math.inf  # when a miss last made us re-read LVM
        self._listeners: list[Callable[[LvmReport], None]] = []
        self._report: LvmReport | None = None
        self._taken = 0.0
        self._generation = 0  # bumped by invalidate()
        self._report_generation = -1
        self._suspect_until = -math.inf  # see changed()
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

    def changed(self, window: float = 0.0) -> None:
        """Something outside the driver changed (or may be about to change) LVM: stale now,
        and for `window` seconds after, a report older than SUSPECT_MIN_AGE counts as stale
        too (a disk that just appeared is made a PV and VG moments later, with no event of
        its own where no udev daemon runs)."""
        with self._state:
            self._generation += 1
            if window > 0:
                self._suspect_until = max(self._suspect_until, time.monotonic() + window)

    def on_refresh(self, listener: Callable[[LvmReport], None]) -> None:
        """Call listener(report) after every successful refresh (pool watch, events)."""
        self._listeners.append(listener)

    def refresh(self) -> LvmReport:
        report = self._refresh()
        for listener in self._listeners:
            try:
                listener(report)
            except Exception:  # a listener must never break capacity answers
                log.exception("capacity listener failed")
        return report

    def _refresh(self) -> LvmReport:
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
            now = time.monotonic()
            age = now - self._taken
            # Age matters only when the background refresher is late (it refreshes every
            # period), or in the window after a block device event (at most one read a second).
            stale = self._report_generation != self._generation or (
                age > 2 * self._refresh_seconds) or (
                now < self._suspect_until and age >= SUSPECT_MIN_AGE)
        if report is None or (fresh and stale):
            return self.refresh()
        return report

    def recent(self, max_age: float) -> LvmReport | None:
        """The last report when it was read from LVM within max_age seconds (else None)."""
        with self._state:
            if self._report is None or time.monotonic() - self._taken > max_age:
                return None
            return self._report

    def cached(self) -> LvmReport | None:
        with self._state:
            return self._report

    def _after_miss(self) -> LvmReport:
        """A report read from LVM now, unless a miss already did that within the recheck
        period: something the node agent just built is found at once, while requests for
        something absent cost at most one lvm call per period."""
        with self._state:
            now = time.monotonic()
            due = now - self._rechecked >= self._recheck_seconds
            if due:
                self._rechecked = now
        return self.refresh() if due else self.report(fresh=True)

    def vg(self, name: str, *, fresh: bool = False) -> VolumeGroup | None:
        found = self.report(fresh=fresh).vg(name)
        if found is None:
            found = self._after_miss().vg(name)  # created since the last refresh?
        return found

    def thin_pool(self, vg: str, pool: str, *, fresh: bool = False) -> ThinPoolSpace | None:
        """The pool's accounting (ratio from its own tag, thin LVs summed, thresholds)."""
        space = pool_space(self.report(fresh=fresh), vg, pool, self.default_ratio,
                           self.thresholds)
        if space is None:
            space = pool_space(self._after_miss(), vg, pool, self.default_ratio,
                               self.thresholds)
        return space


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
        virtual = GaugeMetricFamily(
            "csi_lvm_thin_pool_virtual_bytes",
            "Virtual sizes handed out to thin volumes of the pool", labels=["vg", "pool"])
        available = GaugeMetricFamily(
            "csi_lvm_thin_pool_available_bytes",
            "Room for thin volumes: pool size x overprovision ratio - virtual bytes handed out "
            "(0 while the pool is past a threshold)", labels=["vg", "pool"])
        full = GaugeMetricFamily(
            "csi_lvm_thin_pool_over_threshold",
            "1 while the thin pool is past its data or metadata threshold (or LVM reports it "
            "out of space): its volumes are abnormal and GetCapacity reports 0",
            labels=["vg", "pool"])
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
                space = pool_space(report, lv.vg_name, lv.name, self._cache.default_ratio,
                                   self._cache.thresholds)
                if space is not None:
                    virtual.add_metric([lv.vg_name, lv.name], space.virtual_used)
                    available.add_metric([lv.vg_name, lv.name], space.available)
                    full.add_metric([lv.vg_name, lv.name], 1 if space.full else 0)
        yield from (size, free, data, meta, virtual, available, full)
