"""Real test rigs, loaded as pytest plugins by tests/conftest.py.

- ``fake_kube``: a fake Kubernetes API server for the official client (tests/rigs/fake_kube.py)
- loop disks, LVM, SoftHSM2 and the leak check: see the other modules in this package.
"""
