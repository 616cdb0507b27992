"""``python -m node_resource_manager`` = the ``node-resource-manager`` command."""

import sys

from node_resource_manager.cli import main

sys.exit(main())
