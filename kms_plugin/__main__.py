"""``python -m kms_plugin``: the same as the ``kms-plugin`` command."""

import sys

from kms_plugin.cli import main

sys.exit(main())
