"""A small fake Kubernetes API server for tests.

Real HTTP on 127.0.0.1 (a random free port), spoken to by the official ``kubernetes`` Python
client unchanged.  It keeps objects in memory and mimics the parts of kube-apiserver's
behaviour that our services rely on:

* resources: core/v1 ConfigMaps, Nodes (+ ``/status``), Events, PersistentVolumes (+ ``/status``),
  PersistentVolumeClaims; events.k8s.io/v1 Events (a view of the same objects as core/v1 Events,
  as in the real server); storage.k8s.io/v1 CSIStorageCapacities and StorageClasses;
* verbs: get, list, watch, create, update (PUT), patch (strategic merge, JSON merge, JSON patch),
  delete, deletecollection; ``dryRun=All``;
* one global ``resourceVersion`` counter; 404/409/410/422 as ``Status`` objects; 409 on create of
  an existing name and on update/patch/delete with a stale ``resourceVersion``; no-op updates do
  not bump the resourceVersion (and emit no watch event);
* label selectors (``=``, ``==``, ``!=``, ``in``, ``notin``, ``key``, ``!key``, ``>``, ``<``) and
  field selectors (``path=value``, ``path!=value`` on any dotted field path);
* watch (``?watch=true``): newline-delimited JSON events over a chunked response, from a
  ``resourceVersion`` (events after it), or -- without one / with ``"0"`` -- synthetic ADDED
  events for the current state first; selector transitions become ADDED/DELETED like the real
  watch cache; ``timeoutSeconds``; BOOKMARK events when ``allowWatchBookmarks=true``; an ERROR
  event carrying a 410 ``Expired`` Status when the resourceVersion is older than the retained
  history (``compact()`` / ``history_limit``), as the real server does;
* list at ``resourceVersion=N&resourceVersionMatch=Exact`` (HTTP 410 when compacted away).

Not modelled: authentication/authorization, namespaces as objects (every namespace exists),
finalizers and graceful deletion, server-side apply, pagination (``limit`` is ignored), admission.

Validation that catches real bugs: names (DNS subdomain), label keys/values, annotation keys,
string-only label/annotation values (a non-string is a 400 like a Go decode error), ConfigMap keys,
and the real server's Event rules (an Event about a Node lives in ``default`` -- or, for
events.k8s.io/v1-style events, ``default``/``kube-system``; events.k8s.io/v1 needs
``reportingController``, ``reportingInstance``, ``action``, ``reason``, ``type`` Normal/Warning).

Tests drive it in-process through ``FakeKubeServer`` (set state, read events, count requests,
inject faults and latency); the ``fake_kube`` pytest fixture starts and stops one per test::

    def test_agent(fake_kube, tmp_path):
        fake_kube.put_node("n1", labels={"alibabacloud.com/edge-enable-localstorage": "true"})
        fake_kube.set_configmap("kube-system", "node-resource-topo", {"volumegroup": "..."})
        kubeconfig = fake_kube.write_kubeconfig(tmp_path / "kubeconfig")
        ...  # run the agent with --kubeconfig kubeconfig, or use fake_kube.api_client()
        fake_kube.wait_for_watch("nodes")
        assert fake_kube.events(reason="VolumeGroupCreated", involved_name="n1")
        assert fake_kube.count("list", "configmaps") == 1
"""

from __future__ import annotations

import bisect
import builtins
import copy
import json
import random
import re
import select
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, cast
from urllib.parse import parse_qs, urlsplit

import pytest

Obj = dict[str, Any]

__all__ = [
    "ApiError",
    "FakeKubeServer",
    "LabelSelector",
    "FieldSelector",
    "RequestRecord",
    "ResourceType",
    "RESOURCES",
    "fake_kube",
]

# --------------------------------------------------------------------------------------------
# Resource table
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResourceType:
    """One served resource (group/version/plural) and where its objects are stored."""

    group: str  # "" for the core group
    version: str
    plural: str
    kind: str
    namespaced: bool
    has_status: bool = False
    storage: str = ""  # objects shared between views (events) use the same storage name
    short_names: tuple[str, ...] = ()
    returns_deleted_object: bool = False  # DELETE answers with the object, not a Status

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def store_key(self) -> str:
        return self.storage or self.plural

    @property
    def singular(self) -> str:
        return self.kind.lower()


RESOURCES: tuple[ResourceType, ...] = (
    ResourceType("", "v1", "configmaps", "ConfigMap", True, short_names=("cm",)),
    ResourceType("", "v1", "nodes", "Node", False, has_status=True, short_names=("no",)),
    ResourceType("", "v1", "events", "Event", True, storage="events", short_names=("ev",)),
    ResourceType(
        "",
        "v1",
        "persistentvolumes",
        "PersistentVolume",
        False,
        has_status=True,
        short_names=("pv",),
        returns_deleted_object=True,
    ),
    ResourceType(
        "",
        "v1",
        "persistentvolumeclaims",
        "PersistentVolumeClaim",
        True,
        has_status=True,
        short_names=("pvc",),
        returns_deleted_object=True,
    ),
    ResourceType(
        "events.k8s.io", "v1", "events", "Event", True, storage="events", short_names=("ev",)
    ),
    ResourceType("storage.k8s.io", "v1", "csistoragecapacities", "CSIStorageCapacity", True),
    ResourceType(
        "storage.k8s.io",
        "v1",
        "storageclasses",
        "StorageClass",
        False,
        short_names=("sc",),
        returns_deleted_object=True,
    ),
)

_BY_GV_PLURAL: dict[tuple[str, str, str], ResourceType] = {
    (r.group, r.version, r.plural): r for r in RESOURCES
}

# The resource type whose object layout is the stored one, per storage key.
_STORAGE_PRIMARY: dict[str, ResourceType] = {}
for _rt in RESOURCES:
    _STORAGE_PRIMARY.setdefault(_rt.store_key, _rt)

_SERVER_VERSION: Obj = {
    "major": "1",
    "minor": "30",
    "gitVersion": "v1.30.0-fake",
    "gitCommit": "0000000000000000000000000000000000000000",
    "gitTreeState": "clean",
    "buildDate": "2024-01-01T00:00:00Z",
    "goVersion": "go1.22.0",
    "compiler": "gc",
    "platform": "linux/amd64",
}

# --------------------------------------------------------------------------------------------
# Errors as Status objects
# --------------------------------------------------------------------------------------------

_REASONS: dict[int, str] = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    410: "Expired",
    415: "UnsupportedMediaType",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}


