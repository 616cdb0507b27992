"""What the parts of the demo share: options, output, the step runner, cleanup, the work dir."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from pathlib import Path

from edge_common.loopdisk import LoopDisk
from edge_common.lvm import Lvm
from edge_demo.cleanup import Cleanup
from edge_demo.steps import Runner
from edge_demo.ui import Console

NODE_NAME = "edge-demo-node"
GATE_LABEL = "alibabacloud.com/edge-enable-localstorage=true"
SELECTOR_KEY = "kubernetes.io/storagetype"
SELECTOR_VALUE = "lvm"


def default_vg_name() -> str:
    return f"edgedemo-{secrets.token_hex(3)}"


@dataclass
class Options:
    fast: bool = False  # shorter key-refresh and health intervals, fewer Secrets
    skip_kernel: bool = False  # do not boot the real-kernel guest
    keep: bool = False  # keep the work directory (logs, keyrings, etcd values)
    workdir_parent: Path | None = None
    vg_name: str = field(default_factory=default_vg_name)
    summary_json: Path | None = None
    guest_timeout: float = 600.0
    color: bool | None = None


@dataclass
class Context:
    options: Options
    console: Console
    runner: Runner
    cleanup: Cleanup
    work: Path
    lvm: Lvm
    disks: list[LoopDisk] = field(default_factory=list)
    vg_ready: bool = False

    @property
    def logs(self) -> Path:
        return self.work / "logs"

    def log(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    @property
    def vg(self) -> str:
        return self.options.vg_name

    @property
    def node_labels(self) -> str:
        return f"{SELECTOR_KEY}={SELECTOR_VALUE},{GATE_LABEL}"


__all__ = ["Context", "NODE_NAME", "Options", "default_vg_name"]
