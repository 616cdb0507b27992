"""The Kubernetes side: watch the topology ConfigMap and this agent's own Node; publish the
status annotation and Events on the Node.

Watches start from the resourceVersion of a get/list and resume from the last one seen (events
and bookmarks); a 410 Gone means the history moved on: the object is fetched again (relist).
Only label changes of the Node trigger a reconcile, so the agent's own annotation patches do not
wake it up.

RBAC needed: configmaps list/watch in the ConfigMap's namespace, restricted by resourceNames to
the one ConfigMap (both use the field selector metadata.name=<name>); nodes get/watch/patch (the
agent's own Node, selected with metadata.name); events create.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from edge_common.events import Deduper, NodeEvents
from edge_common.kubeapi import ApiError, KubeClient
from node_resource_manager.reconcile import ConfigState
from node_resource_manager.sources import Snapshot, config_from_text

log = logging.getLogger(__name__)

COMPONENT = "node-resource-manager"


class KubeError(Exception):
    """The API server could not be reached or refused a request we cannot do without."""


def _q(name: str) -> str:
    return urllib.parse.quote(name, safe="")


def _meta(obj: Mapping[str, Any] | None) -> dict[str, Any]:
    return dict((obj or {}).get("metadata") or {})


class KubeSource:
    def __init__(
        self,
        api: KubeClient,
        *,
        node_name: str,
        namespace: str,
        configmap: str,
        key: str,
        watch_timeout: int = 300,
    ) -> None:
        self.api = api
        self.node_name = node_name
        self.namespace = namespace
        self.configmap = configmap
        self.key = key
        self.watch_timeout = watch_timeout
        self._lock = threading.Lock()
        self._config: ConfigState | None = None
        self._config_key: tuple[bool, str | None] | None = None
        self._labels: dict[str, str] | None = None
        self.node_uid: str | None = None
        self.relists = {"configmap": 0, "node": 0}
        self._threads: list[threading.Thread] = []

    @property
    def source(self) -> str:
        return f"configmap {self.namespace}/{self.configmap}"

    def snapshot(self) -> Snapshot | None:
        """The latest config and labels; None until both have been read once."""
        with self._lock:
            if self._config is None or self._labels is None:
                return None
            return Snapshot(self._config, dict(self._labels))

    # ------------------------------------------------------------------ reads

    def _configmaps_path(self) -> str:
        return f"/api/v1/namespaces/{_q(self.namespace)}/configmaps"

    def _fetch_configmap(self) -> tuple[dict[str, Any] | None, str]:
        result = self.api.request("GET", self._configmaps_path(),
                                  query={"fieldSelector": f"metadata.name={self.configmap}"})
        items = result.get("items") or []
        return (items[0] if items else None), str(_meta(result).get("resourceVersion") or "")

    def _fetch_node(self) -> tuple[dict[str, Any] | None, str]:
        node = self.api.request("GET", f"/api/v1/nodes/{_q(self.node_name)}")
        return node, str(_meta(node).get("resourceVersion") or "")

    def _apply_configmap(self, obj: Mapping[str, Any] | None) -> bool:
        """Store the ConfigMap's topology; True when it changed."""
        if obj is None:
            key: tuple[bool, str | None] = (False, None)
            state = config_from_text(None, self.source, None)
        else:
            text = (obj.get("data") or {}).get(self.key)
            key = (True, text)
            generation = _meta(obj).get("resourceVersion")
            if text is None:
                state = ConfigState(source=self.source, generation=generation, problems=(
                    f"ConfigMap {self.namespace}/{self.configmap} has no data key {self.key!r}",))
            else:
                state = config_from_text(text, self.source, generation)
        with self._lock:
            if self._config_key == key and self._config is not None:
                return False
            self._config_key = key
            self._config = state
            return True

    def _apply_node(self, obj: Mapping[str, Any] | None) -> bool:
        if obj is None:
            labels: dict[str, str] = {}
        else:
            labels = dict(_meta(obj).get("labels") or {})
            self.node_uid = _meta(obj).get("uid")
        with self._lock:
            if self._labels == labels:
                return False
            self._labels = labels
            return True

    def sync_once(self) -> Snapshot:
        """Read the ConfigMap and the Node once (``--once``, ``--dry-run``)."""
        try:
            cm, _ = self._fetch_configmap()
            node, _ = self._fetch_node()
        except ApiError as exc:
            raise KubeError(f"Kubernetes API: {exc}") from None
        self._apply_configmap(cm)
        self._apply_node(node)
        snap = self.snapshot()
        assert snap is not None
        return snap

    # ------------------------------------------------------------------ watches

    def start(self, trigger: Callable[[str], None], stop: threading.Event) -> None:
        self._threads = [
            threading.Thread(
                target=self._watch_loop, name="watch-configmap", daemon=True,
                args=("configmap", self._fetch_configmap, self._configmaps_path(),
                      f"metadata.name={self.configmap}", self._apply_configmap, trigger, stop),
            ),
            threading.Thread(
                target=self._watch_loop, name="watch-node", daemon=True,
                args=("node", self._fetch_node, "/api/v1/nodes",
                      f"metadata.name={self.node_name}", self._apply_node, trigger, stop),
            ),
        ]
        for thread in self._threads:
            thread.start()

    def _events(self, path: str, selector: str, rv: str) -> Iterator[dict[str, Any]]:
        query: dict[str, str | int | bool] = {"fieldSelector": selector, "resourceVersion": rv,
                 "timeoutSeconds": self.watch_timeout, "allowWatchBookmarks": True}
        return self.api.watch(path, query, timeout=self.watch_timeout + 30)

    def _watch_loop(
        self,
        what: str,
        fetch: Callable[[], tuple[dict[str, Any] | None, str]],
        path: str,
        selector: str,
        apply: Callable[[Mapping[str, Any] | None], bool],
        trigger: Callable[[str], None],
        stop: threading.Event,
    ) -> None:
        rv: str | None = None
        backoff = 0.5
        while not stop.is_set():
            try:
                if rv is None:
                    obj, rv = fetch()
                    if apply(obj):
                        trigger(f"{what} read")
                for event in self._events(path, selector, rv):
                    if stop.is_set():
                        break
                    obj = event.get("object") or {}
                    rv = str(_meta(obj).get("resourceVersion") or rv)
                    kind = str(event.get("type"))
                    if kind == "BOOKMARK":
                        continue
                    if apply(None if kind == "DELETED" else obj):
                        trigger(f"{what} {kind.lower()}")
                backoff = 0.5
            except ApiError as exc:
                if stop.is_set():
                    break
                if exc.status == 410:
                    log.info("watch expired (410 Gone): reading again", extra={"object": what})
                    self.relists[what] += 1
                    rv = None
                    continue
                log.warning("watch failed", extra={"object": what, "error": str(exc)})
                if exc.status == 404:
                    rv = None  # the object is gone: read it (its absence) again
                stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)


