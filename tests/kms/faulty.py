"""Fault injection around a real backend (the awskms rig has its own, in the fake server).

The wrapped backend does the real work; the wrapper only adds latency before a call or
raises a backend error instead of calling, as a broken network, a throttling service or a
slow HSM would.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import ClassVar

from kms_plugin.backends.base import KeyBackend, RootKeyVersion, WrapResult
from kms_plugin.backends.errors import BackendError


class FaultyBackend(KeyBackend):
    name: ClassVar[str] = "faulty"

    def __init__(self, inner: KeyBackend) -> None:
        self.inner = inner
        self.latency: dict[str, float] = {}  # operation -> seconds added before the call
        self.failure: Callable[[], BackendError] | None = None
        self.fail_ops: set[str] = {"current_key", "wrap", "unwrap"}
        self._lock = threading.Lock()
        self.calls: dict[str, int] = {}

    @classmethod
    def from_options(cls, options: Mapping[str, object]) -> KeyBackend:
        raise NotImplementedError

    def break_with(self, failure: Callable[[], BackendError], ops: set[str] | None = None) -> None:
        self.failure = failure
        self.fail_ops = ops or {"current_key", "wrap", "unwrap"}

    def heal(self) -> None:
        self.failure = None
        self.latency.clear()

    def _before(self, op: str, deadline: float | None) -> None:
        with self._lock:
            self.calls[op] = self.calls.get(op, 0) + 1
        delay = self.latency.get(op, 0.0)
        if delay:
            if deadline is not None and time.monotonic() + delay > deadline:
                time.sleep(max(0.0, deadline - time.monotonic()))
                from kms_plugin.backends.errors import BackendUnavailable

                raise BackendUnavailable("backend did not answer before the deadline")
            time.sleep(delay)
        if self.failure is not None and op in self.fail_ops:
            raise self.failure()

    def current_key(self, *, deadline: float | None = None) -> RootKeyVersion:
        self._before("current_key", deadline)
        return self.inner.current_key(deadline=deadline)

    def wrap(
        self, plaintext: bytes, context: Mapping[str, str], *, deadline: float | None = None
    ) -> WrapResult:
        self._before("wrap", deadline)
        return self.inner.wrap(plaintext, context, deadline=deadline)

    def unwrap(
        self,
        ciphertext: bytes,
        key: RootKeyVersion,
        context: Mapping[str, str],
        *,
        deadline: float | None = None,
    ) -> bytes:
        self._before("unwrap", deadline)
        return self.inner.unwrap(ciphertext, key, context, deadline=deadline)

    def close(self) -> None:
        self.inner.close()
