"""Parsing of lvm's JSON reports (``--reportformat json --units b --nosuffix``) into records.

Every surprise (not JSON, wrong shape, a missing field, a size that is not an integer) raises
LvmOutputError: a report we cannot read must never look like "nothing there".
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from edge_common.lvm.attr import LvAttr
from edge_common.lvm.errors import LvmOutputError
from edge_common.lvm.records import LogicalVolume, LvmReport, PhysicalVolume, VolumeGroup

REPORT_ARGS: tuple[str, ...] = ("--reportformat", "json", "--units", "b", "--nosuffix")

VG_FIELDS: tuple[str, ...] = (
    "vg_name",
    "vg_uuid",
    "vg_size",
    "vg_free",
    "vg_extent_size",
    "vg_extent_count",
    "vg_free_count",
    "pv_count",
    "lv_count",
    "vg_tags",
)
LV_FIELDS: tuple[str, ...] = (
    "lv_name",
    "vg_name",
    "lv_uuid",
    "lv_size",
    "lv_attr",
    "lv_tags",
    "pool_lv",
    "origin",
    "data_percent",
    "metadata_percent",
    "lv_metadata_size",
)
SEG_FIELDS: tuple[str, ...] = ("lv_uuid", "segtype", "stripes", "seg_start")
PV_FIELDS: tuple[str, ...] = ("pv_name", "vg_name", "pv_uuid", "pv_size", "pv_free", "dev_size")

Row = Mapping[str, Any]


class _Context:
    """Carries the argv for error messages."""

    def __init__(self, argv: Sequence[str]) -> None:
        self.argv = tuple(argv)

    def fail(self, what: str) -> LvmOutputError:
        return LvmOutputError(
            self.argv, 0, "", message=f"unexpected output from {' '.join(self.argv[:4])}: {what}"
        )


def load_sections(stdout: bytes, argv: Sequence[str]) -> list[dict[str, list[Row]]]:
    """The ``report`` array: one dict of sections (vg, lv, pv, seg, ...) per element."""
    ctx = _Context(argv)
    try:
        doc = json.loads(stdout.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ctx.fail(f"not JSON ({exc}): {stdout[:200]!r}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("report"), list):
        raise ctx.fail(f"no 'report' array: {stdout[:200]!r}")
    sections: list[dict[str, list[Row]]] = []
    for element in doc["report"]:
        if not isinstance(element, dict):
            raise ctx.fail("a report element is not an object")
        parsed: dict[str, list[Row]] = {}
        for key, rows in element.items():
            if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
                raise ctx.fail(f"section {key!r} is not a list of objects")
            parsed[key] = rows
        sections.append(parsed)
    return sections


def rows_of(sections: Iterable[Mapping[str, list[Row]]], key: str) -> list[Row]:
    return [row for element in sections for row in element.get(key, [])]


def parse_vgs(rows: Iterable[Row], argv: Sequence[str]) -> list[VolumeGroup]:
    ctx = _Context(argv)
    out = []
    for row in rows:
        out.append(
            VolumeGroup(
                name=_str(row, "vg_name", ctx),
                uuid=_str(row, "vg_uuid", ctx),
                size=_int(row, "vg_size", ctx),
                free=_int(row, "vg_free", ctx),
                extent_size=_int(row, "vg_extent_size", ctx),
                extent_count=_int(row, "vg_extent_count", ctx),
                free_count=_int(row, "vg_free_count", ctx),
                pv_count=_int(row, "pv_count", ctx),
                lv_count=_int(row, "lv_count", ctx),
                tags=_tags(row, "vg_tags", ctx),
            )
        )
    return out


def parse_lvs(
    rows: Iterable[Row], seg_rows: Iterable[Row] | None, argv: Sequence[str]
) -> list[LogicalVolume]:
    """LVs from lv rows; segtype/stripes from seg_rows (fullreport) or from the lv rows
    themselves (``lvs -o ...,segtype``, which prints one row per segment)."""
    ctx = _Context(argv)
    rows = list(rows)
    first_seg: dict[str, Row] = {}
    for seg_row in rows if seg_rows is None else seg_rows:
        uuid = _str(seg_row, "lv_uuid", ctx)
        start = _int(seg_row, "seg_start", ctx)
        known = first_seg.get(uuid)
        if known is None or start < _int(known, "seg_start", ctx):
            first_seg[uuid] = seg_row
    out: list[LogicalVolume] = []
    seen: set[str] = set()
    for row in rows:
        name = _str(row, "lv_name", ctx)
        uuid = _str(row, "lv_uuid", ctx)
        if uuid in seen or name.startswith("["):
            continue  # a further segment of an LV already read; or a hidden (internal) LV
        seen.add(uuid)
        vg_name = _str(row, "vg_name", ctx)
        seg = first_seg.get(uuid)
        if seg is None:
            raise ctx.fail(f"no segment reported for LV {vg_name}/{name}")
        try:
            attr = LvAttr.parse(_str(row, "lv_attr", ctx))
        except ValueError as exc:
            raise ctx.fail(str(exc)) from None
        out.append(
            LogicalVolume(
                name=name,
                vg_name=vg_name,
                uuid=uuid,
                size=_int(row, "lv_size", ctx),
                attr=attr,
                tags=_tags(row, "lv_tags", ctx),
                pool_lv=_opt_str(row, "pool_lv", ctx),
                origin=_opt_str(row, "origin", ctx),
                data_percent=_opt_float(row, "data_percent", ctx),
                metadata_percent=_opt_float(row, "metadata_percent", ctx),
                metadata_size=_opt_int(row, "lv_metadata_size", ctx),
                segtype=_str(seg, "segtype", ctx),
                stripes=_int(seg, "stripes", ctx),
                path=f"/dev/{vg_name}/{name}",
            )
        )
    return out


def parse_pvs(rows: Iterable[Row], argv: Sequence[str]) -> list[PhysicalVolume]:
    ctx = _Context(argv)
    return [
        PhysicalVolume(
            name=_str(row, "pv_name", ctx),
            vg_name=_opt_str(row, "vg_name", ctx),
            uuid=_str(row, "pv_uuid", ctx),
            size=_int(row, "pv_size", ctx),
            free=_int(row, "pv_free", ctx),
            dev_size=_int(row, "dev_size", ctx),
        )
        for row in rows
    ]


def parse_full(stdout: bytes, argv: Sequence[str]) -> LvmReport:
    sections = load_sections(stdout, argv)
    pvs: dict[str, PhysicalVolume] = {}
    for pv in parse_pvs(rows_of(sections, "pv"), argv):
        pvs.setdefault(pv.uuid or pv.name, pv)  # fullreport may list a PV more than once
    return LvmReport(
        vgs=tuple(parse_vgs(rows_of(sections, "vg"), argv)),
        lvs=tuple(parse_lvs(rows_of(sections, "lv"), rows_of(sections, "seg"), argv)),
        pvs=tuple(pvs.values()),
    )


def _raw(row: Row, key: str, ctx: _Context) -> str:
    if key not in row:
        raise ctx.fail(f"field {key!r} missing in {dict(row)!r}")
    value = row[key]
    if not isinstance(value, str):
        raise ctx.fail(f"field {key!r} is not a string: {value!r}")
    return value


def _str(row: Row, key: str, ctx: _Context) -> str:
    value = _raw(row, key, ctx)
    if not value:
        raise ctx.fail(f"field {key!r} is empty")
    return value


def _opt_str(row: Row, key: str, ctx: _Context) -> str | None:
    return _raw(row, key, ctx) or None


def _int(row: Row, key: str, ctx: _Context) -> int:
    value = _raw(row, key, ctx)
    try:
        return int(value)
    except ValueError:
        raise ctx.fail(f"field {key!r} is not an integer: {value!r}") from None


def _opt_int(row: Row, key: str, ctx: _Context) -> int | None:
    """An optional size: empty (not a pool) -> None. A row without the key at all (hand-made
    rows from before the field was reported) -> None too; a present value must parse."""
    if key not in row:
        return None
    value = _raw(row, key, ctx)
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ctx.fail(f"field {key!r} is not an integer: {value!r}") from None


def _opt_float(row: Row, key: str, ctx: _Context) -> float | None:
    value = _raw(row, key, ctx)
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        raise ctx.fail(f"field {key!r} is not a number: {value!r}") from None


def _tags(row: Row, key: str, ctx: _Context) -> tuple[str, ...]:
    value = _raw(row, key, ctx)
    return tuple(tag for tag in value.split(",") if tag)
