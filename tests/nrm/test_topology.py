"""Topology parsing, validation (exact messages) and node matching."""

from __future__ import annotations

import pytest

from node_resource_manager.topology import (
    ConfigInvalid,
    Operator,
    ThinPoolSpec,
    TopologyType,
    gate_open,
    parse_topology,
)

PRODUCT_EXAMPLE = """\
volumegroup:
- name: volumegroup1
  key: kubernetes.io/storagetype
  operator: In
  value: lvm
  topology:
    type: device
    devices:
    - /dev/sdb1
    - /dev/sdb2
    - /dev/sdc
"""


def problems_of(text: str) -> tuple[str, ...]:
    with pytest.raises(ConfigInvalid) as info:
        parse_topology(text)
    return info.value.problems


def test_product_example_under_volumegroup_key_parses() -> None:
    topo = parse_topology(PRODUCT_EXAMPLE)
    (vg,) = topo.volume_groups
    assert vg.name == "volumegroup1"
    assert vg.key == "kubernetes.io/storagetype"
    assert vg.operator is Operator.IN
    assert vg.value == "lvm"
    assert vg.type is TopologyType.DEVICE
    assert vg.devices == ("/dev/sdb1", "/dev/sdb2", "/dev/sdc")
    assert vg.thin_pool is None


def test_bare_list_parses_like_the_wrapped_one() -> None:
    bare = PRODUCT_EXAMPLE.split("\n", 1)[1]
    assert parse_topology(bare).volume_groups == parse_topology(PRODUCT_EXAMPLE).volume_groups


def test_empty_config_means_no_volume_groups() -> None:
    assert parse_topology("").volume_groups == ()
    assert parse_topology("volumegroup: []").volume_groups == ()


@pytest.mark.parametrize(
    ("operator", "value", "labels", "selected"),
    [
        ("In", "lvm", {"t": "lvm"}, True),
        ("In", "lvm", {"t": "ssd"}, False),
        ("In", "lvm", {}, False),
        ("NotIn", "lvm", {"t": "ssd"}, True),
        ("NotIn", "lvm", {"t": "lvm"}, False),
        ("NotIn", "lvm", {}, True),
        ("Exists", None, {"t": ""}, True),
        ("Exists", None, {"other": "x"}, False),
        ("DoesNotExist", None, {"other": "x"}, True),
        ("DoesNotExist", None, {"t": "lvm"}, False),
    ],
)
def test_every_operator_selects_nodes_by_label(
    operator: str, value: str | None, labels: dict[str, str], selected: bool
) -> None:
    value_line = f"  value: {value}\n" if value is not None else ""
    text = (f"- name: vg1\n  key: t\n  operator: {operator}\n{value_line}"
            "  topology: {type: device, devices: [/dev/sdb]}\n")
    (vg,) = parse_topology(text).volume_groups
    assert vg.selects(labels) is selected
    assert len(parse_topology(text).for_node(labels)) == (1 if selected else 0)


def test_gate_label_must_carry_the_configured_value() -> None:
    key = "alibabacloud.com/edge-enable-localstorage"
    assert gate_open({key: "true"}, key, "true")
    assert not gate_open({key: "false"}, key, "true")
    assert not gate_open({}, key, "true")
    assert gate_open({"my/gate": "yes"}, "my/gate", "yes")


def test_unquoted_boolean_value_is_read_as_label_text() -> None:
    text = "- {name: vg1, key: t, operator: In, value: true, " \
           "topology: {type: device, devices: [/dev/sdb]}}\n"
    (vg,) = parse_topology(text).volume_groups
    assert vg.value == "true"


def test_invalid_yaml_names_line_and_column() -> None:
    (problem,) = problems_of("volumegroup:\n- name: vg1\n  key: [unclosed\n")
    assert problem.startswith("invalid YAML: ")
    assert "line 4" in problem or "line 3" in problem


def test_unknown_operator_is_named_with_the_allowed_ones() -> None:
    (problem,) = problems_of(
        "- {name: vg1, key: t, operator: Equals, value: x, "
        "topology: {type: device, devices: [/dev/sdb]}}"
    )
    assert problem == ("volumegroup[0] (vg1): unknown operator 'Equals' (expected one of In, "
                       "NotIn, Exists, DoesNotExist)")


def test_missing_fields_are_each_reported() -> None:
    problems = problems_of("- {name: vg1}\n- {key: t, operator: Exists, "
                           "topology: {type: device, devices: [/dev/sdb]}}\n")
    assert problems == (
        "volumegroup[0] (vg1): missing required field 'key'",
        "volumegroup[0] (vg1): missing required field 'operator'",
        "volumegroup[0] (vg1): missing required field 'topology'",
        "volumegroup[1]: missing required field 'name'",
    )


