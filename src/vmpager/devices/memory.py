"""A swap device in RAM: for tests, and as a fast tier in front of slower devices."""

from __future__ import annotations

import itertools
import mmap
import threading
from collections.abc import Sequence

from vmpager.devices._request import (
    DeviceCounters,
    as_byte_views,
    check_block_size,
    check_range,
    is_one_block_view,
)
from vmpager.devices.protocol import DeviceStatistics, ReadableBuffer, WritableBuffer
from vmpager.units import check_int

__all__ = ["MemoryDevice"]

_names = itertools.count()


class MemoryDevice:
    """``nblocks`` blocks of ``block_size`` bytes in a private anonymous mapping.

    Memory is committed by the kernel only as blocks are first written;
    never-written blocks read as zeros. ``discard`` gives whole pages of the
    range back to the kernel (``MADV_DONTNEED``; they then read as zeros).
    Requests copy once (``memoryview`` slice assignment) and never block on
    anything but the copy; disjoint ranges may be used from several threads.
    """

    def __init__(self, nblocks: int, block_size: int = 4096, name: str | None = None) -> None:
        self._block_size = check_block_size(block_size)
        self._nblocks = check_int(nblocks, "nblocks", minimum=1)
        self._name = name if name is not None else f"ram:{next(_names)}"
        # MAP_PRIVATE, not mmap's default MAP_SHARED: MADV_DONTNEED only frees
        # (and zeroes) private anonymous memory.
        self._map: mmap.mmap | None = mmap.mmap(
            -1,
            self._nblocks * self._block_size,
            flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
            prot=mmap.PROT_READ | mmap.PROT_WRITE,
        )
        self._view: memoryview | None = memoryview(self._map)
        self._counters = DeviceCounters()
        self._close_lock = threading.Lock()

    @property
    def name(self) -> str:
        """``ram:N`` unless a name was given."""
        return self._name

    @property
    def block_size(self) -> int:
        """Bytes per block."""
        return self._block_size

    @property
    def nblocks(self) -> int:
        """Number of blocks."""
        return self._nblocks

    def _open_view(self) -> memoryview:
        view = self._view
        if view is None:
            raise ValueError(f"{self._name}: device is closed")
        return view

    def read_blocks(self, blk: int, buffers: Sequence[WritableBuffer]) -> None:
        """Copy the blocks starting at ``blk`` into ``buffers``. Never fails with DeviceError."""
        view = self._open_view()
        views, nblocks = as_byte_views(
            self._name, self._nblocks, self._block_size, blk, buffers, writable=True
        )
        offset = blk * self._block_size
        for buffer in views:
            end = offset + buffer.nbytes
            buffer[:] = view[offset:end]
            offset = end
        self._counters.count_read(nblocks)

    def read_block(self, blk: int, buffer: memoryview) -> None:
        """``read_blocks(blk, [buffer])`` for one buffer of one block, without the
        request checks when ``buffer`` is a writable, contiguous byte memoryview of
        exactly one block inside the device; anything else takes ``read_blocks``."""
        view = self._view
        size = self._block_size
        if view is None or not is_one_block_view(buffer, blk, self._nblocks, size):
            self.read_blocks(blk, [buffer])
            return
        offset = blk * size
        buffer[:] = view[offset : offset + size]
        self._counters.count_read(1)

    def write_blocks(self, blk: int, buffers: Sequence[ReadableBuffer]) -> None:
        """Copy ``buffers`` into the blocks starting at ``blk``. Never fails with DeviceError."""
        view = self._open_view()
        views, nblocks = as_byte_views(
            self._name, self._nblocks, self._block_size, blk, buffers, writable=False
        )
        offset = blk * self._block_size
        for buffer in views:
            end = offset + buffer.nbytes
            view[offset:end] = buffer
            offset = end
        self._counters.count_write(nblocks)

    def discard(self, blk: int, nblocks: int) -> None:
        """Free the whole memory pages inside the range; their blocks then read as zeros.

        Parts of the range smaller than a memory page keep their contents.
        """
        self._open_view()
        check_range(self._name, self._nblocks, blk, check_int(nblocks, "nblocks", minimum=1))
        start = blk * self._block_size
        end = start + nblocks * self._block_size
        page = mmap.PAGESIZE
        first = -(-start // page) * page
        last = end // page * page
        mapping = self._map
        if mapping is not None and last > first:
            mapping.madvise(mmap.MADV_DONTNEED, first, last - first)
        self._counters.count_discard()

    def flush(self) -> None:
        """Nothing to make durable; counts the call."""
        self._open_view()
        self._counters.count_flush()

    def close(self) -> None:
        """Release the memory. Idempotent; later calls raise ``ValueError``.

        The caller must make sure no request is in flight.
        """
        with self._close_lock:
            view, mapping = self._view, self._map
            self._view = None
            self._map = None
            if view is not None:
                view.release()
            if mapping is not None:
                mapping.close()

    def statistics(self) -> DeviceStatistics:
        """Counters since the device was created."""
        return self._counters.snapshot(self._name, self._block_size, self._nblocks)

    def __enter__(self) -> MemoryDevice:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"MemoryDevice({self._nblocks}, block_size={self._block_size}, name={self._name!r})"
