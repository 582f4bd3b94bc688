"""Mapping an object of the VM itself: on its first ``map()`` it moves into the pager.

A VM's own objects live in the client process, whose faults it cannot serve
(a thread faulting inside numpy holds the GIL). ``obj.map()`` on an
anonymous object therefore moves the object into the VM's pager process,
once:

1. a new object of the same size is allocated in the pager's VM;
2. the object's contents are copied there, a chunk of pages at a time
   (``read_pages``, through the VM as any read: swapped pages are paged in,
   a clone's pages come from its backing chain); chunks of zeros are
   skipped, the new object is zero-filled already;
3. the object is destroyed in the client's VM (frames, swap and its
   reference on a clone's backing object are released: nothing is held
   twice) and becomes a ``MovedObject``: the same Python object, the same
   ``oid``, ``size`` and ``npages``, whose calls (``read``, ``write``,
   ``read_words``, ``write_words``, ``read_pages``, ``write_pages``,
   ``discard``, ``reserve``, ``clone``, ``map``, ``close``) go to the pager's
   object, where the mapping's pages are. So the calls and the mapping see
   the same bytes, always.

Costs: the first ``map()`` reads the whole object (paging in what was
swapped) and sends its non-zero pages to the pager; later calls cost a
round trip to the pager each (tens of microseconds), as for every mapped
object. ``clone()`` of a moved object is a moved object too (a copy-on-write
snapshot in the pager's VM, not mapped until its own ``map()``). After the
move the object no longer counts in the client VM's statistics; it counts in
the pager's (``vm.mapped.statistics()``).

Threads: the first ``map()`` of an object must not run while another thread
writes the same object (a write that lands in a chunk already copied would
be lost); once it has returned, every call is safe from any thread.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import numpy as np
from numpy.typing import ArrayLike, NDArray

from vmpager.errors import ObjectClosed
from vmpager.vm.kind import ObjectKind
from vmpager.vm.object import VMObject

if TYPE_CHECKING:
    from vmpager.devices.protocol import ReadableBuffer, WritableBuffer
    from vmpager.mapped.client import MappedObject
    from vmpager.vm.system import VM

__all__ = ["MovedObject", "move_and_map"]

#: Pages copied per message while moving (1 MiB of 4 KiB pages).
_CHUNK_NPAGES = 256


def move_and_map(vm: VM, obj: VMObject) -> memoryview:
    """``obj.map()``: move ``obj`` into ``vm``'s pager process (first call) and map it.

    ``TypeError`` for objects that are not anonymous (files: use
    ``vm.mapped.map_file(path).map()`` or ``vmpager.memmap``);
    ``ObjectClosed`` for a closed object; ``UserfaultfdUnavailable`` (saying
    how to enable it) when userfaultfd cannot be used here, and the object
    then stays where it was, untouched.
    """
    if isinstance(obj, MovedObject):
        return obj.map()
    if obj.closed:
        raise ObjectClosed(f"VM object {obj.oid} is closed")
    if obj.kind is not ObjectKind.ANONYMOUS or type(obj) is not VMObject:
        raise TypeError(
            f"VM object {obj.oid} is a {obj.kind} object: only anonymous objects can be "
            "mapped; map files with vm.mapped.map_file(path).map() or vmpager.memmap "
            "(see docs/mapped.md)"
        )
    pager = vm.mapped  # UserfaultfdUnavailable here leaves obj as it was
    remote = pager.allocate(obj.size)
    try:
        _copy(obj, remote)
    except BaseException:
        remote.close()
        raise
    kernel = obj.kernel
    with kernel.cond:
        if _closed(obj):  # by another thread meanwhile
            remote.close()
            raise ObjectClosed(f"VM object {obj.oid} is closed")
        kernel.destroy_object(obj)  # frames, swap, backing reference: all released
        obj.__class__ = MovedObject
        moved = cast(MovedObject, obj)
        moved._remote = remote
        moved._gone = False
    return remote.map()


def _closed(obj: VMObject) -> bool:
    return obj.closed


def _copy(obj: VMObject, remote: MappedObject) -> None:
    """Copy the contents of ``obj`` into the (zero-filled) ``remote``, chunk by chunk."""
    for start in range(0, obj.npages, _CHUNK_NPAGES):
        pindices = np.arange(start, min(start + _CHUNK_NPAGES, obj.npages), dtype=np.int64)
        rows = VMObject.read_pages(obj, pindices)
        nonzero = rows.any(axis=1)
        if nonzero.any():
            remote.write_pages(pindices[nonzero], rows[nonzero])


class MovedObject(VMObject):
    """An object of a VM that was mapped: its pages live in the VM's pager process.

    Same identity, ``oid``, ``size`` and API as before the move; every call
    goes to the pager's object (``_remote``), which the mapping shows. Not an
    object of the client VM's kernel any more (``vm.objects()`` leaves it out).
    """

    _remote: MappedObject
    _gone: bool = False

    @property
    def closed(self) -> bool:
        """Has the object been closed (after the move, by its own ``close``)?"""
        return self._gone

    def check_open(self) -> None:
        """Raise ``ObjectClosed`` once the moved object is closed. O(1)."""
        if self._gone:
            raise ObjectClosed(f"VM object {self.oid} is closed")

    def __repr__(self) -> str:
        state = " closed" if self.closed else ""
        return (
            f"<VMObject {self.oid} {self.kind} {self.npages} pages, "
            f"moved to the pager process as object {self._remote.oid}{state}>"
        )

    def _open(self) -> MappedObject:
        if self.closed:
            raise ObjectClosed(f"VM object {self.oid} is closed")
        return self._remote

    def read(self, offset: int, length: int) -> bytes:
        offset, length = self._check_range(offset, length)
        return self._open().read(offset, length)

    def readinto(self, offset: int, buffer: WritableBuffer) -> int:
        view = memoryview(buffer).cast("B")
        if view.readonly:
            raise TypeError("buffer must be writable")
        offset, length = self._check_range(offset, view.nbytes)
        view[:] = self._open().read(offset, length)
        return length

    def write(self, offset: int, data: ReadableBuffer) -> int:
        if isinstance(cast(object, data), str):
            raise TypeError("data must be bytes-like, not str")
        view = memoryview(data).cast("B")
        offset, length = self._check_range(offset, view.nbytes)
        self._open().write(offset, view)
        return length

    def read_words(self, offsets: ArrayLike) -> NDArray[np.uint64]:
        array = self._index_array(offsets, "offsets", step=8, maximum=self.size - 8)
        return self._open().read_words(array)

    def write_words(self, offsets: ArrayLike, values: ArrayLike) -> None:
        array = self._index_array(offsets, "offsets", step=8, maximum=self.size - 8)
        self._open().write_words(array, values)

    def read_pages(self, pindices: ArrayLike) -> NDArray[np.uint8]:
        array = self._index_array(pindices, "pindices", step=1, maximum=self.npages - 1)
        return self._open().read_pages(array)

    def write_pages(self, pindices: ArrayLike, data: ArrayLike) -> None:
        array = self._index_array(pindices, "pindices", step=1, maximum=self.npages - 1)
        self._open().write_pages(array, data)

    def discard(self, offset: int, length: int) -> None:
        offset, length = self._check_range(offset, length)
        self._open().discard(offset, length)

    def map(self) -> memoryview:
        return self._open().map()

    def clone(self) -> VMObject:
        """A copy-on-write snapshot in the pager's VM: a moved object, not mapped yet."""
        remote = self._open().clone()
        copy = MovedObject(self.kernel, remote.oid, self.npages, ObjectKind.ANONYMOUS)
        copy._remote = remote
        return copy

    def reserve(self, offset: int = 0, length: int | None = None) -> None:
        self._open().reserve(offset, length)

    def strategy_read(self, offset: int, buffer: WritableBuffer) -> None:
        raise TypeError(f"VM object {self.oid} is mapped: strategy I/O bypasses its pages")

    def strategy_write(self, offset: int, data: ReadableBuffer) -> None:
        raise TypeError(f"VM object {self.oid} is mapped: strategy I/O bypasses its pages")

    def strategy_delete(self, offset: int, length: int) -> None:
        raise TypeError(f"VM object {self.oid} is mapped: strategy I/O bypasses its pages")

    def close(self) -> None:
        """Release the object in the pager. Its mapping must not be used afterwards."""
        if not self._gone:
            self._gone = True
            try:
                self._remote.close()
            except ObjectClosed:
                pass  # the VM (and its pager process) closed first