class ApiError(Exception):
    """An API failure, rendered as a ``Status`` object with the given HTTP code."""

    def __init__(
        self,
        code: int,
        message: str,
        *,
        reason: str | None = None,
        details: Obj | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason or _REASONS.get(code, "Unknown")
        self.details = details

    def status(self) -> Obj:
        out: Obj = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details is not None:
            out["details"] = self.details
        return out


def _details(rt: ResourceType, name: str, **extra: Any) -> Obj:
    out: Obj = {"name": name, "kind": rt.plural}
    if rt.group:
        out["group"] = rt.group
    out.update(extra)
    return out


def _not_found(rt: ResourceType, name: str) -> ApiError:
    return ApiError(404, f'{_qualified(rt)} "{name}" not found', details=_details(rt, name))


def _already_exists(rt: ResourceType, name: str) -> ApiError:
    return ApiError(
        409,
        f'{_qualified(rt)} "{name}" already exists',
        reason="AlreadyExists",
        details=_details(rt, name),
    )


def _conflict(rt: ResourceType, name: str, why: str) -> ApiError:
    return ApiError(
        409,
        f'Operation cannot be fulfilled on {_qualified(rt)} "{name}": {why}',
        reason="Conflict",
        details=_details(rt, name),
    )


def _invalid(rt: ResourceType, name: str, causes: list[tuple[str, str]]) -> ApiError:
    text = "; ".join(f"{path}: {msg}" for path, msg in causes)
    return ApiError(
        422,
        f'{rt.kind} "{name}" is invalid: {text}',
        reason="Invalid",
        details=_details(
            rt,
            name,
            causes=[
                {"reason": "FieldValueInvalid", "message": msg, "field": path}
                for path, msg in causes
            ],
        ),
    )


def _expired(requested: int, oldest: int) -> ApiError:
    return ApiError(410, f"too old resource version: {requested} ({oldest})", reason="Expired")


def _qualified(rt: ResourceType) -> str:
    return f"{rt.plural}.{rt.group}" if rt.group else rt.plural


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------

_DNS1123_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS1123_SUBDOMAIN_RE = re.compile(rf"{_DNS1123_LABEL}(\.{_DNS1123_LABEL})*")
_QUALIFIED_NAME_RE = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_LABEL_VALUE_RE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
_CONFIGMAP_KEY_RE = re.compile(r"[-._a-zA-Z0-9]+")
_ANNOTATIONS_MAX_BYTES = 256 * 1024
_CONFIGMAP_MAX_BYTES = 1024 * 1024


def _dns_subdomain_problem(value: str) -> str | None:
    if len(value) > 253:
        return "must be no more than 253 characters"
    if not _DNS1123_SUBDOMAIN_RE.fullmatch(value):
        return (
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, "
            "'-' or '.', and must start and end with an alphanumeric character"
        )
    return None


def _qualified_name_problem(key: str) -> str | None:
    prefix, sep, name = key.rpartition("/")
    if sep:
        if not prefix:
            return "prefix part must be non-empty"
        problem = _dns_subdomain_problem(prefix)
        if problem:
            return f"prefix part {problem}"
    if not name:
        return "name part must be non-empty"
    if len(name) > 63:
        return "name part must be no more than 63 characters"
    if not _QUALIFIED_NAME_RE.fullmatch(name):
        return (
            "name part must consist of alphanumeric characters, '-', '_' or '.', and must start "
            "and end with an alphanumeric character"
        )
    return None


def _label_value_problem(value: str) -> str | None:
    if len(value) > 63:
        return "must be no more than 63 characters"
    if not _LABEL_VALUE_RE.fullmatch(value):
        return (
            "a valid label must be an empty string or consist of alphanumeric characters, '-', "
            "'_' or '.', and must start and end with an alphanumeric character"
        )
    return None


def _check_decodable(obj: Obj) -> None:
    """Type errors a Go decoder would reject with 400 (strings where strings are required)."""
    meta = obj.get("metadata")
    if meta is not None and not isinstance(meta, dict):
        raise ApiError(400, "metadata: expected an object")
    meta = meta or {}
    for attr in ("labels", "annotations"):
        value = meta.get(attr)
        if value is None:
            continue
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise ApiError(
                400,
                f"json: cannot unmarshal into Go struct field ObjectMeta.metadata.{attr} of type "
                "map[string]string",
            )
    for attr in ("name", "namespace", "generateName", "resourceVersion", "uid"):
        if attr in meta and meta[attr] is not None and not isinstance(meta[attr], str):
            raise ApiError(400, f"json: cannot unmarshal metadata.{attr} into a string")


def _validate(rt: ResourceType, obj: Obj, *, request_group: str, creating: bool) -> None:
    meta: Obj = obj.get("metadata") or {}
    name = str(meta.get("name") or "")
    causes: list[tuple[str, str]] = []
    problem = _dns_subdomain_problem(name)
    if problem:
        causes.append(("metadata.name", f'Invalid value: "{name}": {problem}'))
    labels: dict[str, str] = meta.get("labels") or {}
    for key, value in labels.items():
        problem = _qualified_name_problem(key)
        if problem:
            causes.append(("metadata.labels", f'Invalid value: "{key}": {problem}'))
        problem = _label_value_problem(value)
        if problem:
            causes.append(("metadata.labels", f'Invalid value: "{value}": {problem}'))
    annotations: dict[str, str] = meta.get("annotations") or {}
    total = 0
    for key, value in annotations.items():
        problem = _qualified_name_problem(key.lower())
        if problem:
            causes.append(("metadata.annotations", f'Invalid value: "{key}": {problem}'))
        total += len(key) + len(value)
    if total > _ANNOTATIONS_MAX_BYTES:
        causes.append(
            ("metadata.annotations", f"Too long: must have at most {_ANNOTATIONS_MAX_BYTES} bytes")
        )
    if rt.store_key == "configmaps":
        causes.extend(_configmap_problems(obj))
    if rt.store_key == "events":
        causes.extend(_event_problems(obj, request_group=request_group, creating=creating))
    if causes:
        raise _invalid(rt, name, causes)


def _configmap_problems(obj: Obj) -> list[tuple[str, str]]:
    causes: list[tuple[str, str]] = []
    total = 0
    for attr in ("data", "binaryData"):
        section = obj.get(attr) or {}
        if not isinstance(section, dict):
            causes.append((attr, "Invalid value: must be a map of strings"))
            continue
        for key, value in section.items():
            if not _CONFIGMAP_KEY_RE.fullmatch(key) or len(key) > 253:
                causes.append(
                    (
                        f"{attr}[{key}]",
                        f'Invalid value: "{key}": a valid config key must consist of '
                        "alphanumeric characters, '-', '_' or '.'",
                    )
                )
            if not isinstance(value, str):
                causes.append((f"{attr}[{key}]", "Invalid value: must be a string"))
            else:
                total += len(value)
    if total > _CONFIGMAP_MAX_BYTES:
        causes.append(("[]", f"Too long: must have at most {_CONFIGMAP_MAX_BYTES} bytes"))
    return causes


def _event_problems(obj: Obj, *, request_group: str, creating: bool) -> list[tuple[str, str]]:
    """The real server's event validation (namespace agreement; strict for events.k8s.io)."""
    causes: list[tuple[str, str]] = []
    namespace = str((obj.get("metadata") or {}).get("namespace") or "")
    involved: Obj = obj.get("involvedObject") or {}
    involved_ns = str(involved.get("namespace") or "")
    core = request_group == ""
    controller_field = "reportingComponent" if core else "reportingController"
    if not obj.get("eventTime"):
        if not involved_ns:
            if namespace not in ("", "default"):
                causes.append(("involvedObject.namespace", "does not match event.namespace"))
        elif namespace != involved_ns:
            causes.append(("involvedObject.namespace", "does not match event.namespace"))
    else:
        if not involved_ns and namespace not in ("default", "kube-system"):
            causes.append(("involvedObject.namespace", "does not match event.namespace"))
        controller = str(obj.get("reportingComponent") or "")
        if not controller:
            causes.append((controller_field, "Required value"))
        elif _qualified_name_problem(controller):
            causes.append((controller_field, f'Invalid value: "{controller}"'))
        instance = str(obj.get("reportingInstance") or "")
        if not instance:
            causes.append(("reportingInstance", "Required value"))
        elif len(instance) > 128:
            causes.append(("reportingInstance", "can have at most 128 characters"))
        action = str(obj.get("action") or "")
        if not action:
            causes.append(("action", "Required value"))
        elif len(action) > 128:
            causes.append(("action", "can have at most 128 characters"))
        reason = str(obj.get("reason") or "")
        if not reason:
            causes.append(("reason", "Required value"))
        elif len(reason) > 128:
            causes.append(("reason", "can have at most 128 characters"))
        if len(str(obj.get("message") or "")) > 1024:
            causes.append(("message", "can have at most 1024 characters"))
    if core or not creating:
        return causes
    # Strict rules for events created through events.k8s.io/v1.
    if not obj.get("eventTime"):
        causes.append(("eventTime", "Required value"))
    if obj.get("type") not in ("Normal", "Warning"):
        causes.append(("type", f"Invalid value: has invalid value: {obj.get('type')}"))
    for core_name, view_name in (
        ("firstTimestamp", "deprecatedFirstTimestamp"),
        ("lastTimestamp", "deprecatedLastTimestamp"),
        ("count", "deprecatedCount"),
    ):
        if obj.get(core_name):
            causes.append((view_name, "needs to be unset"))
    source: Obj = obj.get("source") or {}
    if source.get("component") or source.get("host"):
        causes.append(("deprecatedSource", "needs to be unset"))
    return causes


# --------------------------------------------------------------------------------------------
# events.k8s.io/v1 <-> core/v1 Event views
# --------------------------------------------------------------------------------------------

# events.k8s.io/v1 field name -> core/v1 field name
_EVENTS_V1_TO_CORE: dict[str, str] = {
    "regarding": "involvedObject",
    "note": "message",
    "reportingController": "reportingComponent",
    "deprecatedSource": "source",
    "deprecatedFirstTimestamp": "firstTimestamp",
    "deprecatedLastTimestamp": "lastTimestamp",
    "deprecatedCount": "count",
}
_CORE_TO_EVENTS_V1 = {core: view for view, core in _EVENTS_V1_TO_CORE.items()}


def _rename(obj: Obj, mapping: dict[str, str]) -> Obj:
    return {mapping.get(key, key): value for key, value in obj.items()}


def _to_view(rt: ResourceType, stored: Obj) -> Obj:
    """The stored object as the resource type ``rt`` presents it (deep copy)."""
    out = copy.deepcopy(stored)
    if rt.store_key == "events" and rt.group == "events.k8s.io":
        out = _rename(out, _CORE_TO_EVENTS_V1)
    out["kind"] = rt.kind
    out["apiVersion"] = rt.api_version
    return out


def _from_view(rt: ResourceType, obj: Obj) -> Obj:
    """An object in ``rt``'s layout converted to the stored layout (deep copy)."""
    out = copy.deepcopy(obj)
    primary = _STORAGE_PRIMARY[rt.store_key]
    if rt.store_key == "events" and rt.group == "events.k8s.io":
        out = _rename(out, _EVENTS_V1_TO_CORE)
    out["kind"] = primary.kind
    out["apiVersion"] = primary.api_version
    return out


# --------------------------------------------------------------------------------------------
# Selectors
# --------------------------------------------------------------------------------------------

_SEL_KEY = r"[A-Za-z0-9][-A-Za-z0-9_./]*"
_SEL_VALUE = r"[-A-Za-z0-9_.]*"
_SEL_NOT_EXISTS_RE = re.compile(rf"\s*!\s*({_SEL_KEY})\s*")
_SEL_SET_RE = re.compile(rf"\s*({_SEL_KEY})\s+(in|notin)\s*\((.*)\)\s*")
_SEL_CMP_RE = re.compile(rf"\s*({_SEL_KEY})\s*(==|!=|=|>|<)\s*({_SEL_VALUE})\s*")
_SEL_EXISTS_RE = re.compile(rf"\s*({_SEL_KEY})\s*")


@dataclass(frozen=True)
class _Requirement:
    key: str
    op: str  # "=", "!=", "in", "notin", "exists", "!", ">", "<"
    values: tuple[str, ...] = ()

    def matches(self, labels: dict[str, str]) -> bool:
        present = self.key in labels
        value = labels.get(self.key, "")
        if self.op == "exists":
            return present
        if self.op == "!":
            return not present
        if self.op in ("=", "in"):
            return present and value in self.values
        if self.op in ("!=", "notin"):
            return not present or value not in self.values
        if not present:
            return False
        try:
            number = int(value)
        except ValueError:
            return False
        limit = int(self.values[0])
        return number > limit if self.op == ">" else number < limit


def _split_top_level(text: str) -> list[str]:
    parts: list[str] = []
    depth = 0
    current: list[str] = []
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


@dataclass(frozen=True)
class LabelSelector:
    """A parsed label selector string (the syntax kube-apiserver accepts)."""

    requirements: tuple[_Requirement, ...] = ()

    @classmethod
    def parse(cls, text: str | None) -> LabelSelector:
        if text is None or not text.strip():
            return cls()
        requirements: list[_Requirement] = []
        for part in _split_top_level(text):
            requirements.append(_parse_requirement(part, text))
        return cls(tuple(requirements))

    def matches(self, labels: dict[str, str] | None) -> bool:
        labels = labels or {}
        return all(req.matches(labels) for req in self.requirements)


def _parse_requirement(part: str, whole: str) -> _Requirement:
    def bad(why: str) -> ApiError:
        return ApiError(400, f'unable to parse requirement: {why} (selector "{whole}")')

    def checked_key(key: str) -> str:
        problem = _qualified_name_problem(key)
        if problem:
            raise bad(f'invalid label key "{key}": {problem}')
        return key

    def checked_value(value: str) -> str:
        problem = _label_value_problem(value)
        if problem:
            raise bad(f'invalid label value "{value}": {problem}')
        return value

    if m := _SEL_NOT_EXISTS_RE.fullmatch(part):
        return _Requirement(checked_key(m.group(1)), "!")
    if m := _SEL_SET_RE.fullmatch(part):
        values = tuple(checked_value(v.strip()) for v in m.group(3).split(","))
        if values == ("",):
            raise bad(f"for '{m.group(2)}' operator, the values set can't be empty")
        return _Requirement(checked_key(m.group(1)), m.group(2), values)
    if m := _SEL_CMP_RE.fullmatch(part):
        op = "=" if m.group(2) == "==" else m.group(2)
        value = m.group(3)
        if op in (">", "<"):
            try:
                int(value)
            except ValueError:
                raise bad(f"for '{op}' operator, the value must be an integer") from None
        return _Requirement(checked_key(m.group(1)), op, (checked_value(value),))
    if m := _SEL_EXISTS_RE.fullmatch(part):
        return _Requirement(checked_key(m.group(1)), "exists")
    raise bad(f'"{part.strip()}"')


@dataclass(frozen=True)
class FieldSelector:
    """A parsed field selector: ``path=value``/``path==value``/``path!=value`` terms (AND)."""

    terms: tuple[tuple[str, bool, str], ...] = ()  # (dotted path, equal?, value)

    @classmethod
    def parse(cls, text: str | None) -> FieldSelector:
        if text is None or not text.strip():
            return cls()
        terms: list[tuple[str, bool, str]] = []
        for part in text.split(","):
            m = re.fullmatch(r"\s*([A-Za-z0-9_.]+)\s*(==|!=|=)\s*(.*?)\s*", part)
            if not m:
                raise ApiError(400, f'invalid field selector: "{part}"')
            terms.append((m.group(1), m.group(2) != "!=", m.group(3)))
        return cls(tuple(terms))

    def matches(self, obj: Obj) -> bool:
        for path, equal, value in self.terms:
            if (_field_value(obj, path) == value) != equal:
                return False
        return True


def _field_value(obj: Obj, path: str) -> str:
    node: Any = obj
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return ""
        node = node[part]
    if isinstance(node, bool):
        return "true" if node else "false"
    return "" if node is None else str(node)


# --------------------------------------------------------------------------------------------
# Patches
# --------------------------------------------------------------------------------------------


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result: Obj = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


# Lists that strategic merge patch merges instead of replacing: path -> merge key
# (None: a list of scalars merged as a set).  Everything else is replaced, like lists
# without a patch strategy in the real types.
_SMP_MERGE_LISTS: dict[tuple[str, ...], str | None] = {
    ("metadata", "finalizers"): None,
    ("metadata", "ownerReferences"): "uid",
    ("status", "conditions"): "type",
    ("status", "addresses"): "type",
}


def strategic_merge_patch(target: Any, patch: Any, path: tuple[str, ...] = ()) -> Any:
    """The subset of strategic merge patch our objects need.

    Maps merge recursively (``null`` deletes a key, ``$patch: delete``/``replace`` directives are
    honoured); lists are replaced except the few with a merge strategy listed in
    ``_SMP_MERGE_LISTS``, which merge by key (and honour ``$patch: delete`` items and
    ``$deleteFromPrimitiveList/<field>``).  Other ``$`` directives are ignored.
    """
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    directive = patch.get("$patch")
    if directive == "delete":
        return None
    if directive == "replace":
        return {k: copy.deepcopy(v) for k, v in patch.items() if not k.startswith("$")}
    result: Obj = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if key.startswith("$deleteFromPrimitiveList/"):
            field_name = key.split("/", 1)[1]
            if isinstance(result.get(field_name), list) and isinstance(value, list):
                result[field_name] = [v for v in result[field_name] if v not in value]
            continue
        if key.startswith("$"):
            continue
        sub_path = (*path, key)
        if value is None:
            result.pop(key, None)
        elif isinstance(value, list) and sub_path in _SMP_MERGE_LISTS:
            result[key] = _smp_merge_list(
                result.get(key), value, _SMP_MERGE_LISTS[sub_path], sub_path
            )
        elif isinstance(value, dict):
            merged = strategic_merge_patch(result.get(key), value, sub_path)
            if merged is None:
                result.pop(key, None)
            else:
                result[key] = merged
        else:
            result[key] = copy.deepcopy(value)
    return result


def _smp_merge_list(
    current: Any, patch: list[Any], merge_key: str | None, path: tuple[str, ...]
) -> list[Any]:
    items: list[Any] = copy.deepcopy(current) if isinstance(current, list) else []
    if merge_key is None:
        for value in patch:
            if value not in items:
                items.append(copy.deepcopy(value))
        return items
    for element in patch:
        if not isinstance(element, dict) or merge_key not in element:
            raise ApiError(422, f"{'.'.join(path)}: items must carry the merge key {merge_key}")
        index = next(
            (
                i
                for i, item in enumerate(items)
                if isinstance(item, dict) and item.get(merge_key) == element[merge_key]
            ),
            None,
        )
        if element.get("$patch") == "delete":
            if index is not None:
                del items[index]
        elif index is None:
            items.append({k: copy.deepcopy(v) for k, v in element.items() if k != "$patch"})
        else:
            items[index] = strategic_merge_patch(items[index], element, path)
    return items


def _pointer(path: Any) -> list[str]:
    if not isinstance(path, str) or (path and not path.startswith("/")):
        raise ApiError(422, f"invalid JSON pointer: {path!r}")
    if path == "":
        return []
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _resolve(doc: Any, parts: list[str]) -> Any:
    node = doc
    for part in parts:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise ApiError(422, f"path /{'/'.join(parts)} does not exist")
    return node


def _ptr_add(doc: Any, parts: list[str], value: Any) -> Any:
    if not parts:
        return value
    parent = _resolve(doc, parts[:-1])
    last = parts[-1]
    if isinstance(parent, dict):
        parent[last] = value
    elif isinstance(parent, list):
        if last == "-":
            parent.append(value)
        elif last.isdigit() and int(last) <= len(parent):
            parent.insert(int(last), value)
        else:
            raise ApiError(422, f"invalid array index {last!r}")
    else:
        raise ApiError(422, f"cannot add to a scalar at /{'/'.join(parts)}")
    return doc


def _ptr_remove(doc: Any, parts: list[str]) -> Any:
    if not parts:
        raise ApiError(422, "cannot remove the whole document")
    parent = _resolve(doc, parts[:-1])
    last = parts[-1]
    _resolve(doc, parts)  # must exist
    if isinstance(parent, dict):
        return parent.pop(last)
    return cast(list[Any], parent).pop(int(last))


def json_patch(doc: Any, operations: Any) -> Any:
    """RFC 6902 JSON patch (add, remove, replace, move, copy, test)."""
    if not isinstance(operations, list):
        raise ApiError(400, "a JSON patch must be a list of operations")
    doc = copy.deepcopy(doc)
    for op in operations:
        if not isinstance(op, dict):
            raise ApiError(400, f"invalid JSON patch operation: {op!r}")
        kind = op.get("op")
        parts = _pointer(op.get("path"))
        if kind == "add":
            doc = _ptr_add(doc, parts, copy.deepcopy(op.get("value")))
        elif kind == "remove":
            _ptr_remove(doc, parts)
        elif kind == "replace":
            _resolve(doc, parts)
            if parts:
                _ptr_remove(doc, parts)
            doc = _ptr_add(doc, parts, copy.deepcopy(op.get("value")))
        elif kind in ("move", "copy"):
            source = _pointer(op.get("from"))
            value = copy.deepcopy(_resolve(doc, source))
            if kind == "move":
                _ptr_remove(doc, source)
            doc = _ptr_add(doc, parts, value)
        elif kind == "test":
            if _resolve(doc, parts) != op.get("value"):
                raise ApiError(422, f"testing value /{'/'.join(parts)} failed")
        else:
            raise ApiError(400, f"unknown JSON patch operation {kind!r}")
    return doc


# --------------------------------------------------------------------------------------------
# The store: objects, the global resourceVersion and the change history
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Change:
    rv: int
    type: str  # ADDED, MODIFIED, DELETED
    store_key: str
    namespace: str
    name: str
    obj: Obj  # state after the change (for DELETED: the last state, at the deletion's rv)
    prev: Obj | None


@dataclass
class _Watcher:
    resource: ResourceType
    namespace: str
    closed: bool = False
    bookmark_pending: bool = False


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _strip_volatile(obj: Obj) -> Obj:
    out = copy.deepcopy(obj)
    meta = out.get("metadata") or {}
    meta.pop("resourceVersion", None)
    meta.pop("managedFields", None)
    return out


_GENERATE_CHARS = "bcdfghjklmnpqrstvwxz2456789"


class _Store:
    def __init__(self, history_limit: int | None) -> None:
        self.cond = threading.Condition(threading.RLock())
        self.objects: dict[tuple[str, str, str], Obj] = {}
        self.history: list[_Change] = []
        self.rv = 0
        # A watch from rv N is served iff N >= floor (every change after N is still retained).
        self.floor = 0
        self.history_limit = history_limit
        self.watchers: list[_Watcher] = []
        self.stopping = False

    # -- helpers ------------------------------------------------------------------------------

    def _key(self, rt: ResourceType, namespace: str, name: str) -> tuple[str, str, str]:
        return (rt.store_key, namespace if rt.namespaced else "", name)

    def _record(self, change: _Change) -> None:
        self.history.append(change)
        if self.history_limit is not None and len(self.history) > self.history_limit:
            self.compact(keep=self.history_limit)
        self.cond.notify_all()

    def compact(self, keep: int = 0) -> None:
        with self.cond:
            if keep <= 0:
                dropped = len(self.history)
            else:
                dropped = max(0, len(self.history) - keep)
            if dropped:
                self.floor = max(self.floor, self.history[dropped - 1].rv)
                del self.history[:dropped]
            if keep <= 0:
                self.floor = self.rv
            self.cond.notify_all()

    def _next_rv(self) -> int:
        self.rv += 1
        return self.rv

    # -- reads --------------------------------------------------------------------------------

    def get(self, rt: ResourceType, namespace: str, name: str) -> Obj:
        with self.cond:
            stored = self.objects.get(self._key(rt, namespace, name))
            if stored is None:
                raise _not_found(rt, name)
            return _to_view(rt, stored)

    def list_objects(
        self,
        rt: ResourceType,
        namespace: str,
        labels: LabelSelector,
        fields: FieldSelector,
        *,
        at_rv: int | None = None,
    ) -> tuple[list[Obj], int]:
        with self.cond:
            if at_rv is None or at_rv == self.rv:
                snapshot = self.objects
                rv = self.rv
            else:
                if at_rv < self.floor:
                    raise _expired(at_rv, self.floor)
                snapshot = self._state_at(at_rv)
                rv = at_rv
            items: list[Obj] = []
            for key in sorted(snapshot):
                store_key, obj_ns, _ = key
                if store_key != rt.store_key or (namespace and obj_ns != namespace):
                    continue
                view = _to_view(rt, snapshot[key])
                if _matches(view, labels, fields):
                    items.append(view)
            return items, rv

    def _state_at(self, rv: int) -> dict[tuple[str, str, str], Obj]:
        state = dict(self.objects)
        for change in reversed(self.history):
            if change.rv <= rv:
                break
            key = (change.store_key, change.namespace, change.name)
            if change.type == "ADDED":
                state.pop(key, None)
            elif change.prev is not None:
                state[key] = change.prev
        return state

    # -- writes -------------------------------------------------------------------------------

    def create(self, rt: ResourceType, namespace: str, body: Obj, *, dry_run: bool = False) -> Obj:
        _check_decodable(body)
        obj = _from_view(rt, body)
        meta: Obj = obj.setdefault("metadata", {})
        with self.cond:
            if rt.namespaced:
                body_ns = meta.get("namespace")
                if body_ns and body_ns != namespace:
                    raise ApiError(
                        400,
                        "the namespace of the provided object does not match the namespace "
                        "sent on the request",
                    )
                meta["namespace"] = namespace
            else:
                meta.pop("namespace", None)
            if not meta.get("name"):
                prefix = meta.get("generateName")
                if not prefix:
                    raise _invalid(
                        rt,
                        "",
                        [("metadata.name", "Required value: name or generateName is required")],
                    )
                meta["name"] = prefix + "".join(random.choices(_GENERATE_CHARS, k=5))
            name = str(meta["name"])
            if meta.get("resourceVersion"):
                raise ApiError(500, "resourceVersion should not be set on objects to be created")
            _validate(rt, obj, request_group=rt.group, creating=True)
            key = self._key(rt, namespace, name)
            if key in self.objects:
                raise _already_exists(rt, name)
            meta["uid"] = str(uuid.uuid4())
            meta["creationTimestamp"] = _now()
            for transient in ("deletionTimestamp", "deletionGracePeriodSeconds", "managedFields"):
                meta.pop(transient, None)
            if dry_run:
                meta["resourceVersion"] = ""
                return _to_view(rt, obj)
            rv = self._next_rv()
            meta["resourceVersion"] = str(rv)
            self.objects[key] = obj
            self._record(_Change(rv, "ADDED", rt.store_key, key[1], name, obj, None))
            return _to_view(rt, obj)

    def update(
        self,
        rt: ResourceType,
        namespace: str,
        name: str,
        body: Obj,
        *,
        subresource: str = "",
        dry_run: bool = False,
    ) -> Obj:
        _check_decodable(body)
        with self.cond:
            key = self._key(rt, namespace, name)
            old = self.objects.get(key)
            if old is None:
                raise _not_found(rt, name)
            return self._commit_update(rt, key, old, _from_view(rt, body), subresource, dry_run)

    def patch(
        self,
        rt: ResourceType,
        namespace: str,
        name: str,
        content_type: str,
        patch: Any,
        *,
        subresource: str = "",
        dry_run: bool = False,
    ) -> Obj:
        with self.cond:
            key = self._key(rt, namespace, name)
            old = self.objects.get(key)
            if old is None:
                raise _not_found(rt, name)
            view = _to_view(rt, old)
            if content_type == "application/merge-patch+json":
                if not isinstance(patch, dict):
                    raise ApiError(400, "a merge patch must be a JSON object")
                patched = merge_patch(view, patch)
            elif content_type == "application/strategic-merge-patch+json":
                if not isinstance(patch, dict):
                    raise ApiError(400, "a strategic merge patch must be a JSON object")
                patched = strategic_merge_patch(view, patch)
            elif content_type == "application/json-patch+json":
                patched = json_patch(view, patch)
            else:
                raise ApiError(
                    415,
                    "the body of the request was in an unknown format - accepted media types "
                    "include: application/json-patch+json, application/merge-patch+json, "
                    "application/strategic-merge-patch+json",
                )
            if not isinstance(patched, dict):
                raise ApiError(422, "the patched object is not a JSON object")
            _check_decodable(patched)
            return self._commit_update(rt, key, old, _from_view(rt, patched), subresource, dry_run)

    def _commit_update(
        self,
        rt: ResourceType,
        key: tuple[str, str, str],
        old: Obj,
        candidate: Obj,
        subresource: str,
        dry_run: bool,
    ) -> Obj:
        name = key[2]
        meta: Obj = candidate.setdefault("metadata", {})
        old_meta: Obj = old["metadata"]
        if meta.get("name") not in (None, "", name):
            raise ApiError(
                400,
                f"the name of the object ({meta.get('name')}) does not match the name on the "
                f"URL ({name})",
            )
        if rt.namespaced and meta.get("namespace") not in (None, "", key[1]):
            raise ApiError(
                400,
                "the namespace of the provided object does not match the namespace sent on "
                "the request",
            )
        wanted_rv = meta.get("resourceVersion")
        if wanted_rv and wanted_rv != old_meta["resourceVersion"]:
            raise _conflict(
                rt,
                name,
                "the object has been modified; please apply your changes to the latest version "
                "and try again",
            )
        meta["name"] = name
        if rt.namespaced:
            meta["namespace"] = key[1]
        else:
            meta.pop("namespace", None)
        for immutable in ("uid", "creationTimestamp"):
            meta[immutable] = old_meta[immutable]
        meta.pop("managedFields", None)
        if rt.has_status:
            if subresource == "status":
                # The status subresource changes status (and metadata), never the spec.
                if "spec" in old:
                    candidate["spec"] = copy.deepcopy(old["spec"])
                else:
                    candidate.pop("spec", None)
            elif "status" in old:
                candidate["status"] = copy.deepcopy(old["status"])
            else:
                candidate.pop("status", None)
        _validate(rt, candidate, request_group=rt.group, creating=False)
        if rt.store_key == "events" and rt.group == "events.k8s.io":
            for attr in ("involvedObject", "reason", "message", "reportingComponent", "action"):
                if candidate.get(attr) != old.get(attr):
                    view_attr = _CORE_TO_EVENTS_V1.get(attr, attr)
                    raise _invalid(rt, name, [(view_attr, "field is immutable")])
        if _strip_volatile(candidate) == _strip_volatile(old):
            return _to_view(rt, old)  # a no-op update keeps the resourceVersion
        if dry_run:
            meta["resourceVersion"] = old_meta["resourceVersion"]
            return _to_view(rt, candidate)
        rv = self._next_rv()
        meta["resourceVersion"] = str(rv)
        self.objects[key] = candidate
        self._record(_Change(rv, "MODIFIED", key[0], key[1], name, candidate, old))
        return _to_view(rt, candidate)

    def delete(
        self,
        rt: ResourceType,
        namespace: str,
        name: str,
        *,
        preconditions: Obj | None = None,
        dry_run: bool = False,
    ) -> Obj:
        with self.cond:
            key = self._key(rt, namespace, name)
            old = self.objects.get(key)
            if old is None:
                raise _not_found(rt, name)
            old_meta: Obj = old["metadata"]
            pre = preconditions or {}
            if pre.get("uid") and pre["uid"] != old_meta["uid"]:
                raise _conflict(
                    rt,
                    name,
                    f"Precondition failed: UID in precondition: {pre['uid']}, UID in object "
                    f"meta: {old_meta['uid']}",
                )
            if pre.get("resourceVersion") and pre["resourceVersion"] != old_meta["resourceVersion"]:
                raise _conflict(
                    rt,
                    name,
                    "Precondition failed: ResourceVersion in precondition: "
                    f"{pre['resourceVersion']}, ResourceVersion in object meta: "
                    f"{old_meta['resourceVersion']}",
                )
            if dry_run:
                return _to_view(rt, old)
            rv = self._next_rv()
            final = copy.deepcopy(old)
            final["metadata"]["resourceVersion"] = str(rv)
            del self.objects[key]
            self._record(_Change(rv, "DELETED", key[0], key[1], name, final, old))
            return _to_view(rt, final)

    # -- watch --------------------------------------------------------------------------------

    def changes_after(self, cursor: int) -> list[_Change]:
        index = bisect.bisect_right(self.history, cursor, key=lambda c: c.rv)
        return self.history[index:]


def _matches(view: Obj, labels: LabelSelector, fields: FieldSelector) -> bool:
    return labels.matches((view.get("metadata") or {}).get("labels")) and fields.matches(view)


# --------------------------------------------------------------------------------------------
# Request log and fault injection
# --------------------------------------------------------------------------------------------


@dataclass
class RequestRecord:
    """One HTTP request the fake served (recorded before it is processed)."""

    method: str
    path: str
    query: dict[str, str]
    verb: str  # get, list, watch, create, update, patch, delete, deletecollection
    group: str = ""
    version: str = ""
    resource: str = ""  # plural, "" for non-resource paths (/version, discovery)
    namespace: str = ""
    name: str = ""
    subresource: str = ""
    content_type: str = ""
    body: Any = None  # the decoded JSON body, if any
    status: int = 0  # the HTTP status sent (0 until the response starts)


@dataclass
class _Fault:
    remaining: int
    code: int
    message: str
    verb: str | None
    resource: str | None
    name: str | None

    def applies(self, record: RequestRecord) -> bool:
        return (
            self.remaining > 0
            and bool(record.resource)
            and (self.verb is None or self.verb == record.verb)
            and (self.resource is None or self.resource == record.resource)
            and (self.name is None or self.name == record.name)
        )


# --------------------------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Route:
    rt: ResourceType
    namespace: str
    name: str
    subresource: str


def _route(path: str) -> _Route | Obj:
    """A resource route, or the JSON body of a discovery/non-resource endpoint."""
    parts = [p for p in path.split("/") if p]
    if parts == ["version"]:
        return dict(_SERVER_VERSION)
    if parts in (["healthz"], ["readyz"], ["livez"]):
        return {"ok": True}
    if parts == ["api"]:
        return {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}
    if parts == ["apis"]:
        return _group_list()
    if len(parts) >= 2 and parts[0] == "api":
        group, version, rest = "", parts[1], parts[2:]
    elif len(parts) >= 3 and parts[0] == "apis":
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        raise ApiError(404, "the server could not find the requested resource")
    if not rest:
        resources = _resource_list(group, version)
        if resources is None:
            raise ApiError(404, "the server could not find the requested resource")
        return resources
    namespace = ""
    if rest[0] == "namespaces" and len(rest) >= 3:
        namespace, rest = rest[1], rest[2:]
    rt = _BY_GV_PLURAL.get((group, version, rest[0]))
    if rt is None or (namespace and not rt.namespaced) or len(rest) > 3:
        raise ApiError(404, "the server could not find the requested resource")
    name = rest[1] if len(rest) >= 2 else ""
    subresource = rest[2] if len(rest) == 3 else ""
    if subresource and (subresource != "status" or not rt.has_status):
        raise ApiError(404, "the server could not find the requested resource")
    if name and rt.namespaced and not namespace:
        raise ApiError(404, "the server could not find the requested resource")
    return _Route(rt, namespace, name, subresource)


def _group_list() -> Obj:
    groups: dict[str, list[str]] = {}
    for rt in RESOURCES:
        if rt.group and rt.version not in groups.setdefault(rt.group, []):
            groups[rt.group].append(rt.version)
    return {
        "kind": "APIGroupList",
        "apiVersion": "v1",
        "groups": [
            {
                "name": group,
                "versions": [{"groupVersion": f"{group}/{v}", "version": v} for v in versions],
                "preferredVersion": {
                    "groupVersion": f"{group}/{versions[0]}",
                    "version": versions[0],
                },
            }
            for group, versions in groups.items()
        ],
    }


def _resource_list(group: str, version: str) -> Obj | None:
    entries: list[Obj] = []
    verbs = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]
    for rt in RESOURCES:
        if (rt.group, rt.version) != (group, version):
            continue
        entries.append(
            {
                "name": rt.plural,
                "singularName": rt.singular,
                "namespaced": rt.namespaced,
                "kind": rt.kind,
                "verbs": verbs,
                "shortNames": list(rt.short_names),
            }
        )
        if rt.has_status:
            entries.append(
                {
                    "name": f"{rt.plural}/status",
                    "singularName": "",
                    "namespaced": rt.namespaced,
                    "kind": rt.kind,
                    "verbs": ["get", "patch", "update"],
                }
            )
    if not entries:
        return None
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": f"{group}/{version}" if group else version,
        "resources": entries,
    }


