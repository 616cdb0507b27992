import sys

from csi_lvm.cli import main

sys.exit(main())
