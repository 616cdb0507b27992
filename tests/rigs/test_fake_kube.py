"""The fake Kubernetes API server, pinned through the official ``kubernetes`` client."""

from __future__ import annotations

import datetime
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import urllib3
from kubernetes import client, config, dynamic, watch

from tests.rigs.fake_kube import FakeKubeServer, LabelSelector

NS = "kube-system"


@pytest.fixture
def core(fake_kube: FakeKubeServer) -> Any:
    """A ``CoreV1Api`` on the fake (typed ``Any``: the models' fields are all optional)."""
    return client.CoreV1Api(fake_kube.api_client())


def _configmap(name: str, labels: dict[str, str] | None = None, **data: str) -> Any:
    return client.V1ConfigMap(
        metadata=client.V1ObjectMeta(name=name, labels=labels), data=data or None
    )


def _status(err: client.ApiException) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(err.body or "{}")
    return body


def _stream_until(func: Any, *args: Any, marker: str, **kwargs: Any) -> list[tuple[str, str]]:
    """(type, name) of the events ``Watch().stream`` yields before the ``marker`` object's.

    The changes a test makes end with a change to ``marker``, so the stream can stop there
    instead of waiting for its timeout (30 s: a guard; missing the marker fails the test).
    """
    seen: list[tuple[str, str]] = []
    stream = watch.Watch().stream(func, *args, timeout_seconds=30, **kwargs)
    for event in stream:
        name = event["raw_object"]["metadata"]["name"]
        if name == marker:
            stream.close()
            return seen
        seen.append((event["type"], name))
    raise AssertionError(f"the watch ended before the marker {marker!r}; saw {seen}")


class _Collector:
    """Runs ``Watch().stream(...)`` in a thread and collects (type, name, rv) tuples."""

    def __init__(self, func: Any, *args: Any, **kwargs: Any) -> None:
        self.watch = watch.Watch()
        self.events: list[tuple[str, str, str]] = []
        self.error: BaseException | None = None
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, args=(func, args, kwargs), daemon=True)
        self._thread.start()

    def _run(self, func: Any, args: Any, kwargs: Any) -> None:
        try:
            for event in self.watch.stream(func, *args, **kwargs):
                obj = event["raw_object"]
                with self._cond:
                    self.events.append(
                        (
                            event["type"],
                            obj["metadata"].get("name", ""),
                            obj["metadata"]["resourceVersion"],
                        )
                    )
                    self._cond.notify_all()
        except BaseException as err:  # noqa: BLE001 - reported to the test
            self.error = err

    def wait_for(self, count: int, timeout: float = 10.0) -> list[tuple[str, str, str]]:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.events) >= count, timeout), self.events
            return list(self.events)

    def join(self, timeout: float = 10.0) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive()

    def stop(self, server: FakeKubeServer) -> None:
        self.watch.stop()
        self._thread.join(timeout=1)
        if self._thread.is_alive():
            # Watch.stop() only interrupts a stream it already holds; if it raced with the
            # request, end the stream from the server side (the helper then sees _stop).
            server.close_watches()
            self._thread.join(timeout=10)
        assert not self._thread.is_alive()


@pytest.fixture
def collectors(fake_kube: FakeKubeServer) -> Iterator[list[_Collector]]:
    started: list[_Collector] = []
    yield started
    for collector in started:
        collector.stop(fake_kube)


# ---------------------------------------------------------------------------------------------
# CRUD, 404, 409
# ---------------------------------------------------------------------------------------------


def test_create_returns_object_with_uid_timestamp_and_resource_version(
    core: Any,
) -> None:
    created = core.create_namespaced_config_map(NS, _configmap("topo", k="v"))

    assert created.metadata.uid
    assert created.metadata.creation_timestamp is not None
    assert created.metadata.namespace == NS
    fetched = core.read_namespaced_config_map("topo", NS)
    assert fetched.data == {"k": "v"}
    assert fetched.metadata.resource_version == created.metadata.resource_version


def test_get_of_missing_object_is_404_not_found_status(core: Any) -> None:
    with pytest.raises(client.ApiException) as caught:
        core.read_namespaced_config_map("absent", NS)

    assert caught.value.status == 404
    status = _status(caught.value)
    assert status["kind"] == "Status"
    assert status["reason"] == "NotFound"
    assert status["details"] == {"name": "absent", "kind": "configmaps"}


def test_create_of_existing_name_is_409_already_exists(core: Any) -> None:
    core.create_namespaced_config_map(NS, _configmap("topo"))

    with pytest.raises(client.ApiException) as caught:
        core.create_namespaced_config_map(NS, _configmap("topo"))

    assert caught.value.status == 409
    assert _status(caught.value)["reason"] == "AlreadyExists"


