"""Stub generation: reproducible, complete, and the checked-out stubs are not stale."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from edge_common.commands import run
from edge_proto import generate as gen

EXPECTED_MODULES = {
    "edge_proto/csi/__init__.py",
    "edge_proto/csi/v1/__init__.py",
    "edge_proto/csi/v1/csi_pb2.py",
    "edge_proto/csi/v1/csi_pb2.pyi",
    "edge_proto/csi/v1/csi_pb2_grpc.py",
    "edge_proto/kms/__init__.py",
    "edge_proto/kms/v2/__init__.py",
    "edge_proto/kms/v2/service_pb2.py",
    "edge_proto/kms/v2/service_pb2.pyi",
    "edge_proto/kms/v2/service_pb2_grpc.py",
    "edge_proto/kms/v2/encrypted_object_pb2.py",
    "edge_proto/kms/v2/encrypted_object_pb2.pyi",
    "edge_proto/kms/v1beta1/__init__.py",
    "edge_proto/kms/v1beta1/service_pb2.py",
    "edge_proto/kms/v1beta1/service_pb2.pyi",
    "edge_proto/kms/v1beta1/service_pb2_grpc.py",
}

REPO = Path(gen.__file__).resolve().parent.parent
# Child interpreters import this checkout's edge_proto, wherever pytest was started.
CHILD_ENV = {"PYTHONPATH": str(REPO)}


def _tree(root: Path) -> dict[str, bytes]:
    base = root / "edge_proto"
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for top in ("csi", "kms")
        for p in sorted((base / top).rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def test_installed_stubs_match_a_fresh_generation_byte_for_byte(tmp_path: Path) -> None:
    gen.generate(tmp_path)
    fresh = _tree(tmp_path)
    installed = _tree(REPO)
    missing = sorted(set(fresh) - set(installed))
    extra = sorted(set(installed) - set(fresh))
    stale = sorted(k for k in fresh.keys() & installed.keys() if fresh[k] != installed[k])
    assert (missing, extra, stale) == ([], [], []), (
        "stubs are missing or stale: run `python -m edge_proto.generate`"
    )


def test_generation_produces_every_expected_module(tmp_path: Path) -> None:
    written = gen.generate(tmp_path)
    assert {p.relative_to(tmp_path).as_posix() for p in written} == EXPECTED_MODULES
    assert set(_tree(tmp_path)) == EXPECTED_MODULES


def test_generation_is_reproducible_and_leaves_unchanged_files_alone(tmp_path: Path) -> None:
    gen.generate(tmp_path)
    stub = tmp_path / "edge_proto/csi/v1/csi_pb2.py"
    first = _tree(tmp_path)
    before = stub.stat().st_mtime_ns
    gen.generate(tmp_path)
    assert _tree(tmp_path) == first
    assert stub.stat().st_mtime_ns == before


def test_stale_check_reports_edited_missing_and_extra_stubs(tmp_path: Path) -> None:
    gen.generate(tmp_path)
    assert gen.stale_files(tmp_path) == []
    (tmp_path / "edge_proto/kms/v2/service_pb2.py").write_text("# edited by hand\n")
    (tmp_path / "edge_proto/csi/v1/csi_pb2_grpc.py").unlink()
    (tmp_path / "edge_proto/kms/v2/leftover_pb2.py").write_text("")
    assert gen.stale_files(tmp_path) == [
        "edge_proto/csi/v1/csi_pb2_grpc.py",
        "edge_proto/kms/v2/leftover_pb2.py",
        "edge_proto/kms/v2/service_pb2.py",
    ]


def test_regeneration_repairs_edits_and_removes_leftovers(tmp_path: Path) -> None:
    gen.generate(tmp_path)
    edited = tmp_path / "edge_proto/kms/v2/service_pb2.py"
    leftover = tmp_path / "edge_proto/kms/v3/old_pb2.py"
    leftover.parent.mkdir()
    leftover.write_text("")
    edited.write_text("# edited by hand\n")
    gen.generate(tmp_path)
    assert gen.stale_files(tmp_path) == []
    assert not leftover.parent.exists()


def test_missing_proto_source_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="csi.proto"):
        gen.generate(tmp_path / "out", proto_dir=tmp_path / "no-protos")


def test_check_command_fails_on_stale_stubs_and_passes_on_fresh_ones(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "edge_proto.generate", "--check", "--out-dir", str(tmp_path)]
    missing = run(argv, timeout=60, check=False, env=CHILD_ENV)
    assert missing.returncode == 1
    assert b"edge_proto/csi/v1/csi_pb2.py" in missing.stderr
    run(
        [sys.executable, "-m", "edge_proto.generate", "--out-dir", str(tmp_path)],
        timeout=60,
        env=CHILD_ENV,
    )
    assert run(argv, timeout=60, check=False, env=CHILD_ENV).returncode == 0


def test_importing_the_generator_does_not_import_grpc_tools() -> None:
    code = "import sys, edge_proto.generate; print('grpc_tools' in sys.modules)"
    result = run([sys.executable, "-c", code], timeout=30, env=CHILD_ENV)
    assert result.stdout_text.strip() == "False"


def test_both_v2_files_load_together_in_a_fresh_interpreter() -> None:
    code = (
        "from edge_proto.kms.v2 import encrypted_object_pb2 as e, service_pb2 as s;"
        "from edge_proto.kms.v1beta1 import service_pb2 as b;"
        "from edge_proto.csi.v1 import csi_pb2_grpc;"
        "print(e.EncryptedObject.DESCRIPTOR.full_name, s.EncryptRequest.DESCRIPTOR.full_name,"
        " b.EncryptRequest.DESCRIPTOR.full_name)"
    )
    result = run([sys.executable, "-c", code], timeout=30, env=CHILD_ENV)
    assert result.stdout_text.split() == [
        "v2.EncryptedObject",
        "v2.EncryptRequest",
        "v1beta1.EncryptRequest",
    ]
