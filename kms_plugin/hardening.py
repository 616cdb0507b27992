"""Process hygiene for a process that holds keys: no core dumps, not dumpable, small.

``RLIMIT_CORE`` 0 keeps a crash from writing memory (local KEKs, seeds) to disk;
``PR_SET_DUMPABLE`` 0 also makes /proc/PID/mem and ptrace unavailable to other processes of
the same user (root keeps CAP_SYS_PTRACE; that is the kernel's line, not ours).

Memory: glibc gives every thread that allocates an arena of its own, and keeps freed memory;
after a request storm an idle plugin would stay megabytes bigger.  ``M_ARENA_MAX`` 2 and a
``malloc_trim`` after each round of background work and whenever the server's thread pool
is idle again after a burst (its extra threads exit: edge_common.workers) keep the idle
footprint at what the imports need (CPython's small objects do not use these arenas; large
buffers do).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import resource

log = logging.getLogger("kms_plugin.hardening")

PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3
M_ARENA_MAX = -8
MALLOC_ARENAS = 2
_libc: ctypes.CDLL | None = None


def _c() -> ctypes.CDLL | None:
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        except OSError:
            return None
    return _libc


def _prctl() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    libc = _c()
    if libc is None:
        return None
    fn = libc.prctl
    fn.restype = ctypes.c_int
    return fn


def release_free_memory() -> None:
    """Give memory that malloc keeps after a burst back to the system (glibc only)."""
    libc = _c()
    trim = getattr(libc, "malloc_trim", None) if libc is not None else None
    if trim is not None:
        trim(0)


def harden_process() -> None:
    """Core dumps off and the process non-dumpable; logs (never raises) what it could not do."""
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (OSError, ValueError) as exc:
        log.warning("could not disable core dumps: %s", exc)
    prctl = _prctl()
    if prctl is None or prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        log.warning("could not make the process non-dumpable (prctl PR_SET_DUMPABLE)")
    libc = _c()
    mallopt = getattr(libc, "mallopt", None) if libc is not None else None
    if mallopt is not None:
        mallopt(M_ARENA_MAX, MALLOC_ARENAS)


def is_dumpable() -> bool:
    prctl = _prctl()
    return prctl is None or prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) != 0


__all__ = ["harden_process", "is_dumpable", "release_free_memory"]