class KubeSink:
    """Status as a Node annotation (patched when it changed, or after ``heartbeat`` seconds);
    Events on the Node, deduplicated."""

    def __init__(
        self,
        api: KubeClient,
        *,
        node_name: str,
        annotation: str,
        heartbeat: float = 300.0,
        deduper: Deduper | None = None,
        node_uid: Callable[[], str | None] = lambda: None,
    ) -> None:
        self.api = api
        self.node_name = node_name
        self.annotation = annotation
        self.heartbeat = heartbeat
        self.events = NodeEvents(api, node_name=node_name, component=COMPONENT,
                                 deduper=deduper, node_uid=node_uid)
        self._last: dict[str, Any] | None = None
        self._last_time = 0.0
        self._status_failures = 0

    def status(self, summary: dict[str, Any]) -> None:
        comparable = {k: v for k, v in summary.items()
                      if k not in ("lastReconcileTime", "durationSeconds")}
        now = time.monotonic()
        if comparable == self._last and now - self._last_time < self.heartbeat:
            return
        body = {"metadata": {"annotations": {
            self.annotation: json.dumps(summary, sort_keys=True, separators=(",", ":"))}}}
        try:
            self.api.request("PATCH", f"/api/v1/nodes/{_q(self.node_name)}", body=body,
                             content_type="application/merge-patch+json")
        except ApiError as exc:
            self._status_failures += 1
            log.warning("could not patch the status annotation", extra={"error": str(exc)})
            return
        self._last = comparable
        self._last_time = now

    def event(self, reason: str, message: str, *, warning: bool) -> None:
        self.events.event(reason, message, warning=warning)

    @property
    def failures(self) -> int:
        return self._status_failures + self.events.failures