def test_same_name_in_another_namespace_is_a_different_object(core: Any) -> None:
    core.create_namespaced_config_map(NS, _configmap("topo", k="a"))
    core.create_namespaced_config_map("default", _configmap("topo", k="b"))

    assert core.read_namespaced_config_map("topo", NS).data == {"k": "a"}
    assert core.read_namespaced_config_map("topo", "default").data == {"k": "b"}


def test_update_with_stale_resource_version_is_409_conflict(core: Any) -> None:
    stale = core.create_namespaced_config_map(NS, _configmap("topo", k="1"))
    fresh = core.read_namespaced_config_map("topo", NS)
    fresh.data = {"k": "2"}
    updated = core.replace_namespaced_config_map("topo", NS, fresh)
    assert int(updated.metadata.resource_version) > int(stale.metadata.resource_version)

    stale.data = {"k": "3"}
    with pytest.raises(client.ApiException) as caught:
        core.replace_namespaced_config_map("topo", NS, stale)

    assert caught.value.status == 409
    assert _status(caught.value)["reason"] == "Conflict"
    assert core.read_namespaced_config_map("topo", NS).data == {"k": "2"}


def test_update_without_resource_version_is_unconditional(core: Any) -> None:
    core.create_namespaced_config_map(NS, _configmap("topo", k="1"))

    core.replace_namespaced_config_map("topo", NS, _configmap("topo", k="2"))

    assert core.read_namespaced_config_map("topo", NS).data == {"k": "2"}


def test_update_of_missing_object_is_404(core: Any) -> None:
    with pytest.raises(client.ApiException) as caught:
        core.replace_namespaced_config_map("absent", NS, _configmap("absent"))

    assert caught.value.status == 404


def test_resource_version_increments_globally_across_resources(
    fake_kube: FakeKubeServer, core: Any
) -> None:
    first = core.create_namespaced_config_map(NS, _configmap("a"))
    node = core.create_node(client.V1Node(metadata=client.V1ObjectMeta(name="n1")))
    second = core.create_namespaced_config_map("default", _configmap("b"))

    versions = [
        int(first.metadata.resource_version),
        int(node.metadata.resource_version),
        int(second.metadata.resource_version),
    ]
    assert versions == sorted(set(versions))
    assert fake_kube.resource_version == versions[-1]


def test_a_no_op_patch_keeps_the_resource_version(core: Any) -> None:
    created = core.create_namespaced_config_map(NS, _configmap("topo", labels={"a": "1"}))

    patched = core.patch_namespaced_config_map("topo", NS, {"metadata": {"labels": {"a": "1"}}})

    assert patched.metadata.resource_version == created.metadata.resource_version


def test_delete_removes_the_object_and_returns_success_status(core: Any) -> None:
    core.create_namespaced_config_map(NS, _configmap("topo"))

    result = core.delete_namespaced_config_map("topo", NS)

    assert result["status"] == "Success"
    with pytest.raises(client.ApiException) as caught:
        core.read_namespaced_config_map("topo", NS)
    assert caught.value.status == 404
    with pytest.raises(client.ApiException) as caught:
        core.delete_namespaced_config_map("topo", NS)
    assert caught.value.status == 404


def test_delete_with_stale_resource_version_precondition_is_409(core: Any) -> None:
    created = core.create_namespaced_config_map(NS, _configmap("topo"))
    core.patch_namespaced_config_map("topo", NS, {"data": {"k": "changed"}})

    with pytest.raises(client.ApiException) as caught:
        core.delete_namespaced_config_map(
            "topo",
            NS,
            body=client.V1DeleteOptions(
                preconditions=client.V1Preconditions(
                    resource_version=created.metadata.resource_version
                )
            ),
        )

    assert caught.value.status == 409
    assert core.read_namespaced_config_map("topo", NS).data == {"k": "changed"}


def test_invalid_label_value_is_422_invalid(core: Any) -> None:
    with pytest.raises(client.ApiException) as caught:
        core.create_namespaced_config_map(NS, _configmap("topo", labels={"a": "not valid!"}))

    assert caught.value.status == 422
    assert _status(caught.value)["reason"] == "Invalid"


def test_invalid_object_name_is_422_invalid(core: Any) -> None:
    with pytest.raises(client.ApiException) as caught:
        core.create_namespaced_config_map(NS, _configmap("Upper_Case"))

    assert caught.value.status == 422


def test_annotation_value_that_is_not_a_string_is_400(fake_kube: FakeKubeServer, core: Any) -> None:
    fake_kube.put_node("n1")

    with pytest.raises(client.ApiException) as caught:
        core.patch_node("n1", {"metadata": {"annotations": {"summary": {"vgs": []}}}})

    assert caught.value.status == 400


