"""Build hook: generate the gRPC stubs from proto/ whenever the package is built."""

import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _generate_stubs() -> None:
    # A PEP 517 build does not put the source tree on sys.path.
    sys.path.insert(0, str(ROOT))
    try:
        from edge_proto.generate import generate
    finally:
        sys.path.remove(str(ROOT))
    generate()


class BuildPyWithStubs(build_py):
    def run(self) -> None:
        _generate_stubs()
        super().run()


# Generate before setup() so that package discovery already sees edge_proto.csi and .kms.
_generate_stubs()
setup(cmdclass={"build_py": BuildPyWithStubs})
