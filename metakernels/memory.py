"""Process-wide allocator setting for the meta-step (``trainer.retain_freed_memory``).

A meta-step allocates and frees the same activation-sized blocks K+1 times (one forward/backward
per inner step and one for the query). glibc's malloc hands large freed blocks back to the OS
(``munmap``, or trimming the top of the heap), so every pass faults the same pages in again and
the kernel zeroes them: on the ``fewshot`` benchmark about 45k page faults (180 MB) per step.
``retain_freed_memory`` fixes glibc's two thresholds so that blocks up to 32 MiB come from the
heap and freed heap memory stays in the process for the next pass. The step's peak RSS is the
same (the memory is what the next pass needs again); what changes is that RSS does not fall
between passes.

The same can be asked of glibc from the environment (``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_TRIM_THRESHOLD_``); when either is set, or the C library is not glibc, nothing is
changed.
"""
from __future__ import annotations

import ctypes
import os
import sys

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2 ** 20       # glibc's largest on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
TRIM_THRESHOLD = 2 ** 31 - 1        # mallopt takes an int: return the heap top only past 2 GiB
ENV_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")

_state: str | None = None


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version      # only glibc has it (not musl)
        return libc
    except (OSError, AttributeError):
        return None


def retain_freed_memory() -> str:
    """Keeps freed memory in this process (see the module docstring). Returns what holds now:
    ``"retain"`` (set, here or earlier), ``"env"`` (the environment sets glibc's thresholds;
    left alone) or ``"default"`` (not glibc, or glibc refused)."""
    global _state
    if _state == "retain":
        return _state
    if any(v in os.environ for v in ENV_VARS):
        _state = "env"
        return _state
    libc = _glibc()
    if libc is None:
        _state = "default"
        return _state
    # mmap threshold first: setting either freezes both (glibc stops adapting them)
    ok = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    ok = ok and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    _state = "retain" if ok else "default"
    return _state


def allocator_state() -> str:
    """``"retain"``, ``"env"`` or ``"default"``: how this process's malloc returns memory."""
    if _state is not None:
        return _state
    return "env" if any(v in os.environ for v in ENV_VARS) else "default"
