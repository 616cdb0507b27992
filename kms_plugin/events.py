"""Optional Kubernetes Events for the loud faults (``--kube-events``).

When the root key becomes unusable (disabled, pending deletion, deleted) the plugin records a
``Warning`` Event ``RootKeyUnusable`` on its own Pod (the static pod's mirror pod on the
control-plane node), and a ``Normal`` Event ``RootKeyUsable`` when it recovers, so that
``kubectl get events -n kube-system`` and event-based alerting show it next to the logs and
metrics.  Best effort: a failure to record an Event is logged, never fatal.
"""

from __future__ import annotations

import logging
import os

from edge_common.events import event_body
from edge_common.kubeapi import ApiError, KubeClient, in_cluster_config, load_kubeconfig

log = logging.getLogger("kms_plugin.events")

COMPONENT = "kms-plugin"
REQUEST_TIMEOUT = 5.0


class KubeEventNotifier:
    def __init__(self, client: KubeClient, namespace: str, pod_name: str,
                 node_name: str = "") -> None:
        self._client = client
        self.namespace = namespace
        self.pod_name = pod_name
        self.node_name = node_name

    @classmethod
    def from_environment(cls) -> KubeEventNotifier | None:
        """Credentials from $KUBECONFIG, else in-cluster, else ~/.kube/config; the Pod from
        POD_NAME / POD_NAMESPACE.

        A static pod (how the plugin runs beside kube-apiserver) has no service-account
        token: then, and whenever no credentials load, events are off with a warning and
        ``serve`` carries on; they are best effort, never a reason not to serve.
        """
        try:
            if os.environ.get("KUBECONFIG"):
                config = load_kubeconfig(os.environ["KUBECONFIG"])
            elif os.environ.get("KUBERNETES_SERVICE_HOST"):
                config = in_cluster_config()
                if config.token_file and not os.path.exists(config.token_file):
                    raise ApiError(0, "", f"no service-account token at {config.token_file}")
            else:
                config = load_kubeconfig(os.path.expanduser("~/.kube/config"))
            client = KubeClient(config, timeout=REQUEST_TIMEOUT)  # reads the CA files
        except (ApiError, OSError, ValueError) as exc:  # missing or unreadable files, bad YAML
            log.warning(
                "--kube-events: no Kubernetes credentials (%s: %s); events are off. A static "
                "pod has no service-account token: set KUBECONFIG to a kubeconfig it can read",
                type(exc).__name__, str(exc)[:200],
            )
            return None
        pod = os.environ.get("POD_NAME") or os.uname().nodename
        namespace = os.environ.get("POD_NAMESPACE", "kube-system")
        return cls(client, namespace, pod, os.environ.get("NODE_NAME", ""))

    def _record(self, event_type: str, reason: str, message: str) -> None:
        involved = {"kind": "Pod", "name": self.pod_name, "namespace": self.namespace,
                    "apiVersion": "v1"}
        body = event_body(involved=involved, namespace=self.namespace, reason=reason,
                          message=message, warning=event_type == "Warning",
                          component=COMPONENT, host=self.node_name,
                          instance=self.node_name or self.pod_name)
        self._client.request("POST", f"/api/v1/namespaces/{self.namespace}/events", body=body)

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
