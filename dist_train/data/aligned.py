"""Batch buffers that start at a cache-line boundary.

numpy aligns a large ``np.empty`` only to 16 bytes (its allocation header comes first), so every
32-byte vector store into such a buffer at a 32-byte stride straddles a cache line half the time,
and the hit builders' streaming stores (``dist_train.data.hits_jit``) need 32-byte aligned rows.
Measured on 8 x 4000 point clouds (2026-12-05): 12.7 us an event into numpy's buffers, 11.7 into
aligned ones with the same kernel, 9.2 with the rows streamed.
"""

from __future__ import annotations

import math

import numpy as np

CACHE_LINE = 64


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype | type = np.float32, align: int = CACHE_LINE) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts at a multiple of ``align`` bytes."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + align, dtype=np.uint8)
    skip = -raw.ctypes.data % align
    return raw[skip : skip + nbytes].view(dtype).reshape(shape)