def _verb(method: str, route: _Route, query: dict[str, str]) -> str:
    if method == "GET":
        if route.name:
            return "get"
        return "watch" if query.get("watch") in ("true", "1") else "list"
    if method == "POST" and not route.name:
        return "create"
    if method == "PUT" and route.name:
        return "update"
    if method == "PATCH" and route.name:
        return "patch"
    if method == "DELETE":
        return "delete" if route.name else "deletecollection"
    raise ApiError(405, "the server does not allow this method on the requested resource")


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, fake: FakeKubeServer) -> None:
        self.fake = fake
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.connections_lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        with self.connections_lock:
            connections = list(self.connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that go away mid-response (a stopped watch) are normal; stay quiet.
        pass


class _ClientGone(Exception):
    pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HttpServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        self._handle("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._handle("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._handle("PUT")

    def do_PATCH(self) -> None:  # noqa: N802
        self._handle("PATCH")

    def do_DELETE(self) -> None:  # noqa: N802
        self._handle("DELETE")

    # -- plumbing -----------------------------------------------------------------------------

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _send_json(self, code: int, body: Obj, record: RequestRecord | None) -> None:
        data = json.dumps(body).encode()
        if record is not None:
            record.status = code
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _handle(self, method: str) -> None:
        fake = self.server.fake
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        raw = self._read_body()
        content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        record = RequestRecord(
            method=method,
            path=url.path,
            query=query,
            verb=method.lower(),
            content_type=content_type,
        )
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = None
            record.body = raw.decode(errors="replace")
            fake._log_request(record)
            self._send_json(400, ApiError(400, "invalid JSON in the request body").status(), record)
            return
        record.body = body
        try:
            target = _route(url.path)
            if isinstance(target, _Route):
                record.verb = _verb(method, target, query)
                record.group = target.rt.group
                record.version = target.rt.version
                record.resource = target.rt.plural
                record.namespace = target.namespace
                record.name = target.name
                record.subresource = target.subresource
            elif method != "GET":
                raise ApiError(405, "the server does not allow this method")
        except ApiError as err:
            fake._log_request(record)
            self._send_json(err.code, err.status(), record)
            return
        fault = fake._log_request(record)
        if fault is not None:
            self._send_json(fault.code, fault.status(), record)
            return
        if not isinstance(target, _Route):
            self._send_json(200, target, record)
            return
        try:
            if record.verb == "watch":
                self._serve_watch(target, query, record)
                return
            code, result = self._serve(target, record.verb, query, content_type, body)
        except ApiError as err:
            self._send_json(err.code, err.status(), record)
            return
        self._send_json(code, result, record)

    def _serve(
        self, route: _Route, verb: str, query: dict[str, str], content_type: str, body: Any
    ) -> tuple[int, Obj]:
        store = self.server.fake._store
        rt, namespace, name = route.rt, route.namespace, route.name
        dry_run = query.get("dryRun") == "All"
        if verb == "get":
            return 200, store.get(rt, namespace, name)
        if verb == "list":
            return 200, self._list(route, query)
        if verb in ("create", "update") and not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        if verb == "create":
            return 201, store.create(rt, namespace, cast(Obj, body), dry_run=dry_run)
        if verb == "update":
            return 200, store.update(
                rt,
                namespace,
                name,
                cast(Obj, body),
                subresource=route.subresource,
                dry_run=dry_run,
            )
        if verb == "patch":
            return 200, store.patch(
                rt,
                namespace,
                name,
                content_type,
                body,
                subresource=route.subresource,
                dry_run=dry_run,
            )
        options: Obj = body if isinstance(body, dict) else {}
        if options.get("dryRun") == ["All"]:
            dry_run = True
        if verb == "delete":
            deleted = store.delete(
                rt, namespace, name, preconditions=options.get("preconditions"), dry_run=dry_run
            )
            if rt.returns_deleted_object:
                return 200, deleted
            meta = deleted["metadata"]
            return 200, {
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Success",
                "details": {**_details(rt, name), "uid": meta["uid"]},
            }
        # deletecollection
        labels = LabelSelector.parse(query.get("labelSelector"))
        fields = FieldSelector.parse(query.get("fieldSelector"))
        with store.cond:
            items, _ = store.list_objects(rt, namespace, labels, fields)
            deleted_items = [
                store.delete(
                    rt,
                    str(item["metadata"].get("namespace") or ""),
                    item["metadata"]["name"],
                    dry_run=dry_run,
                )
                for item in items
            ]
            rv = store.rv
        return 200, {
            "kind": f"{rt.kind}List",
            "apiVersion": rt.api_version,
            "metadata": {"resourceVersion": str(rv)},
            "items": deleted_items,
        }

    def _list(self, route: _Route, query: dict[str, str]) -> Obj:
        store = self.server.fake._store
        labels = LabelSelector.parse(query.get("labelSelector"))
        fields = FieldSelector.parse(query.get("fieldSelector"))
        requested = _parse_rv(query.get("resourceVersion"))
        match = query.get("resourceVersionMatch", "")
        at_rv: int | None = None
        if requested:
            with store.cond:
                current = store.rv
            if match == "Exact":
                at_rv = requested
            elif requested > current:
                raise ApiError(
                    504,
                    f"Too large resource version: {requested}, current: {current}",
                    reason="Timeout",
                    details={
                        "causes": [
                            {
                                "reason": "ResourceVersionTooLarge",
                                "message": "Too large resource version",
                            }
                        ],
                        "retryAfterSeconds": 1,
                    },
                )
        items, rv = store.list_objects(route.rt, route.namespace, labels, fields, at_rv=at_rv)
        for item in items:
            item.pop("kind", None)
            item.pop("apiVersion", None)
        return {
            "kind": f"{route.rt.kind}List",
            "apiVersion": route.rt.api_version,
            "metadata": {"resourceVersion": str(rv)},
            "items": items,
        }

    # -- watch --------------------------------------------------------------------------------

    def _write_chunk(self, data: bytes) -> None:
        try:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
        except OSError as err:
            raise _ClientGone() from err

    def _write_event(self, event_type: str, obj: Obj) -> None:
        self._write_chunk(json.dumps({"type": event_type, "object": obj}).encode() + b"\n")

    def _client_gone(self) -> bool:
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            if not readable:
                return False
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _serve_watch(self, route: _Route, query: dict[str, str], record: RequestRecord) -> None:
        fake = self.server.fake
        store = fake._store
        rt = route.rt
        labels = LabelSelector.parse(query.get("labelSelector"))
        fields = FieldSelector.parse(query.get("fieldSelector"))
        requested = _parse_rv(query.get("resourceVersion"))
        bookmarks = query.get("allowWatchBookmarks") in ("true", "1")
        send_initial = query.get("sendInitialEvents") in ("true", "1")
        timeout_text = query.get("timeoutSeconds")
        deadline: float | None = None
        if timeout_text:
            try:
                deadline = time.monotonic() + max(0.0, float(timeout_text))
            except ValueError:
                raise ApiError(400, f"invalid timeoutSeconds {timeout_text!r}") from None
        watcher = _Watcher(rt, route.namespace)
        with store.cond:
            initial: list[Obj] = []
            if not requested or send_initial:
                initial, _ = store.list_objects(rt, route.namespace, labels, fields)
            cursor = store.rv if not requested else requested
            store.watchers.append(watcher)
            store.cond.notify_all()
        record.status = 200
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for obj in initial:
                self._write_event("ADDED", obj)
            if send_initial and bookmarks:
                self._write_event("BOOKMARK", _bookmark(rt, cursor, initial_end=True))
            self._watch_loop(watcher, labels, fields, cursor, deadline, bookmarks)
            self._write_chunk(b"")  # the end of a chunked response
        except _ClientGone:
            self.close_connection = True
        finally:
            with store.cond:
                store.watchers.remove(watcher)
                store.cond.notify_all()

    def _watch_loop(
        self,
        watcher: _Watcher,
        labels: LabelSelector,
        fields: FieldSelector,
        cursor: int,
        deadline: float | None,
        bookmarks: bool,
    ) -> None:
        store = self.server.fake._store
        rt = watcher.resource
        while True:
            with store.cond:
                if store.stopping or watcher.closed:
                    return
                if cursor < store.floor:
                    expired = _expired(cursor, store.floor)
                    events = [("ERROR", expired.status())]
                    ended = True
                else:
                    changes = store.changes_after(cursor)
                    if changes:
                        cursor = changes[-1].rv
                    events = _watch_events(rt, watcher.namespace, labels, fields, changes)
                    if watcher.bookmark_pending and bookmarks:
                        events.append(("BOOKMARK", _bookmark(rt, store.rv)))
                    watcher.bookmark_pending = False
                    ended = False
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if not events:
                        if remaining is not None and remaining <= 0:
                            if bookmarks:
                                events.append(("BOOKMARK", _bookmark(rt, store.rv)))
                            ended = True
                        else:
                            wait = 0.2 if remaining is None else min(0.2, remaining)
                            store.cond.wait(wait)
            for event_type, obj in events:
                self._write_event(event_type, obj)
            if ended:
                return
            if not events and self._client_gone():
                raise _ClientGone()


def _bookmark(rt: ResourceType, rv: int, *, initial_end: bool = False) -> Obj:
    meta: Obj = {"resourceVersion": str(rv)}
    if initial_end:
        meta["annotations"] = {"k8s.io/initial-events-end": "true"}
    return {"kind": rt.kind, "apiVersion": rt.api_version, "metadata": meta}


def _watch_events(
    rt: ResourceType,
    namespace: str,
    labels: LabelSelector,
    fields: FieldSelector,
    changes: list[_Change],
) -> list[tuple[str, Obj]]:
    """What a watcher sees of ``changes`` (selector transitions as ADDED/DELETED)."""
    out: list[tuple[str, Obj]] = []
    for change in changes:
        if change.store_key != rt.store_key or (namespace and change.namespace != namespace):
            continue
        view = _to_view(rt, change.obj)
        now_matches = _matches(view, labels, fields)
        if change.type == "ADDED":
            if now_matches:
                out.append(("ADDED", view))
            continue
        if change.type == "DELETED":
            if now_matches:
                out.append(("DELETED", view))
            continue
        prev = _to_view(rt, change.prev) if change.prev is not None else None
        was_matching = prev is not None and _matches(prev, labels, fields)
        if now_matches and was_matching:
            out.append(("MODIFIED", view))
        elif now_matches:
            out.append(("ADDED", view))
        elif was_matching and prev is not None:
            # The real watch cache sends the previous state at the new resourceVersion.
            prev["metadata"]["resourceVersion"] = str(change.rv)
            out.append(("DELETED", prev))
    return out


def _parse_rv(text: str | None) -> int:
    if text is None or text == "":
        return 0
    try:
        value = int(text)
    except ValueError:
        raise ApiError(400, f"invalid resource version {text!r}") from None
    if value < 0:
        raise ApiError(400, f"invalid resource version {text!r}")
    return value


# --------------------------------------------------------------------------------------------
# The public test rig
# --------------------------------------------------------------------------------------------


def _resource(resource: str | ResourceType) -> ResourceType:
    if isinstance(resource, ResourceType):
        return resource
    plural, _, group = resource.partition(".")
    for rt in RESOURCES:
        if rt.plural == plural and rt.group == group:
            return rt
    raise KeyError(f"unknown resource {resource!r}")


class FakeKubeServer:
    """A fake kube-apiserver on ``127.0.0.1:<random port>``.

    ``resource`` arguments of the in-process helpers are plural names, qualified with the group
    for non-core resources: ``"configmaps"``, ``"nodes"``, ``"events"``, ``"persistentvolumes"``,
    ``"csistoragecapacities.storage.k8s.io"``, ``"events.events.k8s.io"``.
    In-process writes go through the same store as HTTP writes: they bump the resourceVersion
    and are seen by watches.
    """

    def __init__(self, *, history_limit: int | None = None) -> None:
        self._store = _Store(history_limit)
        self._requests: list[RequestRecord] = []
        self._faults: list[_Fault] = []
        self.latency: float = 0.0
        """Seconds every API request waits before it is processed."""
        self._httpd: _HttpServer | None = None
        self._thread: threading.Thread | None = None
        self._clients: list[Any] = []

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> FakeKubeServer:
        if self._httpd is not None:
            return self
        self._store.stopping = False
        self._httpd = _HttpServer(self)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.02},
            name="fake-kube-apiserver",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        for client in self._clients:
            try:
                client.close()
            except Exception:  # noqa: BLE001 - best effort on teardown
                pass
        self._clients.clear()
        httpd = self._httpd
        if httpd is None:
            return
        with self._store.cond:
            self._store.stopping = True
            self._store.cond.notify_all()
        httpd.shutdown()
        httpd.close_connections()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._httpd = None
        self._thread = None

    def __enter__(self) -> FakeKubeServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("the fake API server is not running")
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # -- clients ------------------------------------------------------------------------------

    def api_client(self) -> Any:
        """A ``kubernetes.client.ApiClient`` for this server (closed when the server stops)."""
        from kubernetes import client  # the official client; imported lazily

        configuration = client.Configuration(host=self.url)
        api = client.ApiClient(configuration)
        self._clients.append(api)
        return api

    def kubeconfig(self, *, namespace: str = "default", token: str = "fake-token") -> Obj:
        """A kubeconfig document (as a dict) pointing at this server."""
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {"token": token}}],
            "contexts": [
                {
                    "name": "fake",
                    "context": {"cluster": "fake", "user": "fake", "namespace": namespace},
                }
            ],
            "current-context": "fake",
        }

    def write_kubeconfig(
        self, path: str | Path, *, namespace: str = "default", token: str = "fake-token"
    ) -> Path:
        """Write a kubeconfig file (JSON, which is valid YAML) for ``--kubeconfig FILE``."""
        target = Path(path)
        target.write_text(json.dumps(self.kubeconfig(namespace=namespace, token=token), indent=2))
        target.chmod(0o600)
        return target

    # -- generic in-process state access --------------------------------------------------------

    def create(self, resource: str | ResourceType, obj: Obj, namespace: str | None = None) -> Obj:
        rt = _resource(resource)
        ns = namespace or str((obj.get("metadata") or {}).get("namespace") or "")
        if rt.namespaced and not ns:
            ns = "default"
        return self._store.create(rt, ns, obj)

    def get(self, resource: str | ResourceType, name: str, namespace: str = "") -> Obj | None:
        try:
            return self._store.get(_resource(resource), namespace, name)
        except ApiError as err:
            if err.code == 404:
                return None
            raise

    def list(
        self,
        resource: str | ResourceType,
        namespace: str = "",
        *,
        label_selector: str = "",
        field_selector: str = "",
    ) -> builtins.list[Obj]:
        items, _ = self._store.list_objects(
            _resource(resource),
            namespace,
            LabelSelector.parse(label_selector),
            FieldSelector.parse(field_selector),
        )
        return items

    def put(self, resource: str | ResourceType, obj: Obj) -> Obj:
        """Create or replace (unconditionally, status included) an object."""
        rt = _resource(resource)
        meta: Obj = obj.get("metadata") or {}
        name = str(meta["name"])
        ns = str(meta.get("namespace") or ("default" if rt.namespaced else ""))
        with self._store.cond:
            if self.get(rt, name, ns) is None:
                return self._store.create(rt, ns, obj)
            body = copy.deepcopy(obj)
            body.setdefault("metadata", {}).pop("resourceVersion", None)
            updated = self._store.update(rt, ns, name, body)
            if rt.has_status and "status" in obj:
                status_body = copy.deepcopy(updated)
                status_body["status"] = copy.deepcopy(obj["status"])
                updated = self._store.update(rt, ns, name, status_body, subresource="status")
            return updated

    def patch(
        self,
        resource: str | ResourceType,
        name: str,
        patch: Obj,
        namespace: str = "",
        *,
        subresource: str = "",
    ) -> Obj:
        """Apply a JSON merge patch (``None`` values delete keys)."""
        return self._store.patch(
            _resource(resource),
            namespace,
            name,
            "application/merge-patch+json",
            patch,
            subresource=subresource,
        )

    def delete(self, resource: str | ResourceType, name: str, namespace: str = "") -> bool:
        try:
            self._store.delete(_resource(resource), namespace, name)
        except ApiError as err:
            if err.code == 404:
                return False
            raise
        return True

    # -- convenience: nodes, configmaps, events ------------------------------------------------

    def put_node(
        self,
        name: str,
        labels: dict[str, str] | None = None,
        annotations: dict[str, str] | None = None,
    ) -> Obj:
        """Create the node, or replace its labels/annotations (those given) if it exists."""
        with self._store.cond:
            current = self.get("nodes", name)
            if current is None:
                meta: Obj = {"name": name, "labels": dict(labels or {})}
                if annotations is not None:
                    meta["annotations"] = dict(annotations)
                return self._store.create(
                    _resource("nodes"), "", {"metadata": meta, "spec": {}, "status": {}}
                )
            body = copy.deepcopy(current)
            body["metadata"].pop("resourceVersion", None)
            if labels is not None:
                body["metadata"]["labels"] = dict(labels)
            if annotations is not None:
                body["metadata"]["annotations"] = dict(annotations)
            return self._store.update(_resource("nodes"), "", name, body)

    def label_node(self, name: str, labels: dict[str, str | None]) -> Obj:
        """Merge labels into a node; a ``None`` value removes that label."""
        return self.patch("nodes", name, {"metadata": {"labels": labels}})

    def node(self, name: str) -> Obj | None:
        return self.get("nodes", name)

    def set_configmap(self, namespace: str, name: str, data: dict[str, str]) -> Obj:
        """Create the ConfigMap, or replace its ``data``."""
        with self._store.cond:
            current = self.get("configmaps", name, namespace)
            if current is None:
                return self._store.create(
                    _resource("configmaps"),
                    namespace,
                    {"metadata": {"name": name}, "data": dict(data)},
                )
            body = copy.deepcopy(current)
            body["metadata"].pop("resourceVersion", None)
            body["data"] = dict(data)
            return self._store.update(_resource("configmaps"), namespace, name, body)

    def configmap(self, namespace: str, name: str) -> Obj | None:
        return self.get("configmaps", name, namespace)

    def delete_configmap(self, namespace: str, name: str) -> bool:
        return self.delete("configmaps", name, namespace)

    def events(
        self,
        namespace: str = "",
        *,
        reason: str | None = None,
        involved_kind: str | None = None,
        involved_name: str | None = None,
    ) -> builtins.list[Obj]:
        """Events (created through core/v1 or events.k8s.io/v1), in core/v1 layout, oldest first.

        Filter by ``reason`` and by the involved object (``involvedObject`` / ``regarding``).
        """
        with self._store.cond:
            items = [
                obj
                for key, obj in self._store.objects.items()
                if key[0] == "events" and (not namespace or key[1] == namespace)
            ]
            items = [copy.deepcopy(obj) for obj in items]
        items.sort(key=lambda obj: int(obj["metadata"]["resourceVersion"]))
        out: list[Obj] = []
        for obj in items:
            involved: Obj = obj.get("involvedObject") or {}
            if reason is not None and obj.get("reason") != reason:
                continue
            if involved_kind is not None and involved.get("kind") != involved_kind:
                continue
            if involved_name is not None and involved.get("name") != involved_name:
                continue
            out.append(obj)
        return out

    # -- resourceVersion, history and watches --------------------------------------------------

    @property
    def resource_version(self) -> int:
        """The current global resourceVersion."""
        with self._store.cond:
            return self._store.rv

    @property
    def history_limit(self) -> int | None:
        """How many changes the watch history keeps (``None``: all until ``compact()``)."""
        return self._store.history_limit

    @history_limit.setter
    def history_limit(self, value: int | None) -> None:
        with self._store.cond:
            self._store.history_limit = value
            if value is not None:
                self._store.compact(keep=value)

    def compact(self, keep: int = 0) -> None:
        """Drop watch history (all of it, or all but the newest ``keep`` changes).

        A watch or exact list from a resourceVersion older than what remains gets 410 Expired.
        A running watch that falls behind the window receives the 410 ERROR event and ends.
        """
        self._store.compact(keep=keep)

    def expire_watches(self) -> None:
        """Make every client's watch position too old: end the running watches, and have any
        watch from a resourceVersion up to now answered with 410 Expired.

        The global resourceVersion moves on by one (as writes to other resources would move it
        on a real cluster), so a relist returns a resourceVersion that can be watched again.
        """
        with self._store.cond:
            self._store._next_rv()
            self._store.compact()
            self.close_watches()

    def close_watches(self, resource: str | None = None) -> int:
        """End running watches cleanly (as an apiserver timeout does); returns how many."""
        with self._store.cond:
            rt = _resource(resource) if resource else None
            closing = [w for w in self._store.watchers if rt is None or w.resource == rt]
            for watcher in closing:
                watcher.closed = True
            self._store.cond.notify_all()
            return len(closing)

    def send_bookmarks(self) -> None:
        """Send a BOOKMARK (current resourceVersion) to watches that allow bookmarks."""
        with self._store.cond:
            for watcher in self._store.watchers:
                watcher.bookmark_pending = True
            self._store.cond.notify_all()

    def watch_count(self, resource: str | None = None) -> int:
        """How many watches are open now (on ``resource``, or on any)."""
        rt = _resource(resource) if resource else None
        with self._store.cond:
            return sum(1 for w in self._store.watchers if rt is None or w.resource == rt)

    def wait_for_watch(self, resource: str, count: int = 1, timeout: float = 10.0) -> None:
        """Block until at least ``count`` watches on ``resource`` are open."""
        self._wait(
            lambda: self.watch_count(resource) >= count, timeout, f"{count} watch(es) on {resource}"
        )

    # -- request log ---------------------------------------------------------------------------

    @property
    def requests(self) -> builtins.list[RequestRecord]:
        """Every request served so far (oldest first)."""
        with self._store.cond:
            return list(self._requests)

    def requests_matching(
        self,
        verb: str | None = None,
        resource: str | None = None,
        *,
        group: str | None = None,
        namespace: str | None = None,
        name: str | None = None,
        subresource: str | None = None,
    ) -> builtins.list[RequestRecord]:
        """The requests that match (``resource`` is the plural, e.g. ``"nodes"``; ``group`` is
        ``""`` for the core group, e.g. ``"events.k8s.io"`` otherwise), oldest first."""
        with self._store.cond:
            return [
                r
                for r in self._requests
                if (verb is None or r.verb == verb)
                and (resource is None or r.resource == resource)
                and (group is None or r.group == group)
                and (namespace is None or r.namespace == namespace)
                and (name is None or r.name == name)
                and (subresource is None or r.subresource == subresource)
            ]

    def count(
        self,
        verb: str | None = None,
        resource: str | None = None,
        *,
        group: str | None = None,
        namespace: str | None = None,
        name: str | None = None,
        subresource: str | None = None,
    ) -> int:
        """How many requests match (same filters as ``requests_matching``)."""
        return len(
            self.requests_matching(
                verb,
                resource,
                group=group,
                namespace=namespace,
                name=name,
                subresource=subresource,
            )
        )

    def counts(self) -> dict[tuple[str, str], int]:
        """Requests per (verb, resource)."""
        out: dict[tuple[str, str], int] = {}
        with self._store.cond:
            for r in self._requests:
                out[(r.verb, r.resource)] = out.get((r.verb, r.resource), 0) + 1
        return out

    def reset_requests(self) -> None:
        with self._store.cond:
            self._requests.clear()

    def wait_for_requests(
        self,
        verb: str | None = None,
        resource: str | None = None,
        count: int = 1,
        timeout: float = 10.0,
        **filters: str,
    ) -> None:
        """Block until at least ``count`` matching requests have been received."""
        self._wait(
            lambda: self.count(verb, resource, **filters) >= count,
            timeout,
            f"{count} {verb or 'any'} request(s) on {resource or 'any resource'}",
        )

    def wait_for(
        self, predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition"
    ) -> None:
        """Block until ``predicate()`` holds (re-checked on every change and request)."""
        self._wait(predicate, timeout, what)

    def _wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        with self._store.cond:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
                self._store.cond.wait(min(remaining, 0.1))

    # -- fault injection -----------------------------------------------------------------------

    def fail_next(
        self,
        count: int = 1,
        code: int = 500,
        *,
        verb: str | None = None,
        resource: str | None = None,
        name: str | None = None,
        message: str | None = None,
    ) -> None:
        """Make the next ``count`` matching API requests fail with ``code`` (a Status body)."""
        with self._store.cond:
            self._faults.append(
                _Fault(count, code, message or f"injected failure ({code})", verb, resource, name)
            )

    def clear_faults(self) -> None:
        with self._store.cond:
            self._faults.clear()
        self.latency = 0.0

    def _log_request(self, record: RequestRecord) -> ApiError | None:
        """Record a request; sleep the injected latency; return an injected fault, if any."""
        with self._store.cond:
            self._requests.append(record)
            self._store.cond.notify_all()
            fault = next((f for f in self._faults if f.applies(record)), None)
            if fault is not None:
                fault.remaining -= 1
                if fault.remaining <= 0:
                    self._faults.remove(fault)
            latency = self.latency if record.resource else 0.0
        if latency > 0:
            time.sleep(latency)
        if fault is None:
            return None
        return ApiError(fault.code, fault.message)


# --------------------------------------------------------------------------------------------
# pytest fixture
# --------------------------------------------------------------------------------------------


@pytest.fixture
def fake_kube() -> Iterator[FakeKubeServer]:
    """A running ``FakeKubeServer``, stopped after the test."""
    server = FakeKubeServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()
