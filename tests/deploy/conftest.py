"""deploy/ tests: rendered with `kubectl kustomize` (skipped with the reason when kubectl is
missing; scripts/setup-host.sh installs it from Debian's kubernetes-client)."""

from __future__ import annotations

import pytest

from tests.deploy.manifests import DEPLOY, KUBECTL, Obj, render


@pytest.fixture
def kubectl() -> str:
    if KUBECTL is None:
        pytest.skip("kubectl is not installed (Debian: apt-get install kubernetes-client); "
                    "deploy/ cannot be rendered")
    return KUBECTL


@pytest.fixture
def base(kubectl: str) -> tuple[Obj, ...]:
    """deploy/ as `kubectl apply -k deploy/` would apply it."""
    return render(DEPLOY)


@pytest.fixture
def kms(kubectl: str) -> tuple[Obj, ...]:
    return render(DEPLOY / "kms")
