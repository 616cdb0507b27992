"""``python -m fake_kms``: run the fake KMS in the foreground."""

import sys

from fake_kms.cli import main

sys.exit(main(sys.argv[1:]))
