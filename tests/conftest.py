"""Root conftest: the test rigs are plugins (add yours to the list); nothing else lives here.

Fixtures: loop_disks, lvm, vg_factory (tests/rigs/loopdisks.py, lvm.py), softhsm
(tests/rigs/softhsm.py), fake_kms and moto_kms (tests/kms/awskms_rig.py); the leak check
(tests/rigs/leaks.py) runs after every test and at session end.
"""

pytest_plugins = [
    "tests.rigs.loopdisks",
    "tests.rigs.lvm",
    "tests.rigs.softhsm",
    "tests.rigs.leaks",
    "pytester",  # pytest's own, for tests of the rigs (tests/common/test_leak_check.py)
    "tests.rigs.fake_kube",
    "tests.kms.awskms_rig",
]
