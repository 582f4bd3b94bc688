"""Probe how much of a file sits in the OS page cache (mincore(2)), for tests."""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os

import numpy as np

__all__ = ["cached_pages"]


def cached_pages(path: str | os.PathLike[str]) -> int | None:
    """Pages of the file at ``path`` resident in the OS page cache, by mincore(2).

    Maps the file read-only for the probe (mapping does not fault pages in)
    and returns None where mincore is not available.
    """
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    mincore = getattr(libc, "mincore", None)
    if mincore is None:
        return None
    mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
    mincore.restype = ctypes.c_int
    size = os.stat(path).st_size
    if size == 0:
        return 0
    with open(path, "rb") as handle:
        mapping = mmap.mmap(handle.fileno(), size, prot=mmap.PROT_READ)
    try:
        address = np.frombuffer(mapping, dtype=np.uint8).ctypes.data
        npages = -(-size // mmap.PAGESIZE)
        vector = (ctypes.c_ubyte * npages)()
        if mincore(ctypes.c_void_p(address), size, vector) != 0:
            return None
        return sum(byte & 1 for byte in vector)
    finally:
        mapping.close()
