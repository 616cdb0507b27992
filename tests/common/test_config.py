"""edge_common.config: defaults < file < environment < flags, typed, with actionable errors."""

from __future__ import annotations

import argparse
import enum
from dataclasses import dataclass
from pathlib import Path

import pytest

from edge_common.config import ConfigError, add_arguments, load, markdown_table, option, resolve


class Mode(enum.Enum):
    ALL = "all"
    CONTROLLER = "controller"


@dataclass(frozen=True)
class Opts:
    endpoint: str = option("unix:///run/x.sock", help="socket")
    workers: int = option(4, help="threads")
    ratio: float = option(1.5, help="ratio")
    debug: bool = option(False, help="debug")
    mode: Mode = option(Mode.ALL, help="mode")
    vgs: list[str] = option(["vg0"], help="volume groups")
    labels: dict[str, str] = option({}, help="labels")
    group: str | None = option(None, help="socket group")
    token: str = option("", help="secret token", secret=True)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser, Opts)
    return parser.parse_args(argv)


def test_defaults_apply_when_nothing_is_given() -> None:
    opts = resolve(Opts, _parse([]), env_prefix="T_", environ={})
    assert opts == Opts()
    assert opts.vgs == ["vg0"] and opts.mode is Mode.ALL and opts.group is None


def test_flag_beats_environment_beats_file(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("workers: 8\nratio: 2.5\nendpoint: unix:///file.sock\nvgs: [a, b]\n")
    env = {"T_WORKERS": "16", "T_ENDPOINT": "unix:///env.sock"}
    opts = resolve(Opts, _parse(["--config", str(cfg), "--workers", "32"]), env_prefix="T_",
                   environ=env)
    assert opts.workers == 32  # flag
    assert opts.endpoint == "unix:///env.sock"  # env over file
    assert opts.ratio == 2.5  # file over default
    assert opts.vgs == ["a", "b"]


def test_kebab_case_file_keys_are_accepted(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("endpoint: unix:///k.sock\nlabels: {a: b}\n")
    assert resolve(Opts, _parse(["--config", str(cfg)]), env_prefix="T_", environ={}).labels == {
        "a": "b"
    }


def test_unknown_file_key_is_an_error_naming_it(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("workerz: 3\n")
    with pytest.raises(ConfigError, match="unknown option.*workerz"):
        resolve(Opts, _parse(["--config", str(cfg)]), env_prefix="T_", environ={})


def test_bad_value_error_names_its_source() -> None:
    with pytest.raises(ConfigError, match="environment T_WORKERS"):
        resolve(Opts, _parse([]), env_prefix="T_", environ={"T_WORKERS": "many"})
    with pytest.raises(ConfigError, match="expected one of all, controller"):
        resolve(Opts, _parse(["--mode", "node"]), env_prefix="T_", environ={})
    with pytest.raises(ConfigError, match="expected true or false"):
        resolve(Opts, _parse([]), env_prefix="T_", environ={"T_DEBUG": "perhaps"})


def test_lists_maps_and_booleans_from_strings() -> None:
    opts = resolve(
        Opts,
        _parse(["--vgs", "a, b", "--labels", "k=v,x=y", "--debug", "--mode", "controller"]),
        env_prefix="T_",
        environ={},
    )
    assert opts.vgs == ["a", "b"]
    assert opts.labels == {"k": "v", "x": "y"}
    assert opts.debug is True and opts.mode is Mode.CONTROLLER
    assert resolve(Opts, _parse(["--no-debug"]), env_prefix="T_", environ={"T_DEBUG": "1"}).debug \
        is False


def test_malformed_map_is_an_error() -> None:
    with pytest.raises(ConfigError, match="key=value"):
        resolve(Opts, _parse(["--labels", "novalue"]), env_prefix="T_", environ={})


def test_invalid_yaml_and_missing_file_are_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        resolve(Opts, _parse(["--config", str(bad)]), env_prefix="T_", environ={})
    with pytest.raises(ConfigError, match="config file"):
        resolve(Opts, _parse(["--config", str(tmp_path / "nope.yaml")]), env_prefix="T_",
                environ={})


def test_load_exits_with_usage_error_on_bad_flag_value(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        load(Opts, ["--workers", "x"], env_prefix="T_", prog="prog", description="d")
    assert exc.value.code == 2
    assert "--workers" in capsys.readouterr().err


def test_a_secret_option_is_never_a_flag_nor_in_the_repr(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(SystemExit):
        load(Opts, ["--token", "s3cr3t"], env_prefix="T_", prog="prog", description="d")
    assert "unrecognized arguments: --token" in capsys.readouterr().err
    monkeypatch.setenv("T_TOKEN", "s3cr3t")
    opts = load(Opts, [], env_prefix="T_", prog="prog", description="d")
    assert opts.token == "s3cr3t" and "s3cr3t" not in repr(opts)


def test_reference_table_lists_every_option_and_hides_secret_defaults() -> None:
    table = markdown_table(Opts, "T_")
    names = ("endpoint", "workers", "ratio", "debug", "mode", "vgs", "labels", "group", "token")
    for name in names:
        assert f"`{name}`" in table
    assert "`T_WORKERS`" in table and "`--socket-group`" not in table
    assert "all\\|controller" in table
