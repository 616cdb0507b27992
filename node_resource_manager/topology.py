"""The topology config: parse and validate the ``volumegroup`` YAML of the ConfigMap.

Accepted forms (operators write both)::

    - name: vg1            # a bare list
      ...
    volumegroup:           # or the list under a ``volumegroup:`` key
    - name: vg1
      ...

Each entry: ``name``, ``key``, ``operator`` (In, NotIn, Exists, DoesNotExist), ``value`` (In and
NotIn only), ``topology`` with ``type: device`` and ``devices`` (paths), or ``type: pattern`` and
``patterns`` (globs over /dev/disk/by-id, /dev/disk/by-path or kernel names), and optionally
``thinPool`` (``name``, ``sizePercent``, ``overprovisionRatio``).

Every problem is collected with the place it was found, so an operator fixes them all at once.
Problems that depend on the node (one device in two VGs) are found later, on the node.
"""

from __future__ import annotations

import enum
import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml


class Operator(enum.StrEnum):
    IN = "In"
    NOT_IN = "NotIn"
    EXISTS = "Exists"
    DOES_NOT_EXIST = "DoesNotExist"


class TopologyType(enum.StrEnum):
    DEVICE = "device"
    PATTERN = "pattern"


class ConfigInvalid(Exception):
    """The topology cannot be used; ``problems`` says exactly what is wrong, one line each."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = tuple(problems)
        super().__init__("; ".join(self.problems))


@dataclass(frozen=True)
class ThinPoolSpec:
    name: str
    size_percent: int = 90
    overprovision_ratio: float = 1.0


@dataclass(frozen=True)
class VolumeGroupSpec:
    name: str
    key: str
    operator: Operator
    value: str | None
    type: TopologyType
    devices: tuple[str, ...] = ()  # type device: paths as written
    patterns: tuple[str, ...] = ()  # type pattern: globs as written
    thin_pool: ThinPoolSpec | None = None

    def selects(self, labels: Mapping[str, str]) -> bool:
        """Does a node with these labels match this entry's selector?"""
        if self.operator is Operator.EXISTS:
            return self.key in labels
        if self.operator is Operator.DOES_NOT_EXIST:
            return self.key not in labels
        if self.operator is Operator.IN:
            return labels.get(self.key) == self.value
        # NotIn, as in Kubernetes selectors: a node without the key does not carry the value.
        return labels.get(self.key) != self.value


@dataclass(frozen=True)
class Topology:
    volume_groups: tuple[VolumeGroupSpec, ...]
    digest: str  # sha256 (first 16 hex) of the text it was parsed from

    def for_node(self, labels: Mapping[str, str]) -> tuple[VolumeGroupSpec, ...]:
        """The entries that select a node with these labels.

        A literal device path in two selected entries is a config error for this node."""
        selected = tuple(vg for vg in self.volume_groups if vg.selects(labels))
        owner: dict[str, str] = {}
        problems = []
        for vg in selected:
            for path in dict.fromkeys(vg.devices):
                if path in owner and owner[path] != vg.name:
                    problems.append(
                        f"device {path} is listed in volume groups {owner[path]!r} and "
                        f"{vg.name!r}; a device can belong to one volume group only"
                    )
                owner.setdefault(path, vg.name)
        if problems:
            raise ConfigInvalid(problems)
        return selected


def gate_open(labels: Mapping[str, str], key: str, value: str) -> bool:
    """The node is admitted to local storage management at all (e.g.
    ``alibabacloud.com/edge-enable-localstorage=true``)."""
    return labels.get(key) == value


# LVM's rules for VG and LV names: these characters, not starting with '-', not "." or "..".
_LVM_NAME = re.compile(r"^[A-Za-z0-9+_.][A-Za-z0-9+_.-]{0,126}$")
# Kubernetes label keys: optional DNS prefix, then a name of up to 63 characters.
_LABEL_KEY = re.compile(
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)

_ENTRY_FIELDS = ("name", "key", "operator", "value", "topology", "thinPool")
_TOPOLOGY_FIELDS = ("type", "devices", "patterns")
_THIN_FIELDS = ("name", "sizePercent", "overprovisionRatio")


