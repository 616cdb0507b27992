"""LvAttr decoding and JSON report parsing (canned lvm output)."""

from __future__ import annotations

import json

import pytest

from edge_common.lvm import LvAttr, LvmError
from edge_common.lvm.report import parse_full


def test_thin_pool_attr_decodes_every_field() -> None:
    attr = LvAttr.parse("twi-aotz--")
    assert attr.thin_pool and not attr.thin_volume and not attr.snapshot
    assert attr.writeable and attr.active and attr.open and attr.zeroing
    assert attr.allocation == "i" and attr.target_type == "t"
    assert attr.healthy and not attr.skips_activation
    assert str(attr) == "twi-aotz--"


def test_thin_snapshot_attr_skips_activation_and_is_inactive() -> None:
    attr = LvAttr.parse("Vwi---tz-k")
    assert attr.thin_volume and attr.skips_activation and not attr.active and not attr.open


def test_attr_without_device_mapper_has_unknown_state() -> None:
    attr = LvAttr.parse("-wi-XX----")
    assert attr.state_unknown and not attr.active and not attr.open


def test_thick_snapshot_and_origin_attrs() -> None:
    assert LvAttr.parse("swi-a-s---").snapshot
    assert LvAttr.parse("owi-a-s---").origin
    assert LvAttr.parse("swi-I-s---").invalid_snapshot
    assert LvAttr.parse("-ri-a-----").read_only
    assert LvAttr.parse("-wi-a---p-").partial


@pytest.mark.parametrize("bad", ["", "-wi-a", "-wi-a------"])
def test_attr_of_the_wrong_length_is_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        LvAttr.parse(bad)


def _lv(name: str, uuid: str, **kw: str) -> dict[str, str]:
    row = {
        "lv_name": name,
        "vg_name": "vg1",
        "lv_uuid": uuid,
        "lv_size": "8388608",
        "lv_attr": "-wi-a-----",
        "lv_tags": "",
        "pool_lv": "",
        "origin": "",
        "data_percent": "",
        "metadata_percent": "",
    }
    row.update(kw)
    return row


def _seg(uuid: str, segtype: str, stripes: str = "1", start: str = "0") -> dict[str, str]:
    return {"lv_uuid": uuid, "segtype": segtype, "stripes": stripes, "seg_start": start}


FULLREPORT = {
    "report": [
        {
            "vg": [
                {
                    "vg_name": "vg1",
                    "vg_uuid": "vgu",
                    "vg_size": "125829120",
                    "vg_free": "58720256",
                    "vg_extent_size": "4194304",
                    "vg_extent_count": "30",
                    "vg_free_count": "14",
                    "pv_count": "2",
                    "lv_count": "3",
                    "vg_tags": "a,b",
                }
            ],
            "pv": [
                {
                    "pv_name": "/dev/loop0",
                    "vg_name": "vg1",
                    "pv_uuid": "p0",
                    "pv_size": "62914560",
                    "pv_free": "8388608",
                    "dev_size": "67108864",
                }
            ],
            "lv": [
                _lv(
                    "pool",
                    "u1",
                    lv_attr="twi-aotz--",
                    data_percent="12.50",
                    metadata_percent="1.07",
                ),
                _lv("[pool_tdata]", "u2", lv_attr="Twi-ao----"),
                _lv("thin", "u3", lv_attr="Vwi-aotz--", pool_lv="pool", lv_tags="o=csi,x"),
                _lv("snap", "u4", lv_attr="Vwi---tz-k", pool_lv="pool", origin="thin"),
                _lv("striped", "u5"),
            ],
            "seg": [
                _seg("u1", "thin-pool"),
                _seg("u2", "linear"),
                _seg("u3", "thin"),
                _seg("u4", "thin"),
                _seg("u5", "linear", start="4194304"),
                _seg("u5", "striped", "2", "0"),
            ],
            "pvseg": [{"pvseg_start": "0"}],
        },
        {
            "pv": [
                {
                    "pv_name": "/dev/loop1",
                    "vg_name": "",
                    "pv_uuid": "p1",
                    "pv_size": "67108864",
                    "pv_free": "67108864",
                    "dev_size": "67108864",
                }
            ]
        },
    ],
    "log": [],
}


def test_fullreport_is_parsed_into_typed_records() -> None:
    report = parse_full(json.dumps(FULLREPORT).encode(), ["lvm", "fullreport"])
    vg = report.vg("vg1")
    assert vg is not None and vg.tags == ("a", "b") and vg.free_count == 14
    lvs = {lv.name: lv for lv in report.lvs}
    assert set(lvs) == {"pool", "thin", "snap", "striped"}  # hidden [pool_tdata] left out
    assert lvs["pool"].is_thin_pool and lvs["pool"].data_percent == 12.5
    assert lvs["pool"].metadata_percent == 1.07
    assert lvs["thin"].is_thin and lvs["thin"].pool_lv == "pool"
    assert lvs["thin"].tags == ("o=csi", "x") and not lvs["thin"].is_snapshot
    assert lvs["snap"].is_snapshot and lvs["snap"].origin == "thin"
    assert lvs["striped"].segtype == "striped" and lvs["striped"].stripes == 2  # first segment
    assert lvs["thin"].path == "/dev/vg1/thin"
    pvs = {pv.name: pv for pv in report.pvs}
    assert pvs["/dev/loop0"].vg_name == "vg1"
    assert pvs["/dev/loop1"].vg_name is None
    assert report.pvs_of("vg1") == (pvs["/dev/loop0"],)


def test_lv_without_a_segment_is_an_output_error() -> None:
    doc = {"report": [{"lv": [_lv("a", "u9")], "seg": []}]}
    with pytest.raises(LvmError):
        parse_full(json.dumps(doc).encode(), ["lvm", "fullreport"])


def test_non_numeric_percent_is_an_output_error() -> None:
    doc = {"report": [{"lv": [_lv("a", "u9", data_percent="x")], "seg": [_seg("u9", "thin")]}]}
    with pytest.raises(LvmError):
        parse_full(json.dumps(doc).encode(), ["lvm", "fullreport"])
