"""`csi-lvm` on the command line: --help, --version, every config key a flag, config files."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from csi_lvm.config import CreateWipe, CsiConfig, Mode, load_config
from edge_common.config import ConfigError
from edge_common.version import VERSION


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "csi_lvm", *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ, **(env or {})}, check=False)


def test_help_lists_every_config_key_as_a_flag() -> None:
    out = run_cli("--help")
    assert out.returncode == 0
    for field in dataclasses.fields(CsiConfig):
        assert "--" + field.name.replace("_", "-") in out.stdout
    assert "--config" in out.stdout


def test_version_prints_the_project_version() -> None:
    out = run_cli("--version")
    assert out.returncode == 0
    assert VERSION in out.stdout


def test_a_missing_node_id_is_a_clear_usage_error() -> None:
    out = run_cli("--endpoint", "unix:///tmp/x.sock")
    assert out.returncode == 2
    assert "node_id" in out.stderr


def test_flags_override_environment_which_overrides_the_file(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    conf = tmp_path / "csi.yaml"
    conf.write_text("node-id: from-file\ndefault_vg: vgfile\nallowed_vgs: [a, b]\n"
                    "create_wipe: full\nlvm_command: [nsenter, --mount=/proc/1/ns/mnt, lvm]\n")
    monkeypatch.setenv("CSI_LVM_DEFAULT_VG", "vgenv")
    cfg = load_config(["--config", str(conf), "--mode", "all"])
    assert (cfg.node_id, cfg.default_vg, cfg.allowed_vgs) == ("from-file", "vgenv", ["a", "b"])
    assert cfg.create_wipe is CreateWipe.FULL and cfg.mode is Mode.ALL
    assert cfg.lvm_command == ["nsenter", "--mount=/proc/1/ns/mnt", "lvm"]
    cfg = load_config(["--config", str(conf), "--default-vg", "vgflag"])
    assert cfg.default_vg == "vgflag"
    assert cfg.topology_key == "topology.local.csi.edge.io/node"


def test_an_unknown_config_file_key_is_refused(tmp_path: Path) -> None:
    conf = tmp_path / "csi.yaml"
    conf.write_text("node_id: n\ndefault_vgs: typo\n")
    out = run_cli("--config", str(conf))
    assert out.returncode == 2 and "default_vgs" in out.stderr


def test_invalid_values_are_config_errors() -> None:
    from edge_common.config import resolve

    for bad in ({"node_id": "n", "thin_overprovision_ratio": "0"},
                {"node_id": "n", "thick_snapshot_percent": "0"},
                {"node_id": "n", "mode": "node"}):
        with pytest.raises(ConfigError):
            resolve(CsiConfig, bad, env_prefix="CSI_LVM_", environ={})


def test_a_controller_only_instance_needs_no_node_id() -> None:
    from edge_common.config import resolve

    cfg = resolve(CsiConfig, {"mode": "controller"}, env_prefix="CSI_LVM_", environ={})
    assert cfg.mode is Mode.CONTROLLER


def test_an_endpoint_that_is_not_a_unix_socket_fails_to_start() -> None:
    out = run_cli("--node-id", "n", "--endpoint", "tcp://127.0.0.1:1234",
                  "--lvm-command", "/nonexistent/lvm")
    assert out.returncode == 1
    assert "unix" in out.stderr
