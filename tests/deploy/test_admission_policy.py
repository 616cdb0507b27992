"""The ValidatingAdmissionPolicy that confines the storage node agent's `nodes patch` to its own
Node's status annotation: rendered from deploy/, its CEL expressions evaluated offline
(cel-python) on sample requests the way kube-apiserver evaluates a policy (match constraints,
match conditions, variables, validations; an expression that errors denies: failurePolicy
Fail). The agent's real status patch (KubeSink) is one of the samples."""

from __future__ import annotations

import copy
import json
from typing import Any

import celpy
import pytest

from node_resource_manager.config import DEFAULT_STATUS_ANNOTATION
from node_resource_manager.kube import KubeSink
from tests.deploy.commands import our_config
from tests.deploy.manifests import Obj, container, one, pod_spec
from tests.rigs.fake_kube import merge_patch

POLICY = "csi-lvm-node-own-node-status"
NODE_NAME_EXTRA = "authentication.kubernetes.io/node-name"

_ENV = celpy.Environment()


def cel(expr: str, activation: dict[str, Any]) -> Any:
    program = _ENV.program(_ENV.compile(expr))
    result = program.evaluate({k: celpy.json_to_cel(v) for k, v in activation.items()})
    if isinstance(result, celpy.CELEvalError):
        raise result
    return result


def admit(policy: Obj, request: dict[str, Any]) -> tuple[bool, str]:
    """kube-apiserver's decision for one request: (admitted, message)."""
    spec = policy["spec"]
    attrs = request["_attributes"]
    applies = any(
        attrs["group"] in rule["apiGroups"] and attrs["resource"] in rule["resources"]
        and request["operation"] in rule["operations"] and not attrs.get("subresource")
        for rule in spec["matchConstraints"]["resourceRules"])
    if not applies:
        return True, "not matched"
    act: dict[str, Any] = {"request": {k: v for k, v in request.items() if k != "_attributes"},
                           "object": request["object"], "oldObject": request["oldObject"]}
    try:
        for cond in spec.get("matchConditions", []):
            if not cel(cond["expression"], act):
                return True, f"match condition {cond['name']} is false"
        variables: dict[str, Any] = {}
        for var in spec.get("variables", []):
            variables[var["name"]] = cel(var["expression"], {**act, "variables": variables})
        act["variables"] = variables
        for rule in spec["validations"]:
            if not cel(rule["expression"], act):
                if "messageExpression" in rule:
                    return False, str(cel(rule["messageExpression"], act))
                return False, str(rule["message"])
    except Exception as exc:  # failurePolicy: Fail
        assert spec["failurePolicy"] == "Fail"
        return False, f"evaluation error: {exc}"
    return True, "admitted"


def node(name: str = "edge-node-1", **meta: Any) -> dict[str, Any]:
    base = {"name": name, "uid": "u-1", "resourceVersion": "10",
            "labels": {"kubernetes.io/hostname": name,
                       "alibabacloud.com/edge-enable-localstorage": "true"},
            "annotations": {"node.alpha.kubernetes.io/ttl": "0"}}
    base.update(meta)
    return {"apiVersion": "v1", "kind": "Node", "metadata": base,
            "spec": {"podCIDR": "10.244.1.0/24"}}


def update(old: dict[str, Any], new: dict[str, Any], *, user: str | None = None,
           node_name: str | None = "edge-node-1") -> dict[str, Any]:
    extra = {NODE_NAME_EXTRA: [node_name]} if node_name is not None else {}
    extra["authentication.kubernetes.io/pod-name"] = ["csi-lvm-node-x1"]
    return {
        "_attributes": {"group": "", "resource": "nodes"},
        "operation": "UPDATE", "name": new["metadata"]["name"],
        "userInfo": {"username": user or "system:serviceaccount:kube-system:csi-lvm-node",
                     "groups": ["system:serviceaccounts", "system:authenticated"],
                     "extra": extra},
        "object": new, "oldObject": old,
    }


class _RecordingApi:
    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []

    def request(self, method: str, path: str, **kw: Any) -> dict[str, Any]:
        assert method == "PATCH" and path == "/api/v1/nodes/edge-node-1"
        self.bodies.append(kw["body"])
        return {}


def agent_status_patch() -> dict[str, Any]:
    """The merge patch the agent's KubeSink really sends."""
    api = _RecordingApi()
    sink = KubeSink(api, node_name="edge-node-1",  # type: ignore[arg-type]
                    annotation=DEFAULT_STATUS_ANNOTATION)
    sink.status({"version": 1, "result": "Converged", "volumeGroups": []})
    (body,) = api.bodies
    return body


