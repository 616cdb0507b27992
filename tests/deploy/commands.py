"""Parse a container's command line with the service's own option parser, as the process would."""

from __future__ import annotations

import argparse
import re
from typing import Any

from edge_common.config import add_arguments, resolve
from tests.deploy.manifests import Obj

# Values the kubelet would put into $(VAR) references (downward API fields).
FIELD_VALUES = {
    "spec.nodeName": "edge-node-1",
    "metadata.name": "pod-1",
    "metadata.namespace": "kube-system",
    "status.podIP": "10.0.0.1",
    "status.hostIP": "192.0.2.1",
}


def _container_env(c: Obj) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in c.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
        elif "fieldRef" in item.get("valueFrom", {}):
            env[item["name"]] = FIELD_VALUES[item["valueFrom"]["fieldRef"]["fieldPath"]]
    return env


def expanded_argv(c: Obj) -> list[str]:
    """command + args with $(VAR) expanded from the container's env, as kubelet does."""
    env = _container_env(c)

    def sub(arg: str) -> str:
        return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                      lambda m: env.get(m.group(1), m.group(0)), arg)

    return [sub(str(a)) for a in list(c.get("command", [])) + list(c.get("args", []))]


def _config_class(argv: list[str]) -> tuple[type, str, list[str]]:
    from csi_lvm.config import ENV_PREFIX as CSI_PREFIX
    from csi_lvm.config import CsiConfig
    from kms_plugin.config import ENV_PREFIX as KMS_PREFIX
    from kms_plugin.config import PluginConfig
    from node_resource_manager.config import ENV_PREFIX as NRM_PREFIX
    from node_resource_manager.config import NrmConfig

    prog, rest = argv[0], argv[1:]
    if prog == "csi-lvm":
        return CsiConfig, CSI_PREFIX, rest
    if prog == "node-resource-manager":
        return NrmConfig, NRM_PREFIX, rest
    if prog == "kms-plugin":
        assert rest and rest[0] == "serve", f"kms-plugin runs `serve` in a pod, not {rest[:1]}"
        return PluginConfig, KMS_PREFIX, rest[1:]
    raise AssertionError(f"not one of our commands: {prog}")


def _resolved(c: Obj, argv: list[str]) -> Any:
    cls, prefix, rest = _config_class(argv)
    parser = argparse.ArgumentParser(prog=argv[0], add_help=False)
    add_arguments(parser, cls)
    ns, unknown = parser.parse_known_args(rest)
    assert not unknown, f"{c['name']}: flags {argv[0]} does not know: {unknown}"
    environ = {k: v for k, v in _container_env(c).items() if k.startswith(prefix)}
    return resolve(cls, ns, env_prefix=prefix, environ=environ)


def our_config(c: Obj) -> Any:
    """The config object the container's process builds from its flags and environment; an
    AssertionError names any flag the code does not know or any value it refuses."""
    return _resolved(c, expanded_argv(c))


def exec_config(c: Obj, *argv: str) -> Any:
    """The config of `kubectl exec POD -c NAME -- ARGV...`: the container's environment (an
    exec'd process inherits it) with only the flags typed on the command line."""
    return _resolved(c, list(argv))


def is_ours(c: Obj) -> bool:
    command = c.get("command") or []
    return bool(command) and command[0] in ("csi-lvm", "node-resource-manager", "kms-plugin")
