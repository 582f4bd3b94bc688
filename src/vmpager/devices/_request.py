"""Checking block-device requests and counting them: shared by every device.

The ``BlockDevice`` contract (``vmpager.devices.protocol``) says what a valid
request is; this module is the one place that enforces it, so every device
rejects a bad request with the same message, and the device counters in
``DeviceStatistics`` mean the same thing everywhere.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TypeGuard

from vmpager.devices.protocol import DeviceStatistics, ReadableBuffer, WritableBuffer
from vmpager.units import check_int

__all__ = [
    "DeviceCounters",
    "as_byte_views",
    "check_block_size",
    "check_range",
    "is_one_block_view",
]


def check_block_size(block_size: int) -> int:
    """Return ``block_size`` after checking it is a power of two in [512, 1 MiB]."""
    size = check_int(block_size, "block_size", minimum=512, maximum=1 << 20)
    if size & (size - 1):
        raise ValueError(f"block_size must be a power of two in [512, 1048576], got {size}")
    return size


def check_range(name: str, nblocks_device: int, blk: int, nblocks: int) -> None:
    """Raise ``ValueError`` unless ``blk .. blk + nblocks - 1`` lies inside the device.

    ``nblocks`` must be positive. ``name`` is the device name, for the message.
    """
    check_int(blk, "blk", minimum=0, maximum=max(nblocks_device - 1, 0))
    if nblocks <= 0:
        raise ValueError(f"{name}: a request must cover at least one block, got {nblocks}")
    if blk + nblocks > nblocks_device:
        raise ValueError(
            f"{name}: blocks {blk}..{blk + nblocks - 1} run past the end of the device "
            f"(blocks 0..{nblocks_device - 1})"
        )


def is_one_block_view(
    buffer: object, blk: object, nblocks_device: int, block_size: int
) -> TypeGuard[memoryview]:
    """Whether ``read_block(blk, buffer)`` may skip the request checks: ``buffer``
    is a writable, C-contiguous byte memoryview of exactly one block and ``blk``
    a plain int inside the device. False means "take ``read_blocks``", which
    then says what is wrong, if anything."""
    return (
        type(buffer) is memoryview
        and type(blk) is int
        and 0 <= blk < nblocks_device
        and buffer.nbytes == block_size
        and not buffer.readonly
        and buffer.format == "B"
        and buffer.c_contiguous
    )


def as_byte_views(
    name: str,
    nblocks_device: int,
    block_size: int,
    blk: int,
    buffers: Sequence[ReadableBuffer] | Sequence[WritableBuffer],
    *,
    writable: bool,
) -> tuple[list[memoryview], int]:
    """Check a request and return its buffers as flat byte memoryviews and its block count.

    Each buffer must be C-contiguous, its length a positive multiple of
    ``block_size`` (``ValueError``), and writable when ``writable`` (the
    buffers of a read request; ``TypeError`` otherwise). The blocks covered
    must lie inside the device (``ValueError``). Cost: O(len(buffers)); no
    data is copied.
    """
    if isinstance(buffers, (bytes, bytearray, memoryview)):
        raise TypeError(f"{name}: buffers must be a sequence of buffers, not a single buffer")
    views: list[memoryview] = []
    total = 0
    for index, buffer in enumerate(buffers):
        try:
            view = memoryview(buffer)
        except TypeError:
            raise TypeError(
                f"{name}: buffers[{index}] must support the buffer protocol, "
                f"got {type(buffer).__name__}"
            ) from None
        if not view.c_contiguous:
            raise ValueError(f"{name}: buffers[{index}] is not C-contiguous")
        if writable and view.readonly:
            raise TypeError(f"{name}: buffers[{index}] is read-only; a read needs writable buffers")
        if view.ndim != 1 or view.format != "B":
            view = view.cast("B")
        length = view.nbytes
        if length == 0 or length % block_size:
            raise ValueError(
                f"{name}: buffers[{index}] has {length} bytes; the length must be a positive "
                f"multiple of block_size {block_size}"
            )
        views.append(view)
        total += length
    if not views:
        raise ValueError(f"{name}: a request needs at least one buffer")
    nblocks = total // block_size
    check_range(name, nblocks_device, blk, nblocks)
    return views, nblocks


class DeviceCounters:
    """The counters behind ``DeviceStatistics``; safe to bump from several threads.

    Each bump takes a small lock (about 0.1 µs): devices are called from I/O
    worker threads at once, and ``+=`` on an attribute is not atomic.
    """

    __slots__ = (
        "_lock",
        "blocks_read",
        "blocks_written",
        "discard_ops",
        "flush_ops",
        "read_errors",
        "read_ops",
        "write_errors",
        "write_ops",
    )

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.read_ops = 0
        self.write_ops = 0
        self.blocks_read = 0
        self.blocks_written = 0
        self.discard_ops = 0
        self.flush_ops = 0
        self.read_errors = 0
        self.write_errors = 0

    def count_read(self, nblocks: int) -> None:
        """Count one completed read request of ``nblocks`` blocks."""
        with self._lock:
            self.read_ops += 1
            self.blocks_read += nblocks

    def count_reads(self, nops: int, nblocks: int) -> None:
        """Count ``nops`` completed read requests of ``nblocks`` blocks in all."""
        with self._lock:
            self.read_ops += nops
            self.blocks_read += nblocks

    def count_write(self, nblocks: int) -> None:
        """Count one completed write request of ``nblocks`` blocks."""
        with self._lock:
            self.write_ops += 1
            self.blocks_written += nblocks

    def count_read_error(self) -> None:
        """Count one read request that failed with ``DeviceError``."""
        with self._lock:
            self.read_errors += 1

    def count_write_error(self) -> None:
        """Count one write request that failed with ``DeviceError``."""
        with self._lock:
            self.write_errors += 1

    def count_discard(self) -> None:
        """Count one discard request."""
        with self._lock:
            self.discard_ops += 1

    def count_flush(self) -> None:
        """Count one flush."""
        with self._lock:
            self.flush_ops += 1

    def snapshot(self, name: str, block_size: int, nblocks: int) -> DeviceStatistics:
        """Return the counters as a frozen ``DeviceStatistics``."""
        with self._lock:
            return DeviceStatistics(
                name=name,
                block_size=block_size,
                nblocks=nblocks,
                read_ops=self.read_ops,
                write_ops=self.write_ops,
                blocks_read=self.blocks_read,
                blocks_written=self.blocks_written,
                discard_ops=self.discard_ops,
                flush_ops=self.flush_ops,
                read_errors=self.read_errors,
                write_errors=self.write_errors,
            )
