"""Step results: what the summary table, ``--summary-json`` and the guest's report carry."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

OK, FAILED, SKIPPED, INTERRUPTED = "ok", "failed", "skipped", "interrupted"


@dataclass
class StepResult:
    title: str
    status: str = OK
    seconds: float = 0.0
    note: str = ""
    error: str = ""
    details: list[str] = field(default_factory=list)
    logs: list[str] = field(default_factory=list)
    part: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(data: dict[str, Any]) -> StepResult:
        return StepResult(
            title=str(data.get("title", "?")),
            status=str(data.get("status", FAILED)),
            seconds=float(data.get("seconds", 0.0)),
            note=str(data.get("note", "")),
            error=str(data.get("error", "")),
            details=[str(d) for d in data.get("details", [])],
            logs=[str(x) for x in data.get("logs", [])],
            part=str(data.get("part", "")),
        )


__all__ = ["FAILED", "INTERRUPTED", "OK", "SKIPPED", "StepResult"]
