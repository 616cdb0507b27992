"""Real-kernel test runner: boots a stock Debian kernel under qemu and runs a job in it.

``python -m kernel_guest pytest [args]`` runs the ``@pytest.mark.kernel`` tests inside the guest
against virtual disks; see :mod:`kernel_guest.cli`.
"""
