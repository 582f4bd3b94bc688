"""The block-device interface every swap device implements (FreeBSD's swdevt strategy).

A device is an array of ``nblocks`` blocks of ``block_size`` bytes. Requests
name a first block and a list of buffers that cover consecutive blocks; a
device performs one vectored operation per contiguous request (one system
call for a file). Failures raise ``DeviceError`` carrying the errno, so the
pager can tell a transient error (EAGAIN, ENOMEM) from a hard one (EIO).

Conformance: ``vmpager.testing.devices.check_block_device`` runs the shared
suite against any implementation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

__all__ = [
    "BlockDevice",
    "DeviceStatistics",
    "ReadableBuffer",
    "ReplicatedDevice",
    "WritableBuffer",
    "block_reader",
]

#: Buffers the device reads from (write requests).
ReadableBuffer = bytes | bytearray | memoryview
#: Buffers the device fills (read requests).
WritableBuffer = bytearray | memoryview


@dataclass(frozen=True, slots=True)
class DeviceStatistics:
    """Counters of one device since it was opened."""

    name: str
    block_size: int
    nblocks: int
    read_ops: int
    write_ops: int
    blocks_read: int
    blocks_written: int
    discard_ops: int
    flush_ops: int
    read_errors: int
    write_errors: int


@runtime_checkable
class BlockDevice(Protocol):
    """A fixed-size array of blocks that swap pages are stored in.

    Contract for every method taking ``blk`` and buffers: each buffer's length
    is a positive multiple of ``block_size``; the buffers cover the blocks
    ``blk .. blk + total // block_size - 1`` in order, all inside the device,
    else ``ValueError``. Calls may come from several threads at once for
    disjoint ranges; they block until the I/O is done.
    """

    @property
    def name(self) -> str:
        """A human-readable name (a path, ``ram:N``, ``redis://...``)."""
        ...

    @property
    def block_size(self) -> int:
        """Bytes per block (the VM page size)."""
        ...

    @property
    def nblocks(self) -> int:
        """Number of blocks."""
        ...

    def read_blocks(self, blk: int, buffers: Sequence[WritableBuffer]) -> None:
        """Fill ``buffers`` from the blocks starting at ``blk``; DeviceError on failure."""
        ...

    def write_blocks(self, blk: int, buffers: Sequence[ReadableBuffer]) -> None:
        """Store ``buffers`` at the blocks starting at ``blk``; DeviceError on failure.

        When this returns the data is on the device as far as later reads are
        concerned (it may still be in a volatile write cache until ``flush``).
        """
        ...

    def discard(self, blk: int, nblocks: int) -> None:
        """Tell the device the blocks' contents are no longer needed (TRIM)."""
        ...

    def flush(self) -> None:
        """Make every completed write durable (fsync)."""
        ...

    def close(self) -> None:
        """Release the device; later calls raise ``ValueError``. Idempotent."""
        ...

    def statistics(self) -> DeviceStatistics:
        """Counters since the device was opened."""
        ...


@runtime_checkable
class ReplicatedDevice(Protocol):
    """A device that keeps copies of its blocks elsewhere (the Redis devices' replicas).

    The swap tiers read a block that fails its check from the copies, in
    order, before declaring it corrupt (``read_replica``, optional beside the
    ``BlockDevice`` methods).
    """

    def read_replica(self, blk: int, buffers: Sequence[WritableBuffer], replica: int) -> bool:
        """Fill ``buffers`` from copy number ``replica`` (0, 1, ...) of the blocks at ``blk``.

        False, reading nothing, when there is no such copy; ``DeviceError``
        when it cannot be read. A copy may be stale: the caller checks it.
        """
        ...


def block_reader(device: BlockDevice) -> Callable[[int, memoryview], None]:
    """The device's way to read one block into one buffer: the page-in of a fault.

    A device may offer ``read_block(blk, buffer)`` beside the ``BlockDevice``
    methods: the same request as ``read_blocks(blk, [buffer])`` for a buffer
    of exactly one block, with the same checks, results, errors and
    counters, but without the per-request generality. Devices without one
    get ``read_blocks`` with a one-buffer list. O(1).
    """
    read_block: Callable[[int, memoryview], None] | None = getattr(device, "read_block", None)
    if read_block is not None:
        return read_block
    read_blocks = device.read_blocks

    def one(blk: int, buffer: memoryview) -> None:
        read_blocks(blk, [buffer])

    return one