# ---------------------------------------------------------------------------------------------
# Patch flavours and the status subresource
# ---------------------------------------------------------------------------------------------


def test_strategic_merge_patch_merges_labels_and_null_removes_one(
    fake_kube: FakeKubeServer, core: Any
) -> None:
    fake_kube.put_node("n1", labels={"keep": "1", "drop": "1"}, annotations={"a": "1"})

    core.patch_node("n1", {"metadata": {"labels": {"drop": None, "new": "2"}}})

    node = core.read_node("n1")
    assert node.metadata.labels == {"keep": "1", "new": "2"}
    assert node.metadata.annotations == {"a": "1"}
    assert fake_kube.requests[-2].content_type == "application/strategic-merge-patch+json"


def test_merge_patch_sets_an_annotation(fake_kube: FakeKubeServer, core: Any) -> None:
    fake_kube.put_node("n1", annotations={"other": "x"})

    core.patch_node(
        "n1",
        {"metadata": {"annotations": {"summary": '{"vgs": []}'}}},
        _content_type="application/merge-patch+json",
    )

    assert core.read_node("n1").metadata.annotations == {"other": "x", "summary": '{"vgs": []}'}
    assert fake_kube.count("patch", "nodes", name="n1") == 1
    assert fake_kube.requests[-2].content_type == "application/merge-patch+json"


def test_json_patch_adds_and_tests_values(fake_kube: FakeKubeServer, core: Any) -> None:
    fake_kube.put_node("n1", labels={"a": "1"})

    core.patch_node(
        "n1",
        [
            {"op": "test", "path": "/metadata/labels/a", "value": "1"},
            {"op": "add", "path": "/metadata/labels/b", "value": "2"},
        ],
    )
    assert core.read_node("n1").metadata.labels == {"a": "1", "b": "2"}

    with pytest.raises(client.ApiException) as caught:
        core.patch_node("n1", [{"op": "test", "path": "/metadata/labels/a", "value": "other"}])
    assert caught.value.status == 422


def test_patch_carrying_a_stale_resource_version_is_409(core: Any) -> None:
    created = core.create_namespaced_config_map(NS, _configmap("topo"))
    core.patch_namespaced_config_map("topo", NS, {"data": {"k": "1"}})

    with pytest.raises(client.ApiException) as caught:
        core.patch_namespaced_config_map(
            "topo",
            NS,
            {
                "metadata": {"resourceVersion": created.metadata.resource_version},
                "data": {"k": "2"},
            },
        )

    assert caught.value.status == 409


def test_patch_of_missing_object_is_404(core: Any) -> None:
    with pytest.raises(client.ApiException) as caught:
        core.patch_node("absent", {"metadata": {"labels": {"a": "b"}}})

    assert caught.value.status == 404


def test_node_status_changes_only_through_the_status_subresource(
    fake_kube: FakeKubeServer, core: Any
) -> None:
    fake_kube.put_node("n1")

    core.patch_node(
        "n1", {"status": {"capacity": {"cpu": "4"}}, "spec": {"podCIDR": "10.0.0.0/24"}}
    )
    node = core.read_node("n1")
    assert node.status.capacity is None
    assert node.spec.pod_cidr == "10.0.0.0/24"

    core.patch_node_status("n1", {"status": {"capacity": {"cpu": "4"}}, "spec": {"podCIDR": "x"}})
    node = core.read_node("n1")
    assert node.status.capacity == {"cpu": "4"}
    assert node.spec.pod_cidr == "10.0.0.0/24"


# ---------------------------------------------------------------------------------------------
# Selectors and lists
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("", {"both", "only-a", "a-other", "none"}),
        ("a=1", {"both", "only-a"}),
        ("a==1", {"both", "only-a"}),
        ("a!=1", {"a-other", "none"}),
        ("a in (1,2)", {"both", "only-a", "a-other"}),
        ("a notin (1)", {"a-other", "none"}),
        ("a", {"both", "only-a", "a-other"}),
        ("!a", {"none"}),
        ("a=1,b=x", {"both"}),
        ("a in (1, 2),!b", {"only-a", "a-other"}),
        ("edge.example.com/enabled=true", {"none"}),
    ],
)
def test_label_selector_on_list(
    fake_kube: FakeKubeServer, core: Any, selector: str, expected: set[str]
) -> None:
    fake_kube.put_node("both", labels={"a": "1", "b": "x"})
    fake_kube.put_node("only-a", labels={"a": "1"})
    fake_kube.put_node("a-other", labels={"a": "2"})
    fake_kube.put_node("none", labels={"edge.example.com/enabled": "true"})

    listed = core.list_node(label_selector=selector)

    assert {item.metadata.name for item in listed.items} == expected


