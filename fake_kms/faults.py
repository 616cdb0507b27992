"""Fault injection for the fake KMS: latency, AWS error answers, 5xx, dropped connections.

A fault is a rule: which operations it hits (``None``: all), how many times it fires
(``None``: until cleared), and what it does.  Rules are checked in the order they were added;
latency rules add up and let the request go on, the first error or drop rule ends it.
"""

from __future__ import annotations

import enum
import itertools
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


class FaultKind(enum.Enum):
    LATENCY = "latency"
    ERROR = "error"  # an AWS error answer (error_type, status)
    DROP = "drop"  # close the connection without an answer


@dataclass
class Fault:
    id: int
    kind: FaultKind
    ops: frozenset[str] | None = None
    remaining: int | None = None
    seconds: float = 0.0
    error_type: str = ""
    status: int = 400
    message: str = ""
    fired: int = 0

    def matches(self, operation: str) -> bool:
        return (self.ops is None or operation in self.ops) and (
            self.remaining is None or self.remaining > 0
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind.value,
            "ops": sorted(self.ops) if self.ops is not None else None,
            "remaining": self.remaining,
            "seconds": self.seconds,
            "error_type": self.error_type,
            "status": self.status,
            "fired": self.fired,
        }


@dataclass(frozen=True)
class Verdict:
    """What to do with one request: wait ``delay`` seconds, then answer/drop/serve."""

    delay: float = 0.0
    error: Fault | None = None
    drop: bool = False


class FaultPlan:
    """Thread-safe list of fault rules."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: list[Fault] = []
        self._ids = itertools.count(1)

    def add(
        self,
        kind: FaultKind | str,
        *,
        ops: Iterable[str] | str | None = None,
        count: int | None = None,
        seconds: float = 0.0,
        error_type: str = "",
        status: int | None = None,
        message: str = "",
    ) -> Fault:
        kind = FaultKind(kind)
        if isinstance(ops, str):
            ops = [ops]
        if count is not None and count < 1:
            raise ValueError("count must be at least 1 (or None: until cleared)")
        if kind is FaultKind.LATENCY and seconds <= 0:
            raise ValueError("a latency fault needs seconds > 0")
        if kind is FaultKind.ERROR and not error_type:
            error_type = "InternalFailure" if (status or 400) >= 500 else "ValidationException"
        fault = Fault(
            id=next(self._ids),
            kind=kind,
            ops=frozenset(ops) if ops is not None else None,
            remaining=count,
            seconds=seconds,
            error_type=error_type,
            status=status if status is not None else 400,
            message=message or f"injected {error_type or kind.value}",
        )
        with self._lock:
            self._faults.append(fault)
        return fault

    def add_from_json(self, spec: Mapping[str, Any]) -> Fault:
        allowed = {"kind", "ops", "count", "seconds", "error_type", "status", "message"}
        unknown = set(spec) - allowed
        if unknown or "kind" not in spec:
            raise ValueError(f"fault spec needs kind; allowed keys: {sorted(allowed)}")
        return self.add(
            str(spec["kind"]),
            ops=spec.get("ops"),
            count=int(spec["count"]) if spec.get("count") is not None else None,
            seconds=float(spec.get("seconds", 0.0)),
            error_type=str(spec.get("error_type", "")),
            status=int(spec["status"]) if spec.get("status") is not None else None,
            message=str(spec.get("message", "")),
        )

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def remove(self, fault_id: int) -> None:
        with self._lock:
            self._faults = [f for f in self._faults if f.id != fault_id]

    def list(self) -> list[dict[str, Any]]:
        with self._lock:
            return [f.as_dict() for f in self._faults]

    def decide(self, operation: str) -> Verdict:
        delay = 0.0
        with self._lock:
            for fault in self._faults:
                if not fault.matches(operation):
                    continue
                fault.fired += 1
                if fault.remaining is not None:
                    fault.remaining -= 1
                if fault.kind is FaultKind.LATENCY:
                    delay += fault.seconds
                    continue
                if fault.kind is FaultKind.DROP:
                    return Verdict(delay=delay, drop=True)
                return Verdict(delay=delay, error=fault)
        return Verdict(delay=delay)


__all__ = ["Fault", "FaultKind", "FaultPlan", "Verdict"]
