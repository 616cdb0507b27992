"""Where the topology and the node's labels come from: a file (offline mode) or Kubernetes."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from node_resource_manager.reconcile import ConfigState
from node_resource_manager.topology import ConfigInvalid, parse_topology


def config_from_text(text: str | None, source: str, generation: str | None) -> ConfigState:
    """Parse topology text; ``None`` means the ConfigMap (or file) does not exist."""
    if text is None:
        return ConfigState(source=source, generation=generation)
    try:
        return ConfigState(source=source, topology=parse_topology(text), generation=generation)
    except ConfigInvalid as exc:
        return ConfigState(source=source, problems=exc.problems, generation=generation)


@dataclass(frozen=True)
class Snapshot:
    config: ConfigState
    labels: Mapping[str, str]


class FileSource:
    """Offline mode: the topology file is re-read at every reconcile; a change of its
    modification time or size triggers one (polled every ``poll_seconds``)."""

    def __init__(self, path: str, labels: Mapping[str, str], poll_seconds: float = 1.0) -> None:
        self.path = path
        self.labels = dict(labels)
        self.poll_seconds = poll_seconds
        self._thread: threading.Thread | None = None

    def snapshot(self) -> Snapshot:
        source = f"file {self.path}"
        try:
            with open(self.path) as fh:
                text = fh.read()
            generation = str(os.stat(self.path).st_mtime_ns)
        except FileNotFoundError:
            return Snapshot(config_from_text(None, source, None), self.labels)
        except OSError as exc:
            return Snapshot(ConfigState(source=source, problems=(
                f"cannot read {self.path}: {exc.strerror}",)), self.labels)
        return Snapshot(config_from_text(text, source, generation), self.labels)

    def start(self, trigger: Callable[[str], None], stop: threading.Event) -> None:
        def poll() -> None:
            last = self._stamp()
            while not stop.wait(self.poll_seconds):
                now = self._stamp()
                if now != last:
                    last = now
                    trigger("topology file changed")

        self._thread = threading.Thread(target=poll, name="topology-file", daemon=True)
        self._thread.start()

    def _stamp(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size