@pytest.mark.parametrize("selector", ["a in ()", "a=(", "=1", "a<b"])
def test_malformed_label_selector_is_400(core: Any, selector: str) -> None:
    with pytest.raises(client.ApiException) as caught:
        core.list_node(label_selector=selector)

    assert caught.value.status == 400


def test_label_selector_numeric_comparison() -> None:
    assert LabelSelector.parse("gen>3").matches({"gen": "4"})
    assert not LabelSelector.parse("gen>3").matches({"gen": "3"})
    assert not LabelSelector.parse("gen<3").matches({})


def test_field_selector_on_metadata_name(fake_kube: FakeKubeServer, core: Any) -> None:
    fake_kube.put_node("n1")
    fake_kube.put_node("n2")

    assert [n.metadata.name for n in core.list_node(field_selector="metadata.name=n2").items] == [
        "n2"
    ]
    assert [n.metadata.name for n in core.list_node(field_selector="metadata.name!=n2").items] == [
        "n1"
    ]


def test_list_carries_the_collection_resource_version(fake_kube: FakeKubeServer, core: Any) -> None:
    fake_kube.set_configmap(NS, "topo", {"k": "v"})
    fake_kube.put_node("n1")

    listed = core.list_namespaced_config_map(NS)

    assert listed.metadata.resource_version == str(fake_kube.resource_version)
    assert [item.metadata.name for item in listed.items] == ["topo"]


def test_list_across_namespaces(fake_kube: FakeKubeServer, core: Any) -> None:
    fake_kube.set_configmap("a", "one", {})
    fake_kube.set_configmap("b", "two", {})

    listed = core.list_config_map_for_all_namespaces()

    assert {(i.metadata.namespace, i.metadata.name) for i in listed.items} == {
        ("a", "one"),
        ("b", "two"),
    }


def test_exact_list_at_an_old_resource_version_shows_the_old_state_until_compacted(
    fake_kube: FakeKubeServer, core: Any
) -> None:
    old = fake_kube.set_configmap(NS, "topo", {"k": "old"})
    fake_kube.set_configmap(NS, "topo", {"k": "new"})
    fake_kube.set_configmap(NS, "later", {})
    old_rv = old["metadata"]["resourceVersion"]

    listed = core.list_namespaced_config_map(
        NS, resource_version=old_rv, resource_version_match="Exact"
    )
    assert [(i.metadata.name, i.data) for i in listed.items] == [("topo", {"k": "old"})]
    assert listed.metadata.resource_version == old_rv

    fake_kube.compact()
    with pytest.raises(client.ApiException) as caught:
        core.list_namespaced_config_map(NS, resource_version=old_rv, resource_version_match="Exact")
    assert caught.value.status == 410
    assert _status(caught.value)["reason"] == "Expired"


# ---------------------------------------------------------------------------------------------
# Watch
# ---------------------------------------------------------------------------------------------


def test_watch_from_a_resource_version_receives_only_later_events(
    fake_kube: FakeKubeServer, core: Any
) -> None:
    fake_kube.set_configmap(NS, "before", {})
    start = core.list_namespaced_config_map(NS).metadata.resource_version
    fake_kube.set_configmap(NS, "after", {"k": "1"})
    fake_kube.set_configmap(NS, "after", {"k": "2"})
    fake_kube.delete_configmap(NS, "before")
    fake_kube.set_configmap("elsewhere", "ignored", {})
    fake_kube.set_configmap(NS, "end", {})

    seen = _stream_until(core.list_namespaced_config_map, NS, resource_version=start, marker="end")

    assert seen == [("ADDED", "after"), ("MODIFIED", "after"), ("DELETED", "before")]


def test_watch_without_resource_version_starts_with_the_current_state(
    fake_kube: FakeKubeServer, core: Any
) -> None:
    fake_kube.put_node("n1")
    fake_kube.put_node("n2")
    fake_kube.put_node("n1", labels={"changed": "yes"})
    fake_kube.put_node("zz-end")

    seen = _stream_until(core.list_node, marker="zz-end")

    assert seen == [("ADDED", "n1"), ("ADDED", "n2")]