def test_in_without_value_and_exists_with_value_are_errors() -> None:
    problems = problems_of(
        "- {name: a, key: t, operator: In, topology: {type: device, devices: [/dev/sdb]}}\n"
        "- {name: b, key: t, operator: Exists, value: x, "
        "topology: {type: device, devices: [/dev/sdc]}}\n"
    )
    assert problems == (
        "volumegroup[0] (a): operator In needs a 'value'",
        "volumegroup[1] (b): operator Exists takes no 'value' (found 'x')",
    )


def test_missing_devices_and_bad_paths_are_errors() -> None:
    problems = problems_of(
        "- {name: a, key: t, operator: Exists, topology: {type: device}}\n"
        "- {name: b, key: t, operator: Exists, topology: {type: device, devices: [sdb]}}\n"
        "- {name: c, key: t, operator: Exists, topology: {type: lvm, devices: [/dev/sdb]}}\n"
    )
    assert problems == (
        "volumegroup[0] (a): missing required field 'topology.devices' (a non-empty list)",
        "volumegroup[1] (b): topology.devices[0] 'sdb' is not a device path under /dev/",
        "volumegroup[2] (c): unknown topology type 'lvm' (expected one of device, pattern)",
    )


def test_duplicate_volume_group_names_are_an_error() -> None:
    problems = problems_of(
        "- {name: vg1, key: t, operator: Exists, topology: {type: device, devices: [/dev/b]}}\n"
        "- {name: vg1, key: u, operator: Exists, topology: {type: device, devices: [/dev/c]}}\n"
    )
    assert problems == (
        "volumegroup[1] (vg1): duplicate volume group name 'vg1' (already defined by "
        "volumegroup[0])",
    )


def test_one_device_in_two_selected_volume_groups_is_an_error_for_that_node() -> None:
    topo = parse_topology(
        "- {name: vg1, key: t, operator: Exists, topology: {type: device, devices: [/dev/b]}}\n"
        "- {name: vg2, key: u, operator: Exists, topology: {type: device, devices: [/dev/b]}}\n"
    )
    # A node selected by one of the two entries is fine ...
    assert [vg.name for vg in topo.for_node({"t": "1"})] == ["vg1"]
    # ... a node selected by both is not.
    with pytest.raises(ConfigInvalid) as info:
        topo.for_node({"t": "1", "u": "1"})
    assert info.value.problems == (
        "device /dev/b is listed in volume groups 'vg1' and 'vg2'; a device can belong to one "
        "volume group only",
    )


def test_unknown_fields_are_errors_not_silently_ignored() -> None:
    (problem,) = problems_of(
        "- {name: vg1, key: t, operator: Exists, devics: [], "
        "topology: {type: device, devices: [/dev/b]}}"
    )
    assert problem.startswith("volumegroup[0] (vg1): unknown field 'devics'")


def test_not_a_list_is_an_error() -> None:
    assert problems_of("volumegroup: {name: vg1}") == (
        "expected a list of volume groups, bare or under a 'volumegroup:' key; found a mapping",
    )
    assert problems_of("groups: []")[0].startswith(
        "expected a list of volume groups, bare or under a 'volumegroup:' key; found a mapping "
        "with key(s) groups"
    )


def test_invalid_volume_group_name_is_an_error() -> None:
    (problem,) = problems_of(
        "- {name: -vg, key: t, operator: Exists, topology: {type: device, devices: [/dev/b]}}"
    )
    assert problem.startswith("volumegroup[0] (-vg): invalid volume group name '-vg'")


def test_pattern_type_and_thin_pool_parse() -> None:
    text = (
        "- name: vg1\n  key: t\n  operator: Exists\n"
        "  topology: {type: pattern, patterns: ['/dev/disk/by-id/nvme-*', 'sd[b-z]']}\n"
        "  thinPool: {name: pool0, sizePercent: 80, overprovisionRatio: 4}\n"
    )
    (vg,) = parse_topology(text).volume_groups
    assert vg.type is TopologyType.PATTERN
    assert vg.patterns == ("/dev/disk/by-id/nvme-*", "sd[b-z]")
    assert vg.thin_pool == ThinPoolSpec("pool0", 80, 4.0)


def test_thin_pool_bounds_are_checked() -> None:
    problems = problems_of(
        "- name: vg1\n  key: t\n  operator: Exists\n"
        "  topology: {type: device, devices: [/dev/b]}\n"
        "  thinPool: {sizePercent: 100, overprovisionRatio: 0.5}\n"
    )
    assert problems == (
        "volumegroup[0] (vg1): missing required field 'thinPool.name'",
        "volumegroup[0] (vg1): 'thinPool.sizePercent' must be an integer from 1 to 95 (room "
        "is kept for the pool's metadata), found 100",
        "volumegroup[0] (vg1): 'thinPool.overprovisionRatio' must be a number >= 1, found 0.5",
    )


def test_digest_follows_the_text() -> None:
    a = parse_topology(PRODUCT_EXAMPLE)
    b = parse_topology(PRODUCT_EXAMPLE.replace("/dev/sdc", "/dev/sdd"))
    assert a.digest != b.digest
    assert a.digest == parse_topology(PRODUCT_EXAMPLE).digest
