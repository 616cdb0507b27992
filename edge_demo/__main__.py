"""``python -m edge_demo``: see edge_demo.cli."""

import sys

from edge_demo.cli import main

sys.exit(main())
