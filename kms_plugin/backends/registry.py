"""Find key backends by name through the ``kms_plugin.backends`` entry-point group.

A third party adds a backend by declaring, in its own package::

    [project.entry-points."kms_plugin.backends"]
    mybackend = "my_package.module:MyBackend"

where ``MyBackend`` subclasses :class:`kms_plugin.backends.base.KeyBackend`.

The built-in names (local, pkcs11, awskms) always load the built-in backends, without a look
at the entry points: no installed package can put another class behind them, and ``serve``
does not pay for importlib.metadata (about 0.6 MiB resident) unless it runs a third-party
backend.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING

from kms_plugin.backends.base import KeyBackend
from kms_plugin.backends.errors import BackendConfigError

if TYPE_CHECKING:
    from importlib.metadata import EntryPoint

GROUP = "kms_plugin.backends"

# the built-in backends (also declared as entry points, for `available()` and other tools)
_BUILTIN: dict[str, str] = {
    "local": "kms_plugin.backends.local:LocalBackend",
    "pkcs11": "kms_plugin.backends.pkcs11:Pkcs11Backend",
    "awskms": "kms_plugin.backends.awskms:AwsKmsBackend",
}


def _third_party() -> dict[str, EntryPoint]:
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=GROUP) if ep.name not in _BUILTIN}


def available() -> list[str]:
    """Names of every backend that can be loaded by :func:`load_backend_class`."""
    return sorted({*_BUILTIN, *_third_party()})


def _load_builtin(target: str) -> object:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def load_backend_class(name: str) -> type[KeyBackend]:
    """Return the backend class registered under ``name``."""
    try:
        if name in _BUILTIN:
            cls = _load_builtin(_BUILTIN[name])
        else:
            ep = _third_party().get(name)
            if ep is None:
                raise BackendConfigError(
                    f"unknown key backend {name!r}; available: {', '.join(available())}"
                )
            cls = ep.load()
    except ImportError as exc:
        raise BackendConfigError(f"key backend {name!r} cannot be loaded: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, KeyBackend)):
        raise BackendConfigError(f"entry point {name!r} does not name a KeyBackend subclass")
    return cls


def create_backend(name: str, options: Mapping[str, object]) -> KeyBackend:
    """Load the backend ``name`` and build it from its options."""
    return load_backend_class(name).from_options(options)


__all__ = ["GROUP", "available", "create_backend", "load_backend_class"]
