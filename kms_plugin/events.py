"""Optional Kubernetes Events for the loud faults (``--kube-events``).

When the root key becomes unusable (disabled, pending deletion, deleted) the plugin records a
``Warning`` Event ``RootKeyUnusable`` on its own Pod (the static pod's mirror pod on the
control-plane node), and a ``Normal`` Event ``RootKeyUsable`` when it recovers, so that
``kubectl get events -n kube-system`` and event-based alerting show it next to the logs and
metrics.  Best effort: a failure to record an Event is logged, never fatal.
"""

from __future__ import annotations

import datetime
import logging
import os
import secrets
from typing import Any

log = logging.getLogger("kms_plugin.events")

COMPONENT = "kms-plugin"


class KubeEventNotifier:
    def __init__(self, api_client: Any, namespace: str, pod_name: str, node_name: str = "") -> None:
        from kubernetes import client

        self._core = client.CoreV1Api(api_client)
        self._client = client
        self.namespace = namespace
        self.pod_name = pod_name
        self.node_name = node_name

    @classmethod
    def from_environment(cls) -> KubeEventNotifier | None:
        """Credentials from $KUBECONFIG, else in-cluster; the Pod from POD_NAME / POD_NAMESPACE.

        A static pod (how the plugin runs beside kube-apiserver) has no service-account
        token: then, and whenever no credentials load, events are off with a warning and
        ``serve`` carries on; they are best effort, never a reason not to serve.
        """
        from kubernetes import client, config

        try:
            if os.environ.get("KUBECONFIG"):
                config.load_kube_config(config_file=os.environ["KUBECONFIG"])
            elif os.environ.get("KUBERNETES_SERVICE_HOST"):
                config.load_incluster_config()
            else:
                config.load_kube_config()
        except Exception as exc:  # ConfigException, missing files, bad YAML ...
            log.warning(
                "--kube-events: no Kubernetes credentials (%s: %s); events are off. A static "
                "pod has no service-account token: set KUBECONFIG to a kubeconfig it can read",
                type(exc).__name__, str(exc)[:200],
            )
            return None
        pod = os.environ.get("POD_NAME") or os.uname().nodename
        namespace = os.environ.get("POD_NAMESPACE", "kube-system")
        return cls(client.ApiClient(), namespace, pod, os.environ.get("NODE_NAME", ""))

    def _record(self, event_type: str, reason: str, message: str) -> None:
        c = self._client
        now = datetime.datetime.now(datetime.UTC)
        event = c.CoreV1Event(
            metadata=c.V1ObjectMeta(
                name=f"{self.pod_name}.{secrets.token_hex(8)}", namespace=self.namespace
            ),
            involved_object=c.V1ObjectReference(
                kind="Pod", name=self.pod_name, namespace=self.namespace, api_version="v1"
            ),
            reason=reason,
            message=message[:1024],
            type=event_type,
            source=c.V1EventSource(component=COMPONENT, host=self.node_name or None),
            first_timestamp=now,
            last_timestamp=now,
            count=1,
            reporting_component=COMPONENT,
            reporting_instance=self.node_name or self.pod_name,
        )
        self._core.create_namespaced_event(self.namespace, event, _request_timeout=5)

    def root_key_unusable(self, reason: str, message: str) -> None:
        self._record(
            "Warning",
            "RootKeyUnusable",
            f"KMS root key {reason.replace('_', ' ')}: {message}. kube-apiserver cannot read "
            "Secrets this plugin has not cached and cannot write new ones after a restart.",
        )

    def root_key_usable(self) -> None:
        self._record("Normal", "RootKeyUsable", "KMS root key usable again")


__all__ = ["KubeEventNotifier"]