def test_live_watch_receives_changes_made_after_it_started(
    fake_kube: FakeKubeServer, core: Any, collectors: list[_Collector]
) -> None:
    rv = core.list_namespaced_config_map(NS).metadata.resource_version
    collector = _Collector(core.list_namespaced_config_map, NS, resource_version=rv)
    collectors.append(collector)
    fake_kube.wait_for_watch("configmaps")

    fake_kube.set_configmap(NS, "topo", {"k": "1"})
    core.patch_namespaced_config_map("topo", NS, {"data": {"k": "2"}})

    events = collector.wait_for(2)
    assert [(t, n) for t, n, _ in events] == [("ADDED", "topo"), ("MODIFIED", "topo")]
    assert int(events[1][2]) == fake_kube.resource_version


def test_watch_with_field_selector_sees_only_its_node(
    fake_kube: FakeKubeServer, core: Any, collectors: list[_Collector]
) -> None:
    fake_kube.put_node("mine")
    fake_kube.put_node("other")
    collector = _Collector(core.list_node, field_selector="metadata.name=mine")
    collectors.append(collector)
    collector.wait_for(1)

    fake_kube.label_node("other", {"x": "1"})
    fake_kube.label_node("mine", {"x": "1"})

    events = collector.wait_for(2)
    assert [(t, n) for t, n, _ in events] == [("ADDED", "mine"), ("MODIFIED", "mine")]


def test_watch_with_label_selector_turns_label_changes_into_added_and_deleted(
    fake_kube: FakeKubeServer, core: Any
) -> None:
    fake_kube.put_node("n1")
    start = str(fake_kube.resource_version)
    fake_kube.label_node("n1", {"storage": "true"})
    fake_kube.label_node("n1", {"zone": "a"})
    fake_kube.label_node("n1", {"storage": None})
    fake_kube.put_node("end", labels={"storage": "true"})

    seen = _stream_until(
        core.list_node, label_selector="storage=true", resource_version=start, marker="end"
    )

    assert seen == [("ADDED", "n1"), ("MODIFIED", "n1"), ("DELETED", "n1")]


def test_watch_from_a_compacted_resource_version_gets_a_410_error_event(
    fake_kube: FakeKubeServer, core: Any
) -> None:
    fake_kube.set_configmap(NS, "topo", {})
    old = str(fake_kube.resource_version)
    fake_kube.set_configmap(NS, "topo", {"k": "1"})
    fake_kube.compact()

    response = core.list_namespaced_config_map(
        NS, watch=True, resource_version=old, timeout_seconds=5, _preload_content=False
    )
    try:
        assert response.status == 200
        lines = [line for line in response.data.decode().splitlines() if line]
    finally:
        response.release_conn()

    assert len(lines) == 1
    event = json.loads(lines[0])
    assert event["type"] == "ERROR"
    assert event["object"]["kind"] == "Status"
    assert event["object"]["code"] == 410
    assert event["object"]["reason"] == "Expired"


def test_watch_helper_raises_410_for_a_compacted_resource_version(
    fake_kube: FakeKubeServer, core: Any
) -> None:
    fake_kube.set_configmap(NS, "topo", {})
    old = str(fake_kube.resource_version)
    fake_kube.set_configmap(NS, "topo", {"k": "1"})
    fake_kube.compact()

    with pytest.raises(client.ApiException) as caught:
        for _ in watch.Watch().stream(core.list_namespaced_config_map, NS, resource_version=old):
            pass

    assert caught.value.status == 410


def test_watch_from_the_current_resource_version_still_works_after_compaction(
    fake_kube: FakeKubeServer, core: Any
) -> None:
    fake_kube.set_configmap(NS, "topo", {})
    fake_kube.compact()
    current = str(fake_kube.resource_version)
    fake_kube.set_configmap(NS, "topo", {"k": "1"})
    fake_kube.set_configmap(NS, "end", {})

    seen = _stream_until(
        core.list_namespaced_config_map, NS, resource_version=current, marker="end"
    )

    assert seen == [("MODIFIED", "topo")]


def test_history_limit_keeps_only_the_newest_changes(fake_kube: FakeKubeServer, core: Any) -> None:
    fake_kube.history_limit = 2
    fake_kube.set_configmap(NS, "a", {})
    too_old = str(fake_kube.resource_version)
    fake_kube.set_configmap(NS, "b", {})
    kept_from = str(fake_kube.resource_version)
    fake_kube.set_configmap(NS, "c", {})
    fake_kube.set_configmap(NS, "d", {})

    seen = _stream_until(
        core.list_namespaced_config_map, NS, resource_version=kept_from, marker="d"
    )
    assert seen == [("ADDED", "c")]
    with pytest.raises(client.ApiException) as caught:
        list(
            watch.Watch().stream(
                core.list_namespaced_config_map, NS, resource_version=too_old, timeout_seconds=1
            )
        )
    assert caught.value.status == 410


