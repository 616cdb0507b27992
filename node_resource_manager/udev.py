"""Hot-plug: block device uevents trigger a reconcile (the watcher is shared: edge_common)."""

from edge_common.blockevents import ACTIONS, UdevWatcher

__all__ = ["ACTIONS", "UdevWatcher"]
