"""Process hardening for a process that holds keys: no core dumps, not dumpable.

``RLIMIT_CORE`` 0 keeps a crash from writing memory (local KEKs, seeds) to disk;
``PR_SET_DUMPABLE`` 0 also makes /proc/PID/mem and ptrace unavailable to other processes of
the same user (root keeps CAP_SYS_PTRACE; that is the kernel's line, not ours).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import resource

log = logging.getLogger("kms_plugin.hardening")

PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3


def _prctl() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    fn = libc.prctl
    fn.restype = ctypes.c_int
    return fn


def harden_process() -> None:
    """Core dumps off and the process non-dumpable; logs (never raises) what it could not do."""
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (OSError, ValueError) as exc:
        log.warning("could not disable core dumps: %s", exc)
    prctl = _prctl()
    if prctl is None or prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        log.warning("could not make the process non-dumpable (prctl PR_SET_DUMPABLE)")


def is_dumpable() -> bool:
    prctl = _prctl()
    return prctl is None or prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) != 0


__all__ = ["harden_process", "is_dumpable"]