def test_watch_ends_when_timeout_seconds_expire(fake_kube: FakeKubeServer, core: Any) -> None:
    fake_kube.put_node("n1")
    start = str(fake_kube.resource_version)

    events = list(watch.Watch().stream(core.list_node, resource_version=start, timeout_seconds=1))

    assert events == []
    fake_kube.wait_for(lambda: fake_kube.watch_count() == 0, what="the watch to end")


def test_watch_sends_a_bookmark_before_its_timeout_when_allowed(
    fake_kube: FakeKubeServer, core: Any
) -> None:
    fake_kube.put_node("n1")
    start = str(fake_kube.resource_version)
    fake_kube.label_node("n1", {"a": "1"})

    events = list(
        watch.Watch().stream(
            core.list_node,
            resource_version=start,
            allow_watch_bookmarks=True,
            timeout_seconds=1,
        )
    )

    assert [e["type"] for e in events] == ["MODIFIED", "BOOKMARK"]
    assert events[-1]["raw_object"]["metadata"]["resourceVersion"] == str(
        fake_kube.resource_version
    )


def test_watch_helper_resumes_after_the_server_closes_the_watch(
    fake_kube: FakeKubeServer, core: Any, collectors: list[_Collector]
) -> None:
    start = str(fake_kube.resource_version)
    collector = _Collector(core.list_node, resource_version=start)
    collectors.append(collector)
    fake_kube.wait_for_watch("nodes")
    fake_kube.put_node("n1")
    collector.wait_for(1)

    assert fake_kube.close_watches("nodes") == 1
    fake_kube.wait_for_requests("watch", "nodes", count=2)
    fake_kube.put_node("n2")

    events = collector.wait_for(2)
    assert [(t, n) for t, n, _ in events] == [("ADDED", "n1"), ("ADDED", "n2")]
    resumed = fake_kube.requests_matching("watch", "nodes")[1]
    assert resumed.query["resourceVersion"] == events[0][2]


def test_expired_watches_reconnect_with_410_and_a_relist_recovers(
    fake_kube: FakeKubeServer, core: Any, collectors: list[_Collector]
) -> None:
    fake_kube.put_node("n1")
    listed = core.list_node()
    collector = _Collector(core.list_node, resource_version=listed.metadata.resource_version)
    collectors.append(collector)
    fake_kube.wait_for_watch("nodes")

    fake_kube.expire_watches()

    collector.join()
    assert isinstance(collector.error, client.ApiException)
    assert collector.error.status == 410
    relisted = core.list_node()
    assert int(relisted.metadata.resource_version) > int(listed.metadata.resource_version)
    fake_kube.put_node("n2")
    seen = _stream_until(
        core.list_node, resource_version=relisted.metadata.resource_version, marker="n2"
    )
    assert seen == []


def test_a_client_closing_its_watch_releases_it_on_the_server(
    fake_kube: FakeKubeServer, core: Any
) -> None:
    response = core.list_node(watch=True, _preload_content=False)
    fake_kube.wait_for_watch("nodes")

    response.close()

    fake_kube.wait_for(lambda: fake_kube.watch_count("nodes") == 0, what="the watch to close")


# ---------------------------------------------------------------------------------------------
# Events (core/v1 and events.k8s.io/v1 are one store)
# ---------------------------------------------------------------------------------------------


def _node_ref(name: str) -> Any:
    return client.V1ObjectReference(kind="Node", name=name, uid=name, api_version="v1")


def test_core_event_about_a_node_is_recorded(fake_kube: FakeKubeServer, core: Any) -> None:
    core.create_namespaced_event(
        "default",
        client.CoreV1Event(
            metadata=client.V1ObjectMeta(generate_name="n1."),
            involved_object=_node_ref("n1"),
            reason="VolumeGroupCreated",
            message="created vg0",
            type="Normal",
            source=client.V1EventSource(component="node-resource-manager", host="n1"),
        ),
    )

    (event,) = fake_kube.events(reason="VolumeGroupCreated", involved_name="n1")
    assert event["message"] == "created vg0"
    assert event["metadata"]["name"].startswith("n1.")


def test_core_event_for_a_node_in_a_non_default_namespace_is_422(
    core: Any,
) -> None:
    with pytest.raises(client.ApiException) as caught:
        core.create_namespaced_event(
            NS,
            client.CoreV1Event(
                metadata=client.V1ObjectMeta(name="n1.1"),
                involved_object=_node_ref("n1"),
                reason="DeviceRejected",
                message="m",
            ),
        )

    assert caught.value.status == 422


