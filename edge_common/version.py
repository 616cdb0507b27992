"""The one project version, read from the installed package metadata."""

from importlib.metadata import PackageNotFoundError, version

DISTRIBUTION = "edge-node-services"

try:
    VERSION = version(DISTRIBUTION)
except PackageNotFoundError:  # running from a source tree that was never installed
    VERSION = "0.0.0+unknown"
