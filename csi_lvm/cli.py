"""`csi-lvm --endpoint unix:///csi/csi.sock --node-id NAME [--config FILE]`."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from csi_lvm.config import load_config
from csi_lvm.server import Driver
from edge_common.log import setup_logging
from edge_common.server import EndpointError

log = logging.getLogger("csi_lvm")


def main(argv: Sequence[str] | None = None) -> int:
    config = load_config(argv)
    setup_logging(config.log_level, config.log_json)
    try:
        driver = Driver(config)
        driver.run_until_signal()
    except (EndpointError, ValueError, OSError) as exc:
        log.error("csi-lvm cannot start", extra={"error": str(exc)})
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
