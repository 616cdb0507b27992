"""Entry point: ``python -m kernel_guest``."""

import sys

from kernel_guest.cli import entry

sys.exit(entry())
