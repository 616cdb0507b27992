"""Small JSON schemas for what kubernetes-validate does not ship: the VolumeSnapshotClass CRD
(snapshot.storage.k8s.io/v1, from the external-snapshotter CRD's field list) and
kube-apiserver's EncryptionConfiguration (apiserver.config.k8s.io/v1, a config file, not an
API object). Strict: unknown fields are errors, as they are for kube-apiserver's decoder."""

from __future__ import annotations

from typing import Any

import jsonschema

_OBJECT_META = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
                 "maxLength": 253},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
    "additionalProperties": False,
}

VOLUME_SNAPSHOT_CLASS_V1: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "driver", "deletionPolicy"],
    "properties": {
        "apiVersion": {"const": "snapshot.storage.k8s.io/v1"},
        "kind": {"const": "VolumeSnapshotClass"},
        "metadata": _OBJECT_META,
        "driver": {"type": "string", "minLength": 1, "maxLength": 63},
        "deletionPolicy": {"enum": ["Delete", "Retain"]},
        "parameters": {"type": "object", "additionalProperties": {"type": "string"}},
    },
    "additionalProperties": False,
}

_DURATION = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"
_KEYS = {
    "type": "object",
    "required": ["keys"],
    "properties": {
        "keys": {
            "type": "array", "minItems": 1,
            "items": {
                "type": "object", "required": ["name", "secret"],
                "properties": {"name": {"type": "string"}, "secret": {"type": "string"}},
                "additionalProperties": False,
            },
        },
    },
    "additionalProperties": False,
}
_KMS = {
    "type": "object",
    "required": ["name", "endpoint"],
    "properties": {
        "apiVersion": {"enum": ["v1", "v2"]},
        # the name is part of the etcd value prefix k8s:enc:kms:v2:<name>: and may not hold ':'
        "name": {"type": "string", "minLength": 1, "pattern": r"^[^:]+$"},
        "endpoint": {"type": "string", "pattern": r"^unix:///"},
        "cachesize": {"type": "integer"},
        "timeout": {"type": "string", "pattern": _DURATION},
    },
    "additionalProperties": False,
    # cachesize only means something for KMS v1; kube-apiserver rejects it with v2
    "if": {"properties": {"apiVersion": {"const": "v2"}}, "required": ["apiVersion"]},
    "then": {"not": {"required": ["cachesize"]}},
}
_PROVIDER = {
    "type": "object",
    "minProperties": 1,
    "maxProperties": 1,
    "properties": {
        "identity": {"type": "object", "additionalProperties": False},
        "aesgcm": _KEYS,
        "aescbc": _KEYS,
        "secretbox": _KEYS,
        "kms": _KMS,
    },
    "additionalProperties": False,
}

ENCRYPTION_CONFIGURATION_V1: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "resources"],
    "properties": {
        "apiVersion": {"const": "apiserver.config.k8s.io/v1"},
        "kind": {"const": "EncryptionConfiguration"},
        "resources": {
            "type": "array", "minItems": 1,
            "items": {
                "type": "object",
                "required": ["resources", "providers"],
                "properties": {
                    "resources": {"type": "array", "minItems": 1,
                                  "items": {"type": "string", "minLength": 1}},
                    "providers": {"type": "array", "minItems": 1, "items": _PROVIDER},
                },
                "additionalProperties": False,
            },
        },
    },
    "additionalProperties": False,
}

OWN_SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("snapshot.storage.k8s.io/v1", "VolumeSnapshotClass"): VOLUME_SNAPSHOT_CLASS_V1,
    ("apiserver.config.k8s.io/v1", "EncryptionConfiguration"): ENCRYPTION_CONFIGURATION_V1,
}


def errors(obj: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft202012Validator(schema)
    return sorted(
        f"{'/'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
        for e in validator.iter_errors(obj)
    )


def own_schema_for(obj: dict[str, Any]) -> dict[str, Any] | None:
    return OWN_SCHEMAS.get((str(obj.get("apiVersion")), str(obj.get("kind"))))
