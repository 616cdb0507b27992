"""Typed records for what lvm reports: volume groups, logical volumes, physical volumes."""

from __future__ import annotations

from dataclasses import dataclass, field

from edge_common.lvm.attr import LvAttr


@dataclass(frozen=True)
class VolumeGroup:
    name: str
    uuid: str
    size: int  # bytes
    free: int  # bytes
    extent_size: int  # bytes
    extent_count: int
    free_count: int
    pv_count: int
    lv_count: int
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class LogicalVolume:
    name: str
    vg_name: str
    uuid: str
    size: int  # bytes
    attr: LvAttr
    tags: tuple[str, ...] = ()
    pool_lv: str | None = None  # the thin pool of a thin volume
    origin: str | None = None  # the origin of a snapshot
    data_percent: float | None = None  # thin pools, thin volumes, snapshots
    metadata_percent: float | None = None  # thin pools
    metadata_size: int | None = None  # thin pools: bytes of the (hidden) metadata LV
    segtype: str = "linear"  # of the first segment: linear, striped, thin-pool, thin, ...
    stripes: int = 1
    path: str = ""  # /dev/<vg>/<lv>

    @property
    def full_name(self) -> str:
        return f"{self.vg_name}/{self.name}"

    @property
    def is_thin_pool(self) -> bool:
        return self.attr.thin_pool

    @property
    def is_thin(self) -> bool:
        """A thin volume (thin snapshots included)."""
        return self.attr.thin_volume

    @property
    def is_snapshot(self) -> bool:
        """A thick copy-on-write snapshot, or a thin volume that has an origin."""
        return self.attr.snapshot or (self.attr.thin_volume and bool(self.origin))

    @property
    def is_active(self) -> bool:
        return self.attr.active


@dataclass(frozen=True)
class PhysicalVolume:
    name: str  # device path, e.g. /dev/loop3
    vg_name: str | None  # None for a PV that belongs to no VG
    uuid: str
    size: int  # bytes usable for extents
    free: int  # bytes
    dev_size: int  # bytes of the underlying device


@dataclass(frozen=True)
class LvmReport:
    """Everything lvm knows, from ONE lvm process."""

    vgs: tuple[VolumeGroup, ...] = field(default=())
    lvs: tuple[LogicalVolume, ...] = field(default=())
    pvs: tuple[PhysicalVolume, ...] = field(default=())

    def vg(self, name: str) -> VolumeGroup | None:
        return next((vg for vg in self.vgs if vg.name == name), None)

    def lvs_of(self, vg_name: str) -> tuple[LogicalVolume, ...]:
        return tuple(lv for lv in self.lvs if lv.vg_name == vg_name)

    def pvs_of(self, vg_name: str) -> tuple[PhysicalVolume, ...]:
        return tuple(pv for pv in self.pvs if pv.vg_name == vg_name)
