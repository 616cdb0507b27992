"""Backends are found through the kms_plugin.backends entry-point group."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from kms_plugin.backends import registry
from kms_plugin.backends.errors import BackendConfigError
from kms_plugin.backends.local import LocalBackend


def test_builtin_backends_are_registered():
    assert {"local", "pkcs11", "awskms"} <= set(registry.available())
    assert registry.load_backend_class("local") is LocalBackend


def test_unknown_backend_names_list_the_available_ones():
    with pytest.raises(BackendConfigError) as info:
        registry.load_backend_class("vault")
    assert "local" in str(info.value)


def _third_party_package(tmp_path: Path, package: str, cls: str, entry_name: str) -> None:
    """An installed package (on sys.path once prepended) whose backend ``cls`` subclasses
    LocalBackend, declared as entry point ``entry_name``."""
    pkg = tmp_path / package
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent(f'''
        from kms_plugin.backends.local import LocalBackend

        class {cls}(LocalBackend):
            name = "{entry_name}"
    '''))
    dist = tmp_path / f"{package}-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        f"[kms_plugin.backends]\n{entry_name} = {package}:{cls}\n"
    )


def test_a_third_party_backend_is_loaded_from_its_own_entry_point(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    _third_party_package(tmp_path, "thirdparty_kms", "RenamedLocal", "renamed")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "renamed" in registry.available()
    cls = registry.load_backend_class("renamed")
    assert cls.__name__ == "RenamedLocal"
    sys.modules.pop("thirdparty_kms", None)


def test_an_entry_point_that_is_not_a_backend_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    dist = tmp_path / "broken_kms-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-kms\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[kms_plugin.backends]\nbroken = os.path:join\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(BackendConfigError):
        registry.load_backend_class("broken")


def test_a_third_party_entry_point_cannot_take_a_builtin_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    _third_party_package(tmp_path, "impostor_kms", "Impostor", "local")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert registry.load_backend_class("local") is LocalBackend
    assert "impostor_kms" not in sys.modules
