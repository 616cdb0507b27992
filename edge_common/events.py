"""Kubernetes Events, shared by the three services: one Event shape, one deduplication.

The same (reason, message) is emitted once, then again only after ``repeat_after`` seconds,
so a condition seen on every resync does not flood the API server. Events are best effort: a
failure to post one is logged, never raised.
"""

from __future__ import annotations

import datetime as dt
import logging
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

from edge_common.kubeapi import ApiError, KubeClient

log = logging.getLogger(__name__)

NODE_EVENT_NAMESPACE = "default"  # Events about cluster-scoped objects (Nodes) live here
MAX_MESSAGE = 1024


class Deduper:
    def __init__(self, repeat_after: float = 3600.0, clock: Callable[[], float] = time.monotonic,
                 max_entries: int = 1024) -> None:
        self.repeat_after = repeat_after
        self._clock = clock
        self._max = max_entries
        self._last: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()

    def admit(self, reason: str, message: str) -> bool:
        now = self._clock()
        key = (reason, message)
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.repeat_after:
                return False
            if len(self._last) >= self._max:
                oldest = min(self._last, key=lambda k: self._last[k])
                del self._last[oldest]
            self._last[key] = now
            return True


def event_body(*, involved: dict[str, str], namespace: str, reason: str, message: str,
               warning: bool, component: str, host: str, instance: str) -> dict[str, Any]:
    """A core/v1 Event about `involved` (apiVersion, kind, name[, namespace, uid])."""
    stamp = dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    source = {"component": component}
    if host:
        source["host"] = host
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": f"{involved['name']}.{secrets.token_hex(8)}",
                     "namespace": namespace},
        "involvedObject": involved,
        "reason": reason,
        "message": message[:MAX_MESSAGE],
        "type": "Warning" if warning else "Normal",
        "source": source,
        "reportingComponent": component,
        "reportingInstance": instance,
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "count": 1,
    }


def _log(reason: str, message: str, warning: bool) -> None:
    log.log(logging.WARNING if warning else logging.INFO, message,
            extra={"event_reason": reason})


class LogEvents:
    """Events to the log only (offline, or no Kubernetes API); kept for inspection."""

    def __init__(self, deduper: Deduper | None = None) -> None:
        self.deduper = deduper or Deduper()
        self.events: list[tuple[str, str, bool]] = []

    def event(self, reason: str, message: str, *, warning: bool) -> None:
        if not self.deduper.admit(reason, message):
            return
        self.events.append((reason, message, warning))
        _log(reason, message, warning)


class NodeEvents:
    """Events on this Node through the API (and the log), deduplicated."""

    def __init__(self, api: KubeClient, *, node_name: str, component: str,
                 deduper: Deduper | None = None,
                 node_uid: Callable[[], str | None] = lambda: None) -> None:
        self.api = api
        self.node_name = node_name
        self.component = component
        self.deduper = deduper or Deduper()
        self.node_uid = node_uid
        self.failures = 0

    def event(self, reason: str, message: str, *, warning: bool) -> None:
        if not self.deduper.admit(reason, message):
            return
        involved = {"apiVersion": "v1", "kind": "Node", "name": self.node_name,
                    "uid": self.node_uid() or self.node_name}
        body = event_body(involved=involved, namespace=NODE_EVENT_NAMESPACE, reason=reason,
                          message=message, warning=warning, component=self.component,
                          host=self.node_name, instance=self.node_name)
        try:
            self.api.request("POST", f"/api/v1/namespaces/{NODE_EVENT_NAMESPACE}/events",
                             body=body)
        except ApiError as exc:
            self.failures += 1
            log.warning("could not create an Event", extra={"reason": reason,
                                                             "error": str(exc)})
        _log(reason, message, warning)