def test_events_k8s_io_event_is_visible_as_a_core_event(
    fake_kube: FakeKubeServer, core: Any
) -> None:
    events_api = client.EventsV1Api(fake_kube.api_client())

    created = events_api.create_namespaced_event(
        "default",
        client.EventsV1Event(
            metadata=client.V1ObjectMeta(name="n1.abc"),
            event_time=datetime.datetime.now(datetime.UTC),
            reason="DeviceRejected",
            note="/dev/loop9 carries an ext4 signature",
            type="Warning",
            action="Reconcile",
            reporting_controller="edge.example.com/node-resource-manager",
            reporting_instance="node-resource-manager-n1",
            regarding=_node_ref("n1"),
        ),
    )

    assert created.note == "/dev/loop9 carries an ext4 signature"
    (core_event,) = core.list_namespaced_event("default").items
    assert core_event.message == created.note
    assert core_event.involved_object.name == "n1"
    assert core_event.reporting_component == "edge.example.com/node-resource-manager"
    assert fake_kube.events(reason="DeviceRejected")[0]["type"] == "Warning"
    assert [e.note for e in events_api.list_namespaced_event("default").items] == [created.note]
    assert fake_kube.count("create", "events", group="events.k8s.io") == 1


def test_events_k8s_io_event_without_reporting_controller_is_422(
    fake_kube: FakeKubeServer,
) -> None:
    events_api = client.EventsV1Api(fake_kube.api_client())

    with pytest.raises(client.ApiException) as caught:
        events_api.create_namespaced_event(
            "default",
            client.EventsV1Event(
                metadata=client.V1ObjectMeta(name="n1.abc"),
                event_time=datetime.datetime.now(datetime.UTC),
                reason="DeviceRejected",
                type="Warning",
                action="Reconcile",
                reporting_instance="x",
                regarding=_node_ref("n1"),
            ),
        )

    assert caught.value.status == 422


# ---------------------------------------------------------------------------------------------
# Other resources
# ---------------------------------------------------------------------------------------------


def test_persistent_volume_crud(core: Any) -> None:
    pv = client.V1PersistentVolume(
        metadata=client.V1ObjectMeta(name="pv-1", labels={"vg": "vg0"}),
        spec=client.V1PersistentVolumeSpec(
            capacity={"storage": "1Gi"},
            access_modes=["ReadWriteOnce"],
            csi=client.V1CSIPersistentVolumeSource(
                driver="lvm.csi.example.com", volume_handle="v1"
            ),
        ),
    )
    core.create_persistent_volume(pv)
    core.patch_persistent_volume("pv-1", {"metadata": {"labels": {"vg": "vg1"}}})

    assert core.read_persistent_volume("pv-1").metadata.labels == {"vg": "vg1"}
    listed = core.list_persistent_volume(label_selector="vg=vg1")
    assert [p.metadata.name for p in listed.items] == ["pv-1"]
    deleted = core.delete_persistent_volume("pv-1")
    assert deleted.metadata.name == "pv-1"
    assert core.list_persistent_volume().items == []


def test_csi_storage_capacity_crud(fake_kube: FakeKubeServer) -> None:
    storage: Any = client.StorageV1Api(fake_kube.api_client())
    capacity = client.V1CSIStorageCapacity(
        metadata=client.V1ObjectMeta(name="csisc-1", labels={"csi.storage.k8s.io/drivername": "x"}),
        storage_class_name="lvm",
        capacity="10Gi",
        node_topology=client.V1LabelSelector(match_labels={"kubernetes.io/hostname": "n1"}),
    )

    storage.create_namespaced_csi_storage_capacity(NS, capacity)
    current = storage.read_namespaced_csi_storage_capacity("csisc-1", NS)
    current.capacity = "5Gi"
    storage.replace_namespaced_csi_storage_capacity("csisc-1", NS, current)

    listed = storage.list_namespaced_csi_storage_capacity(
        NS, label_selector="csi.storage.k8s.io/drivername=x"
    )
    assert [(c.metadata.name, c.capacity) for c in listed.items] == [("csisc-1", "5Gi")]
    stored = fake_kube.get("csistoragecapacities.storage.k8s.io", "csisc-1", NS)
    assert stored is not None and stored["capacity"] == "5Gi"
    storage.delete_namespaced_csi_storage_capacity("csisc-1", NS)
    assert storage.list_csi_storage_capacity_for_all_namespaces().items == []


def test_dynamic_client_discovers_the_served_resources(fake_kube: FakeKubeServer) -> None:
    api = dynamic.DynamicClient(fake_kube.api_client())
    configmaps = api.resources.get(api_version="v1", kind="ConfigMap")

    configmaps.create(body={"metadata": {"name": "topo"}, "data": {"k": "v"}}, namespace=NS)

    assert [i.metadata.name for i in configmaps.get(namespace=NS).items] == ["topo"]
    assert client.VersionApi(fake_kube.api_client()).get_code().major == "1"


