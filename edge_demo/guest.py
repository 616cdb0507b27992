"""The demo's job inside the real-kernel guest: ``python -m edge_demo.guest``.

Starts ``csi-lvm`` on a unix socket first, and only then imports the rest of the demo (gRPC,
the CSI stubs, LVM): under the guest's CPU emulation each Python start-up takes many seconds,
and this way the driver's and ours overlap. Then edge_demo.csi_live.run_guest builds a VG on
the given disks (EDGE_GUEST_DISKS), walks one PVC through its life on a live LV, cleans up and
writes the step results as JSON (by default into EDGE_GUEST_RESULTS, which comes back to the
host). Exit status 0 when every step passed.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from edge_demo.procs import ServiceProcess, tool

REPORT_NAME = "csi-live.json"
DRIVER_LOG = "csi-lvm.log"
NODE_ID = "edge-demo-guest"


def build_parser() -> argparse.ArgumentParser:
    results = os.environ.get("EDGE_GUEST_RESULTS") or tempfile.gettempdir()
    parser = argparse.ArgumentParser(prog="python -m edge_demo.guest", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--disks", default=os.environ.get("EDGE_GUEST_DISKS", ""),
                        help="comma-separated block devices the demo may use (they are made "
                        "into a VG and removed again); default EDGE_GUEST_DISKS")
    parser.add_argument("--report", type=Path, default=Path(results) / REPORT_NAME,
                        help="write the step results here (JSON)")
    parser.add_argument("--log-dir", type=Path, default=Path(results),
                        help=f"where the driver's log ({DRIVER_LOG}) goes")
    parser.add_argument("--vg", default=f"demo{secrets.token_hex(3)}", help="VG name")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    disks = [d for d in ns.disks.split(",") if d]
    work = Path(tempfile.mkdtemp(prefix="edge-demo-guest-"))
    ns.log_dir.mkdir(parents=True, exist_ok=True)
    endpoint = f"unix://{work / 'csi.sock'}"
    driver = ServiceProcess(
        "csi-lvm",
        [*tool("csi-lvm", "csi_lvm"), "--endpoint", endpoint, "--node-id", NODE_ID,
         "--default-vg", ns.vg],
        ns.log_dir / DRIVER_LOG,
    )
    driver.start()  # its Probe turns ready once the VG exists
    try:
        from edge_demo.csi_live import run_guest

        return run_guest(driver, endpoint, disks, ns.vg, work, ns.report)
    finally:
        driver.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
