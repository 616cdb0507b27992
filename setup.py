"""Build hook: generate the gRPC stubs from proto/ whenever the package is built."""

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithStubs(build_py):
    def run(self) -> None:
        from edge_proto.generate import generate

        generate()
        super().run()


setup(cmdclass={"build_py": BuildPyWithStubs})