# ---------------------------------------------------------------------------------------------
# Test helpers: kubeconfig, in-process state, request log, faults
# ---------------------------------------------------------------------------------------------


def test_kubeconfig_file_points_the_client_at_the_fake(
    fake_kube: FakeKubeServer, tmp_path: Path
) -> None:
    fake_kube.put_node("n1")
    path = fake_kube.write_kubeconfig(tmp_path / "kubeconfig")

    api_client: Any = config.new_client_from_config(config_file=str(path))
    try:
        nodes: Any = client.CoreV1Api(api_client).list_node()
        names = [n.metadata.name for n in nodes.items]
    finally:
        api_client.close()

    assert names == ["n1"]


def test_in_process_writes_are_seen_by_the_api(fake_kube: FakeKubeServer, core: Any) -> None:
    fake_kube.set_configmap(NS, "topo", {"volumegroup": "- name: vg0"})
    fake_kube.put_node("n1", labels={"a": "1", "b": "2"})
    fake_kube.put_node("n1", labels={"a": "3"})
    fake_kube.label_node("n1", {"c": "4"})

    assert core.read_namespaced_config_map("topo", NS).data == {"volumegroup": "- name: vg0"}
    assert core.read_node("n1").metadata.labels == {"a": "3", "c": "4"}
    assert fake_kube.delete_configmap(NS, "topo")
    assert fake_kube.configmap(NS, "topo") is None
    assert not fake_kube.delete_configmap(NS, "topo")


def test_request_counters_by_verb_and_resource(fake_kube: FakeKubeServer, core: Any) -> None:
    fake_kube.put_node("n1")
    core.list_node()
    core.list_node(label_selector="a=b")
    core.read_node("n1")
    core.list_namespaced_config_map(NS)

    assert fake_kube.count("list", "nodes") == 2
    assert fake_kube.count("get", "nodes", name="n1") == 1
    assert fake_kube.count("list", "configmaps", namespace=NS) == 1
    assert fake_kube.counts()[("list", "nodes")] == 2
    assert fake_kube.requests[1].query == {"labelSelector": "a=b"}

    fake_kube.reset_requests()
    assert fake_kube.count() == 0


def test_fail_next_makes_matching_requests_fail_then_recover(
    fake_kube: FakeKubeServer, core: Any
) -> None:
    fake_kube.put_node("n1")
    fake_kube.fail_next(2, 503, verb="list", resource="nodes")

    core.read_node("n1")  # does not match the fault
    for _ in range(2):
        with pytest.raises(client.ApiException) as caught:
            core.list_node()
        assert caught.value.status == 503
        assert _status(caught.value)["reason"] == "ServiceUnavailable"

    assert [n.metadata.name for n in core.list_node().items] == ["n1"]


def test_fail_next_applies_to_writes(fake_kube: FakeKubeServer, core: Any) -> None:
    fake_kube.put_node("n1")
    fake_kube.fail_next(1, 500, verb="patch")

    with pytest.raises(client.ApiException) as caught:
        core.patch_node("n1", {"metadata": {"labels": {"a": "1"}}})

    assert caught.value.status == 500
    assert fake_kube.node("n1") is not None
    assert (fake_kube.node("n1") or {})["metadata"].get("labels") == {}


def test_latency_makes_a_short_client_timeout_expire(fake_kube: FakeKubeServer, core: Any) -> None:
    fake_kube.latency = 3.0

    with pytest.raises((urllib3.exceptions.ReadTimeoutError, urllib3.exceptions.MaxRetryError)):
        core.list_node(_request_timeout=0.2)

    fake_kube.latency = 0.0
    assert core.list_node().items == []


def test_dry_run_create_does_not_store(fake_kube: FakeKubeServer, core: Any) -> None:
    core.create_namespaced_config_map(NS, _configmap("topo"), dry_run="All")

    assert fake_kube.configmap(NS, "topo") is None
    assert fake_kube.resource_version == 0


def test_send_bookmarks_reaches_watches_that_allow_them(
    fake_kube: FakeKubeServer, core: Any, collectors: list[_Collector]
) -> None:
    start = str(fake_kube.resource_version)
    collector = _Collector(core.list_node, resource_version=start, allow_watch_bookmarks=True)
    collectors.append(collector)
    fake_kube.wait_for_watch("nodes")
    fake_kube.put_node("n1")
    collector.wait_for(1)

    fake_kube.send_bookmarks()

    events = collector.wait_for(2)
    assert events[1] == ("BOOKMARK", "", str(fake_kube.resource_version))
