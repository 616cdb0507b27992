"""The docs cannot drift from the code: the generated references equal what the code generates
today, the alert rules are valid and use only metrics that exist, and the commands and ports the
operations guide shows are the ones the code and the manifests have."""

from __future__ import annotations

import argparse
import functools
import importlib.util
import re
import shlex
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from edge_common.config import add_arguments
from tests.deploy.manifests import ROOT, Obj, container, containers, one

DOCS = ROOT / "docs"


@functools.cache
def gen_docs() -> ModuleType:
    """scripts/gen_docs.py, loaded as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("gen_docs", ROOT / "scripts" / "gen_docs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------ generated docs


def test_configuration_reference_is_what_the_code_generates() -> None:
    committed = (DOCS / "configuration.md").read_text()
    assert committed == gen_docs().render_configuration(), (
        "docs/configuration.md is stale: run .venv/bin/python scripts/gen_docs.py")


def test_metrics_reference_is_what_the_code_generates() -> None:
    committed = (DOCS / "metrics.md").read_text()
    assert committed == gen_docs().render_metrics(), (
        "docs/metrics.md is stale: run .venv/bin/python scripts/gen_docs.py")


def test_configuration_reference_lists_every_option_of_every_command() -> None:
    from csi_lvm.config import CsiConfig
    from kms_plugin.config import PluginConfig
    from node_resource_manager.config import NrmConfig

    text = (DOCS / "configuration.md").read_text()
    for cls in (CsiConfig, NrmConfig, PluginConfig):
        for name in cls.__dataclass_fields__:
            flag = f"`--{name.replace('_', '-')}`" in text
            assert flag or f"| `{name}` | (none: secret) |" in text, name  # secrets: no flag
    width = None
    for line in text.splitlines():
        if not line.startswith("|"):
            width = None
            continue
        cells = len(re.split(r"(?<!\\)\|", line))
        width = width or cells  # the header row sets the table's width
        assert cells == width, f"a cell breaks the table: {line}"


def test_metrics_reference_lists_the_metrics_the_issues_require() -> None:
    names = gen_docs().all_exposed_names()
    for required in (
        "csi_lvm_grpc_requests_total", "csi_lvm_vg_free_bytes", "csi_lvm_vg_size_bytes",
        "csi_lvm_thin_pool_data_percent", "csi_lvm_thin_pool_metadata_percent",
        "nrm_volume_group_free_bytes", "nrm_reconciles_total", "nrm_reconcile_errors_total",
        "kms_plugin_requests_total", "kms_plugin_backend_calls_total",
        "kms_plugin_kek_cache_requests_total", "kms_plugin_root_key_unusable",
    ):
        assert required in names, required


def test_gen_docs_check_mode_reports_a_stale_file(tmp_path: Path) -> None:
    module: Any = gen_docs()
    original = module.METRICS
    try:
        stale = tmp_path / "metrics.md"
        stale.write_text("old\n")
        module.METRICS = stale
        assert module.main(["--check"]) == 1
        assert stale.read_text() == "old\n"
    finally:
        module.METRICS = original


# ------------------------------------------------------------------------------ alerts

PROMQL_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
    "bool", "offset", "inf", "nan",
}


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (strings, label matchers, ranges, grouping
    clauses and function calls removed)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    e = re.sub(r"\{[^}]*\}", " ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    names = set()
    for m in re.finditer(r"(?<![\w.])[a-zA-Z_:][a-zA-Z0-9_:]*", e):
        if e[m.end():].lstrip().startswith("("):
            continue  # a function or an aggregation
        if m.group(0).lower() in PROMQL_KEYWORDS:
            continue
        names.add(m.group(0))
    return names


def alert_rules() -> list[Obj]:
    doc = yaml.safe_load((DOCS / "alerts.yaml").read_text())
    assert set(doc) == {"groups"}
    rules = []
    for group in doc["groups"]:
        assert set(group) <= {"name", "interval", "rules"} and group["name"]
        rules += group["rules"]
    return rules


def test_promql_name_extraction() -> None:
    expr = ('sum by (instance, code) (rate(kms_plugin_requests_total{method="Decrypt", '
            'code!="OK"}[5m])) > 0 and on (instance) nrm_x == 1 or vector(0)')
    assert promql_metric_names(expr) == {"kms_plugin_requests_total", "nrm_x"}


def test_alert_rules_are_valid_prometheus_rules() -> None:
    names = set()
    for rule in alert_rules():
        assert set(rule) <= {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}
        assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", rule["alert"]), rule["alert"]
        assert rule["alert"] not in names, f"duplicate alert {rule['alert']}"
        names.add(rule["alert"])
        assert isinstance(rule["expr"], str) and rule["expr"].strip()
        assert rule["expr"].count("(") == rule["expr"].count(")"), rule["alert"]
        assert rule["expr"].count("{") == rule["expr"].count("}"), rule["alert"]
        assert re.fullmatch(r"(\d+[smhdwy])+", str(rule.get("for", "0m"))), rule["alert"]
        assert rule["labels"]["severity"] in ("info", "warning", "critical")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_alert_rules_use_only_metrics_that_exist() -> None:
    exposed = gen_docs().all_exposed_names()
    documented = set(re.findall(r"`([a-z_:][a-z0-9_:]*)`", (DOCS / "metrics.md").read_text()))
    for rule in alert_rules():
        used = promql_metric_names(rule["expr"])
        assert used, f"{rule['alert']} selects no metric"
        assert used <= exposed, f"{rule['alert']}: no such metric {used - exposed}"
        families = {re.sub(r"_(bucket|sum|count)$", "", n) for n in used}
        assert families <= documented | used & documented, (
            f"{rule['alert']}: not in metrics.md {families - documented}")


def test_alert_rules_cover_the_failures_operators_must_hear_about() -> None:
    exprs = {rule["alert"]: rule["expr"] for rule in alert_rules()}
    wanted = {
        "VG almost full": "vg_free_bytes",
        "KMS backend down": "kms_plugin_backend_reachable",
        "root key disabled": "kms_plugin_root_key_unusable",
        "reconcile failing": "nrm_reconcile_errors_total",
    }
    for what, metric in wanted.items():
        assert any(metric in e for e in exprs.values()), f"no alert for {what}"


# ------------------------------------------------------------------------------ operations guide


def _parsers() -> dict[str, argparse.ArgumentParser]:
    from csi_lvm.config import CsiConfig
    from kms_plugin.cli import build_parser
    from node_resource_manager.config import NrmConfig

    out = {}
    for prog, cls in (("csi-lvm", CsiConfig), ("node-resource-manager", NrmConfig)):
        parser = argparse.ArgumentParser(prog=prog, add_help=False)
        add_arguments(parser, cls)
        out[prog] = parser
    kms = build_parser()
    for action in kms._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out[f"kms-plugin {name}"] = sub
    return out


def command_lines(text: str) -> list[str]:
    """Shell command lines of the doc: fenced `sh` blocks (continuations joined) and inline
    code spans that start with one of our commands."""
    out = []
    for block in re.findall(r"```(?:sh|bash)\n(.*?)```", text, flags=re.S):
        out += [line for line in block.replace("\\\n", " ").splitlines()
                if line.strip() and not line.strip().startswith("#")]
    out += re.findall(r"`((?:csi-lvm|node-resource-manager|kms-plugin)\s[^`]+)`", text)
    return out


def invocations(line: str) -> list[tuple[str, list[str]]]:
    """(command, its flags) for each of our commands in a shell line."""
    line = line.split(" # ", 1)[0]
    words = shlex.split(line.replace("|", " | ").replace(";", " ; "), posix=True)
    out = []
    for i, word in enumerate(words):
        word = "kms-plugin" if word == "kms_plugin" else word  # the guide's ctr wrapper
        if word not in ("csi-lvm", "node-resource-manager", "kms-plugin"):
            continue
        if words[i + 1:i + 2] == ["$@"]:
            continue  # the wrapper's own body passes its arguments through
        rest = []
        for w in words[i + 1:]:
            if w in ("|", ";", "&&", "||", ">", "<"):
                break
            rest.append(w)
        command = word
        if word == "kms-plugin" and rest and not rest[0].startswith("-"):
            command = f"kms-plugin {rest[0]}"
            rest = rest[1:]
        # `--` ends the options (kubectl exec ... -- CMD): it is not a flag
        out.append((command, [w.split("=", 1)[0] for w in rest if w.startswith("--")
                              and w != "--"]))
    return out


@pytest.mark.parametrize("doc", ["operations.md", "architecture.md"])
def test_commands_in_the_docs_use_flags_the_code_knows(doc: str) -> None:
    parsers = _parsers()
    found = 0
    for line in command_lines((DOCS / doc).read_text()):
        for command, flags in invocations(line):
            if command == "kms-plugin":
                continue  # a bare mention; the sub-commands are checked where they appear
            assert command in parsers, f"{doc}: unknown command `{command}` in: {line}"
            known = {s for a in parsers[command]._actions for s in a.option_strings}
            known |= {"--version", "--help"}
            for f in flags:
                assert f in known, f"{doc}: `{command}` has no flag {f} (in: {line})"
            found += 1
    if doc == "operations.md":
        assert found >= 8, "the command scanner found suspiciously few commands"


def test_command_scanner_sees_a_wrong_flag() -> None:
    (call,) = invocations("kubectl exec x -- kms-plugin rotate --local-keyrng /k | cat")
    assert call == ("kms-plugin rotate", ["--local-keyrng"])
    known = {s for a in _parsers()["kms-plugin rotate"]._actions for s in a.option_strings}
    assert "--local-keyrng" not in known


def test_ports_in_the_docs_are_the_manifests_ports(
    base: tuple[Obj, ...], kms: tuple[Obj, ...]
) -> None:
    from tests.deploy.commands import our_config

    ds = one(base, "DaemonSet", "csi-lvm-node")
    ports = {c["name"]: [p["containerPort"] for p in c.get("ports", [])] for c in containers(ds)}
    ops = (DOCS / "operations.md").read_text()
    arch = (DOCS / "architecture.md").read_text()
    for name, row in (("csi-lvm", "| csi-lvm |"), ("node-resource-manager",
                                                    "| node-resource-manager |")):
        (port,) = ports[name]
        line = next(line for line in ops.splitlines() if line.startswith(row))
        assert f"`{port}`" in line, f"operations.md gives another port for {name}"
    for number in (p for numbers in ports.values() for p in numbers):
        assert str(number) in arch, f"architecture.md does not mention port {number}"
    kms_cfg = our_config(container(one(kms, "Pod", "kms-plugin"), "kms-plugin"))
    line = next(line for line in ops.splitlines() if line.startswith("| kms-plugin |"))
    assert f"`{kms_cfg.metrics_port}`" in line and kms_cfg.metrics_address in line
