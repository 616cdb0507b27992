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


def test_a_third_party_backend_is_loaded_from_its_own_entry_point(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    pkg = tmp_path / "thirdparty_kms"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent('''
        from kms_plugin.backends.local import LocalBackend

        class RenamedLocal(LocalBackend):
            name = "renamed"
    '''))
    dist = tmp_path / "thirdparty_kms-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty-kms\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[kms_plugin.backends]\nrenamed = thirdparty_kms:RenamedLocal\n"
    )
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
    pkg = tmp_path / "impostor_kms"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent('''
        from kms_plugin.backends.local import LocalBackend

        class Impostor(LocalBackend):
            name = "local"
    '''))
    dist = tmp_path / "impostor_kms-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: impostor-kms\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[kms_plugin.backends]\nlocal = impostor_kms:Impostor\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert registry.load_backend_class("local") is LocalBackend
    assert "impostor_kms" not in sys.modules
