"""docs/node-resource-manager.md names every refusal reason and, for each identity and
fail-closed rule, the test that pins it; the named tests must exist."""

from __future__ import annotations

import ast
import re

from node_resource_manager.safety import Reason
from tests.nrm.conftest import REPO

DOC = REPO / "docs" / "node-resource-manager.md"


def _pinning_table() -> str:
    text = DOC.read_text()
    start = text.index("What pins each rule")
    return text[start:text.index("\n\n", text.index("| rule | test |", start))]


def test_every_refusal_reason_is_documented() -> None:
    text = DOC.read_text()
    missing = [str(r) for r in Reason if f"| `{r}` |" not in text]
    assert missing == []


def test_every_test_the_rules_table_names_exists() -> None:
    named: list[tuple[str, str | None]] = []
    for row in _pinning_table().splitlines()[2:]:
        current = None
        for ref in re.findall(r"`((?:tests/[\w/]+\.py)?(?:::\w+)?)`", row):
            path, _, func = ref.partition("::")
            current = path or current
            assert current is not None, row
            named.append((current, func or None))
    assert len(named) >= 20
    for path, func in named:
        tree = ast.parse((REPO / path).read_text())
        if func is not None:
            funcs = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
            assert func in funcs, f"{path}::{func} named in {DOC.name} does not exist"
