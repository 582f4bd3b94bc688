"""``vmpager.memmap``: a budgeted alternative to ``numpy.memmap``.

The file is paged by the vnode pager of a VM in a pager process (O_DIRECT:
the OS page cache is not used as a hidden second cache), so the array's
resident pages never exceed ``memory``. The returned object is a plain
``numpy.ndarray``; the file is up to date once the array (and every view of
it) is gone, or after ``vmpager.mapped.flush(array)``.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from numpy.typing import DTypeLike, NDArray

from vmpager.mapped.client import PagerProcess

__all__ = ["flush", "memmap"]

_MODES = ("r", "r+", "w+", "c")


def memmap(
    path: str | os.PathLike[str],
    dtype: DTypeLike = "uint8",
    shape: int | tuple[int, ...] | None = None,
    mode: str = "r+",
    *,
    order: str = "C",
    memory: int | str = "64M",
    swap: list[Any] | None = None,
) -> NDArray[Any]:
    """An array over the file at ``path``, like ``numpy.memmap(path, dtype, mode, shape=)``.

    ``mode``: "r" (read-only array), "r+" (changes go to the file), "w+"
    (create or overwrite the file with ``shape``), "c" (copy-on-write:
    changes stay in memory and swap, never in the file). ``shape`` defaults
    to the whole file as a 1-D array. ``memory``: the budget of resident
    pages. Raises ``ValueError`` for a bad mode or a shape larger than the
    file, ``UserfaultfdUnavailable`` when userfaultfd cannot be used.
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {', '.join(map(repr, _MODES))}, got {mode!r}")
    if order not in ("C", "F"):
        raise ValueError(f"order must be 'C' or 'F', got {order!r}")
    dt = np.dtype(dtype)
    if dt.hasobject:
        raise TypeError(f"dtype must not hold Python objects, got {dt}")
    name = os.fspath(path)
    if isinstance(shape, (int, np.integer)):
        shape = (int(shape),)
    if mode == "w+":
        if shape is None:
            raise ValueError("shape is required with mode 'w+'")
        nbytes = dt.itemsize * int(np.prod(shape, dtype=object))
        if nbytes < 1:
            raise ValueError(f"shape must hold at least one item, got {shape}")
        with open(name, "wb") as f:
            f.truncate(nbytes)
    size = os.stat(name).st_size
    if shape is None:
        if size < dt.itemsize:
            raise ValueError(f"{name} is smaller than one {dt} item ({size} bytes)")
        shape = (size // dt.itemsize,)
    nbytes = dt.itemsize * int(np.prod(shape, dtype=object))
    if not 0 < nbytes <= size:
        raise ValueError(f"shape {shape} of {dt} needs {nbytes} bytes; {name} has {size}")
    pager = PagerProcess(memory, swap)
    try:
        obj = pager.map_file(name, "r" if mode == "r" else "r+", private=mode == "c")
        view = obj.map()
    except BaseException:
        pager.close()
        raise
    pager.close_when_unmapped = True
    array: NDArray[Any] = np.ndarray(shape, dtype=dt, buffer=view, order=order)  # type: ignore[arg-type]
    if mode == "r":
        array.flags.writeable = False
    return array


def flush(array: object) -> None:
    """Write the dirty pages of the file mapped under ``array`` to the file now."""
    from vmpager.mapped.client import object_of

    object_of(array).flush()
