"""Find key backends by name through the ``kms_plugin.backends`` entry-point group.

A third party adds a backend by declaring, in its own package::

    [project.entry-points."kms_plugin.backends"]
    mybackend = "my_package.module:MyBackend"

where ``MyBackend`` subclasses :class:`kms_plugin.backends.base.KeyBackend`.
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib.metadata import EntryPoint, entry_points

from kms_plugin.backends.base import KeyBackend
from kms_plugin.backends.errors import BackendConfigError

GROUP = "kms_plugin.backends"

# Fallbacks used when the package metadata is not installed (e.g. running from a source tree
# without `pip install -e .`); the entry points win when they exist.
_BUILTIN: dict[str, str] = {
    "local": "kms_plugin.backends.local:LocalBackend",
    "pkcs11": "kms_plugin.backends.pkcs11:Pkcs11Backend",
    "awskms": "kms_plugin.backends.awskms:AwsKmsBackend",
}


def _entry_points() -> dict[str, EntryPoint]:
    found: dict[str, EntryPoint] = {}
    for name, target in _BUILTIN.items():
        found[name] = EntryPoint(name=name, value=target, group=GROUP)
    for ep in entry_points(group=GROUP):
        found[ep.name] = ep
    return found


def available() -> list[str]:
    """Names of every backend that can be loaded by :func:`load_backend_class`."""
    return sorted(_entry_points())


def load_backend_class(name: str) -> type[KeyBackend]:
    """Return the backend class registered under ``name``."""
    ep = _entry_points().get(name)
    if ep is None:
        raise BackendConfigError(
            f"unknown key backend {name!r}; available: {', '.join(available())}"
        )
    try:
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