def parse_topology(text: str) -> Topology:
    """Parse the ``volumegroup`` data of the ConfigMap; ConfigInvalid lists every problem."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigInvalid([f"invalid YAML: {_yaml_problem(exc)}"]) from None
    if isinstance(doc, dict):
        extra = sorted(str(k) for k in doc if k != "volumegroup")
        if extra or "volumegroup" not in doc:
            raise ConfigInvalid(
                [
                    "expected a list of volume groups, bare or under a 'volumegroup:' key; "
                    f"found a mapping with key(s) {', '.join(sorted(str(k) for k in doc))}"
                ]
            )
        doc = doc["volumegroup"]
    if doc is None:
        doc = []
    if not isinstance(doc, list):
        raise ConfigInvalid(
            [
                "expected a list of volume groups, bare or under a 'volumegroup:' key; "
                f"found {_kind(doc)}"
            ]
        )
    problems: list[str] = []
    specs: list[VolumeGroupSpec] = []
    first_index: dict[str, int] = {}
    for index, entry in enumerate(doc):
        spec = _parse_entry(index, entry, problems)
        if spec is None:
            continue
        if spec.name in first_index:
            problems.append(
                f"volumegroup[{index}] ({spec.name}): duplicate volume group name {spec.name!r} "
                f"(already defined by volumegroup[{first_index[spec.name]}])"
            )
            continue
        first_index[spec.name] = index
        specs.append(spec)
    if problems:
        raise ConfigInvalid(problems)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
    return Topology(volume_groups=tuple(specs), digest=digest)


def _parse_entry(index: int, entry: Any, problems: list[str]) -> VolumeGroupSpec | None:
    where = f"volumegroup[{index}]"
    if not isinstance(entry, dict):
        problems.append(f"{where}: expected a mapping with name, key, operator, topology; "
                        f"found {_kind(entry)}")
        return None
    name = entry.get("name")
    if isinstance(name, str) and name:
        where = f"volumegroup[{index}] ({name})"
    before = len(problems)
    for unknown in sorted(str(k) for k in entry if k not in _ENTRY_FIELDS):
        problems.append(f"{where}: unknown field {unknown!r} (known: {', '.join(_ENTRY_FIELDS)})")
    for required in ("name", "key", "operator", "topology"):
        if entry.get(required) in (None, ""):
            problems.append(f"{where}: missing required field {required!r}")
    if len(problems) > before:
        return None

    if not isinstance(name, str) or not _LVM_NAME.match(name) or name in (".", ".."):
        problems.append(
            f"{where}: invalid volume group name {name!r} (LVM allows letters, digits and "
            "+_.- , not starting with '-', at most 127 characters)"
        )
    key = entry["key"]
    if not isinstance(key, str) or not _LABEL_KEY.match(key):
        problems.append(f"{where}: invalid label key {key!r}")

    operator: Operator | None = None
    raw_op = entry["operator"]
    try:
        operator = Operator(raw_op)
    except ValueError:
        problems.append(
            f"{where}: unknown operator {raw_op!r} (expected one of "
            f"{', '.join(op.value for op in Operator)})"
        )
    raw_value = entry.get("value")
    value = _label_value(raw_value)
    if raw_value is not None and value is None:
        problems.append(f"{where}: 'value' must be a string, found {_kind(raw_value)}")
    elif operator in (Operator.IN, Operator.NOT_IN) and value is None:
        problems.append(f"{where}: operator {operator} needs a 'value'")
    elif operator in (Operator.EXISTS, Operator.DOES_NOT_EXIST) and raw_value is not None:
        problems.append(f"{where}: operator {operator} takes no 'value' (found {raw_value!r})")

    topo = _parse_topology_block(where, entry["topology"], problems)
    thin = _parse_thin_pool(where, entry.get("thinPool"), problems)
    if len(problems) > before or operator is None or topo is None:
        return None
    ttype, devices, patterns = topo
    return VolumeGroupSpec(
        name=str(name),
        key=key,
        operator=operator,
        value=value,
        type=ttype,
        devices=devices,
        patterns=patterns,
        thin_pool=thin,
    )


def _label_value(raw: Any) -> str | None:
    """Label values are strings; an unquoted YAML true/false/number is read as its text."""
    if isinstance(raw, bool):
        return "true" if raw else "false"
    if isinstance(raw, int | float):
        return str(raw)
    if isinstance(raw, str):
        return raw
    return None


def _parse_topology_block(
    where: str, block: Any, problems: list[str]
) -> tuple[TopologyType, tuple[str, ...], tuple[str, ...]] | None:
    if not isinstance(block, dict):
        problems.append(f"{where}: 'topology' must be a mapping with 'type' and 'devices'")
        return None
    before = len(problems)
    for unknown in sorted(str(k) for k in block if k not in _TOPOLOGY_FIELDS):
        problems.append(
            f"{where}: unknown field 'topology.{unknown}' (known: {', '.join(_TOPOLOGY_FIELDS)})"
        )
    raw_type = block.get("type")
    if raw_type in (None, ""):
        problems.append(f"{where}: missing required field 'topology.type'")
        return None
    try:
        ttype = TopologyType(raw_type)
    except ValueError:
        problems.append(
            f"{where}: unknown topology type {raw_type!r} (expected one of "
            f"{', '.join(t.value for t in TopologyType)})"
        )
        return None
    list_key = "devices" if ttype is TopologyType.DEVICE else "patterns"
    other_key = "patterns" if ttype is TopologyType.DEVICE else "devices"
    if other_key in block:
        problems.append(f"{where}: 'topology.{other_key}' does not apply to type {ttype}; "
                        f"use 'topology.{list_key}'")
    items = block.get(list_key)
    if items in (None, []):
        problems.append(f"{where}: missing required field 'topology.{list_key}' "
                        f"(a non-empty list)")
        return None
    if not isinstance(items, list):
        problems.append(f"{where}: 'topology.{list_key}' must be a list, found {_kind(items)}")
        return None
    values: list[str] = []
    for i, item in enumerate(items):
        if not isinstance(item, str) or not item.strip():
            problems.append(f"{where}: topology.{list_key}[{i}] must be a non-empty string, "
                            f"found {_kind(item)}")
            continue
        item = item.strip()
        if ttype is TopologyType.DEVICE and not item.startswith("/dev/"):
            problems.append(
                f"{where}: topology.devices[{i}] {item!r} is not a device path under /dev/"
            )
            continue
        if ttype is TopologyType.PATTERN and "/" in item and not item.startswith("/dev/"):
            problems.append(
                f"{where}: topology.patterns[{i}] {item!r} must be a kernel name glob "
                "(e.g. 'sd[b-z]') or a glob under /dev/ (e.g. '/dev/disk/by-id/nvme-*')"
            )
            continue
        values.append(item)
    if len(problems) > before:
        return None
    if ttype is TopologyType.DEVICE:
        return ttype, tuple(values), ()
    return ttype, (), tuple(values)


def _parse_thin_pool(where: str, block: Any, problems: list[str]) -> ThinPoolSpec | None:
    if block is None:
        return None
    if not isinstance(block, dict):
        problems.append(f"{where}: 'thinPool' must be a mapping with name, sizePercent, "
                        "overprovisionRatio")
        return None
    before = len(problems)
    for unknown in sorted(str(k) for k in block if k not in _THIN_FIELDS):
        problems.append(
            f"{where}: unknown field 'thinPool.{unknown}' (known: {', '.join(_THIN_FIELDS)})"
        )
    name = block.get("name")
    if name in (None, ""):
        problems.append(f"{where}: missing required field 'thinPool.name'")
    elif not isinstance(name, str) or not _LVM_NAME.match(name) or name in (".", ".."):
        problems.append(f"{where}: invalid thin pool name {name!r}")
    percent = block.get("sizePercent", 90)
    if isinstance(percent, bool) or not isinstance(percent, int) or not 1 <= percent <= 95:
        problems.append(
            f"{where}: 'thinPool.sizePercent' must be an integer from 1 to 95 "
            f"(room is kept for the pool's metadata), found {percent!r}"
        )
    ratio = block.get("overprovisionRatio", 1.0)
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not ratio >= 1.0:
        problems.append(
            f"{where}: 'thinPool.overprovisionRatio' must be a number >= 1, found {ratio!r}"
        )
    if len(problems) > before:
        return None
    return ThinPoolSpec(name=str(name), size_percent=int(percent),
                        overprovision_ratio=float(ratio))


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return f"the string {value!r}"
    return f"{type(value).__name__} {value!r}"


def _yaml_problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    if mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return str(problem)
