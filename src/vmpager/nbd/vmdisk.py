"""Swap-backed VM objects as NBD disks: the md(4) swap disk of vmpager.

``VMObjectBackend`` serves one anonymous VM object through the NBD server.
Reads and writes go through the object's resident pages (``read_into``,
``write``), so the disk is coherent with every other user of the object by
construction; trim and write-zeroes discard whole pages (their frames and
swap go back to the VM) and zero partial ones; block status reports pages
that were never written or were trimmed as holes that read as zeros.

Durability: the disk's storage is the VM (its frames and swap) for the
VM's lifetime, as an md(4) swap disk's is the kernel's. A write is visible
to every connection when it is acknowledged; FLUSH (and FUA) additionally
wait for the page daemon's writes in flight and sync the swap devices, so
that what is on swap is on the devices.
"""

from __future__ import annotations

from vmpager.devices.protocol import ReadableBuffer
from vmpager.nbd.protocol import NBD_STATE_HOLE, NBD_STATE_ZERO
from vmpager.vm.object import ObjectKind, VMObject

__all__ = ["VMObjectBackend"]

#: Pages examined per block-status call (the reply may cover less than asked).
_EXTENT_SCAN_NPAGES = 1 << 16


class VMObjectBackend:
    """An NBD backend over one VM object. Thread-safe (the VM is)."""

    def __init__(self, obj: VMObject) -> None:
        if obj.kind is not ObjectKind.ANONYMOUS:
            raise ValueError(f"NBD disks are swap-backed objects, not {obj.kind!r} objects")
        self._obj = obj
        self._kernel = obj.kernel

    @property
    def size_bytes(self) -> int:
        return self._obj.size

    @property
    def block_size(self) -> int:
        return self._obj.page_size

    @property
    def fast_zero(self) -> bool:
        return True  # zeroing discards: never slower than writing zeros

    def read_into(self, offset: int, buffer: memoryview) -> None:
        self._obj.readinto(offset, buffer)

    def write(self, offset: int, data: ReadableBuffer, *, fua: bool = False) -> None:
        self._obj.write(offset, data)
        if fua:
            self.flush()

    def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        self._obj.discard(offset, length)
        if fua:
            self.flush()

    def write_zeroes(self, offset: int, length: int, *, may_trim: bool, fua: bool = False) -> None:
        # Discarded pages read as zeros and still count as allocated-or-not
        # exactly as the block status below reports: with NO_HOLE the range
        # is written with zeros instead, so it stays allocated.
        if may_trim:
            self._obj.discard(offset, length)
        else:
            step = 1 << 20
            zeros = bytes(min(step, length))
            pos = 0
            while pos < length:
                n = min(step, length - pos)
                self._obj.write(offset + pos, memoryview(zeros)[:n])
                pos += n
        if fua:
            self.flush()

    def flush(self) -> None:
        self._kernel.sync()

    def cache(self, offset: int, length: int) -> None:
        """Prefetch: fault the range in, as far as a quarter of memory allows."""
        limit = self._kernel.frames.nframes * self._kernel.page_size // 4
        length = min(length, limit)
        if length:
            self._obj.readinto(offset, bytearray(length))

    def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        ps = self._obj.page_size
        first = offset // ps
        last = (offset + length - 1) // ps
        npages = min(last - first + 1, _EXTENT_SCAN_NPAGES)
        data = self._kernel.data_map(self._obj, first, npages)
        out: list[tuple[int, int]] = []
        pos = offset
        end = min(offset + length, (first + npages) * ps)
        i = 0
        while pos < end:
            has = data[i]
            j = i
            while j + 1 < npages and data[j + 1] == has:
                j += 1
            run_end = min(end, (first + j + 1) * ps)
            flags = 0 if has else NBD_STATE_HOLE | NBD_STATE_ZERO
            out.append((run_end - pos, flags))
            pos = run_end
            i = j + 1
        return out

    def close(self) -> None:
        """The object belongs to its creator; nothing to release here."""
