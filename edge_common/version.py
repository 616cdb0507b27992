"""The one project version, read from the installed package metadata.

``project_version()`` reads it when first asked: importlib.metadata (with zipfile, csv and
email parsing) costs a long-running service about 0.6 MiB it otherwise never needs.
``VERSION`` is the same string for modules that want it at import time.
"""

from __future__ import annotations

import functools

DISTRIBUTION = "edge-node-services"


@functools.cache
def project_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0.0.0+unknown"


def __getattr__(name: str) -> str:
    if name == "VERSION":
        return project_version()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
