"""Make glibc give large freed CPU buffers back to the kernel (CPU FSDP workers).

FSDP allocates and frees an all-gathered copy of every unit and its gradient buffers each step. With
glibc's defaults the first large free raises the dynamic mmap threshold (up to 32 MiB), later buffers
come from the heap, and a fragmented heap is never returned: a CPU FSDP rank's resident peak ends up as
high as a DDP rank's (benchmarks/fsdp.py measured 0.994x instead of ~0.6x). A fixed threshold of 1 MiB
gives every buffer of 1 MiB or more its own mapping, unmapped when freed. Setting it also switches the
dynamic threshold off, which is the point. CUDA memory is torch's caching allocator's business, so
only CPU workers need this.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Callable

from dist_train import envvars

log = logging.getLogger("dtrain")

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
DEFAULT_THRESHOLD_BYTES = 1 << 20


def return_large_frees_to_os(strategy: str, device_type: str) -> int | None:
    """For a CPU FSDP worker on glibc: ``mallopt(M_MMAP_THRESHOLD, threshold)`` before the model is built.

    Returns the threshold set in bytes, or None when nothing was changed: another strategy or device,
    not glibc (macOS, musl), the user's own malloc settings, or ``DTRAIN_CPU_MALLOC_THRESHOLD=0``.
    """
    if strategy != "fsdp" or device_type != "cpu":
        return None
    threshold = _requested_threshold()
    if threshold is None:
        return None
    if _user_set_mmap_threshold():
        log.debug("malloc: the environment sets the mmap threshold, dtrain leaves it alone")
        return None
    mallopt = _glibc_mallopt()
    if mallopt is None:
        log.debug("malloc: not glibc, the mmap threshold is left as it is")
        return None
    if mallopt(M_MMAP_THRESHOLD, threshold) != 1:
        log.debug("malloc: mallopt(M_MMAP_THRESHOLD, %d) refused", threshold)
        return None
    log.debug(
        "malloc: mallopt(M_MMAP_THRESHOLD, %d): freed CPU buffers of that size or more go back to the OS", threshold
    )
    return threshold


def _requested_threshold() -> int | None:
    """DTRAIN_CPU_MALLOC_THRESHOLD: bytes, "0" to leave malloc alone; unset means 1 MiB."""
    raw = envvars.get(envvars.CPU_MALLOC_THRESHOLD).strip()
    if not raw:
        return DEFAULT_THRESHOLD_BYTES
    try:
        value = int(raw)
    except ValueError:
        log.warning(
            "%s=%r is not a number of bytes; using %d", envvars.CPU_MALLOC_THRESHOLD, raw, DEFAULT_THRESHOLD_BYTES
        )
        return DEFAULT_THRESHOLD_BYTES
    return value if value > 0 else None


def _user_set_mmap_threshold() -> bool:
    """glibc read the user's own threshold at start-up (env variable or tunable): theirs wins."""
    return "MALLOC_MMAP_THRESHOLD_" in os.environ or "glibc.malloc.mmap_threshold" in os.environ.get(
        "GLIBC_TUNABLES", ""
    )


def _glibc_mallopt() -> Callable[[int, int], int] | None:
    """glibc's ``mallopt``, or None elsewhere (musl has a mallopt that does nothing; macOS none)."""
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None
    mallopt = libc.mallopt
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return mallopt  # type: ignore[no-any-return]