@pytest.fixture
def policy(base: tuple[Obj, ...]) -> Obj:
    return one(base, "ValidatingAdmissionPolicy", POLICY)


def test_policy_is_bound_to_deny_and_names_the_daemonsets_account_and_annotation(
    base: tuple[Obj, ...], policy: Obj
) -> None:
    binding = one(base, "ValidatingAdmissionPolicyBinding", POLICY)
    assert binding["spec"]["policyName"] == POLICY
    assert binding["spec"]["validationActions"] == ["Deny"]
    ds = one(base, "DaemonSet", "csi-lvm-node")
    account = (f"system:serviceaccount:{ds['metadata']['namespace']}:"
               f"{pod_spec(ds)['serviceAccountName']}")
    (condition,) = policy["spec"]["matchConditions"]
    assert f"'{account}'" in condition["expression"]
    status_key = next(v for v in policy["spec"]["variables"] if v["name"] == "statusKey")
    agent = our_config(container(ds, "node-resource-manager"))
    assert cel(status_key["expression"], {}) == agent.status_annotation
    assert agent.status_annotation == DEFAULT_STATUS_ANNOTATION


def test_the_agents_own_status_patch_is_admitted(policy: Obj) -> None:
    patch = agent_status_patch()
    for old in (node(), node(annotations=None)):  # first write: no annotations yet
        old = {**old, "metadata": {k: v for k, v in old["metadata"].items() if v is not None}}
        new = merge_patch(old, patch)
        assert new["metadata"]["annotations"][DEFAULT_STATUS_ANNOTATION]
        assert admit(policy, update(old, new)) == (True, "admitted")
    # An unchanged re-write (heartbeat) too.
    written = merge_patch(node(), patch)
    assert admit(policy, update(written, copy.deepcopy(written)))[0]


def test_another_node_is_refused_with_a_clear_message(policy: Obj) -> None:
    old = node("edge-node-2")
    new = merge_patch(old, agent_status_patch())
    allowed, message = admit(policy, update(old, new))
    assert not allowed
    assert message == ('the storage node agent may change only its own Node (credentials name '
                       'node "edge-node-1"), not edge-node-2')


def test_credentials_without_a_node_name_are_refused(policy: Obj) -> None:
    """A legacy (secret-based) token or a token not bound to a pod names no node."""
    old = node()
    new = merge_patch(old, agent_status_patch())
    assert not admit(policy, update(old, new, node_name=None))[0]


@pytest.mark.parametrize("change,expected", [
    (lambda n: n["metadata"]["labels"].update(role="gateway"), "labels"),
    (lambda n: n["metadata"]["labels"].pop("kubernetes.io/hostname"), "labels"),
    (lambda n: n["metadata"].pop("labels"), "labels"),
    (lambda n: n["spec"].update(taints=[{"key": "x", "effect": "NoSchedule"}]), "spec"),
    (lambda n: n["spec"].update(unschedulable=True), "spec"),
    (lambda n: n["metadata"]["annotations"].update(other="1"), "annotation"),
    (lambda n: n["metadata"]["annotations"].update({"node.alpha.kubernetes.io/ttl": "5"}),
     "annotation"),
    (lambda n: n["metadata"]["annotations"].pop("node.alpha.kubernetes.io/ttl"), "annotation"),
    (lambda n: n["metadata"].update(finalizers=["x/y"]), "finalizers"),
])
def test_anything_but_the_status_annotation_is_refused_even_on_its_own_node(
    policy: Obj, change: Any, expected: str
) -> None:
    old = node()
    new = merge_patch(old, agent_status_patch())
    change(new)
    allowed, message = admit(policy, update(old, new))
    assert not allowed and expected in message, message


def test_other_callers_and_subresources_are_not_this_policys_business(policy: Obj) -> None:
    old = node()
    relabelled = copy.deepcopy(old)
    relabelled["metadata"]["labels"]["role"] = "gateway"
    assert admit(policy, update(old, relabelled, user="system:node:edge-node-1"))[0]
    assert admit(policy, update(old, relabelled, user="kubernetes-admin"))[0]
    status = update(old, relabelled)
    status["_attributes"]["subresource"] = "status"
    assert admit(policy, status) == (True, "not matched")


def test_the_evaluator_refuses_what_errors(policy: Obj) -> None:
    """failurePolicy Fail: a request the expressions cannot evaluate is denied (this also
    shows the evaluator really runs the validations)."""
    old = node()
    new = merge_patch(old, agent_status_patch())
    broken = update(old, new)
    del broken["object"]["metadata"]["name"]
    allowed, message = admit(policy, broken)
    assert not allowed and message.startswith("evaluation error"), message
    assert json.dumps(policy["spec"]["validations"])  # rendered as plain data
