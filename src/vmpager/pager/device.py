"""The device pager: fixed memory as a VM object (uvm_deviceops, FreeBSD device_pager.c).

``map_device(vm, buffer)`` wraps memory the caller owns and that never
moves (a ``bytearray``, an ``mmap``, a C-contiguous numpy array, any
buffer) in a ``DeviceObject`` of kind "device". As with a device's memory
in the kernel, its pages are not the VM's to manage:

- reads and writes go straight to that memory, with no copy into frames;
  its pages are never resident in the frame pool, so they cost no budget,
  are never paged out, and are not evictable;
- the memory is pinned: the object holds a buffer export, so a ``bytearray``
  cannot be resized nor an ``mmap`` closed while it is mapped;
- the size is the buffer's size in bytes, any size >= 1: the object has
  ``ceil(size / page_size)`` pages and the last one may be partial; no
  access may pass the end. A read-only buffer gives a read-only object.

The pager interface still works, for code that reaches the object through
the generic paths (a shadow chain, the pager conformance suite): ``get_pages``
copies the memory into the frames (zeros past the end), ``put_pages`` copies
frames back (the valid part only). Such frame copies are clean caches: a
direct write drops the copies of the pages it touched.

Copies run without the VM lock (the object counts the threads inside and
closing waits for them); only the bookkeeping takes it.
"""

from __future__ import annotations

import errno
import mmap
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from vmpager.errors import InvariantViolation
from vmpager.units import check_int
from vmpager.vm.object import VMObject
from vmpager.vm.pagerops import PagerResult

if TYPE_CHECKING:
    from vmpager.devices.protocol import ReadableBuffer, WritableBuffer
    from vmpager.vm.kernel import Kernel
    from vmpager.vm.page import Page

__all__ = ["DeviceObject", "DevicePager", "DevicePagerStatistics", "map_device"]


@dataclass(frozen=True, slots=True)
class DevicePagerStatistics:
    """Counters of the device pager since the VM started (``DevicePager.statistics()``)."""

    objects: int
    size_bytes: int
    reads: int
    read_bytes: int
    writes: int
    write_bytes: int
    pagein_pages: int
    pageout_pages: int
    invalidated_pages: int


class DeviceObject(VMObject):
    """Fixed memory seen as a VM object (kind "device"); see the module docstring."""

    def __init__(self, vm: Kernel, pager: DevicePager, buffer: object, view: memoryview) -> None:
        size_bytes = view.nbytes
        super().__init__(vm, 0, -(-size_bytes // vm.page_size), "device")
        self._pager = pager
        #: The caller's object, kept so the memory outlives the mapping.
        self.buffer = buffer
        self._view: memoryview | None = view
        self.size_bytes = size_bytes
        self.writable = not view.readonly
        #: Threads copying to or from the memory right now (close waits for them).
        self._users = 0

    @property
    def size(self) -> int:
        """Size in bytes: the buffer's size."""
        return self.size_bytes

    def describe(self) -> str:
        return f"VM object {self.oid} (device)"

    def __repr__(self) -> str:
        state = " closed" if self.closed else ""
        mode = "rw" if self.writable else "ro"
        return (
            f"<DeviceObject {self.oid} {type(self.buffer).__name__} {mode} "
            f"{self.size_bytes} bytes{state}>"
        )

    @contextmanager
    def _using(self, offset: int, length: int) -> Iterator[memoryview]:
        """The memory, held open against ``close`` for the duration of a copy."""
        vm = self._kernel
        with vm.cond:
            view = self._view
            self.check_open()
            if view is None:
                raise AssertionError(f"{self!r}: open without its memory")
            if offset < 0 or length < 0 or offset + length > self.size_bytes:
                self._check_range(offset, length)
            self._users += 1
        try:
            yield view
        finally:
            with vm.cond:
                self._users -= 1
                if not self._users:
                    vm.cond.notify_all()

    def read(self, offset: int, length: int) -> bytes:
        """Return ``length`` bytes at ``offset`` straight from the memory."""
        if type(offset) is not int or type(length) is not int:
            offset = check_int(offset, "offset")
            length = check_int(length, "length")
        with self._using(offset, length) as view:
            data = view[offset : offset + length].tobytes()
        self._pager.note_read(length)
        return data

    def readinto(self, offset: int, buffer: WritableBuffer) -> int:
        """Fill ``buffer`` from the memory at ``offset``; returns its length."""
        out = memoryview(buffer).cast("B")
        if out.readonly:
            raise TypeError("buffer must be writable")
        offset = check_int(offset, "offset")
        length = out.nbytes
        with self._using(offset, length) as view:
            out[:] = view[offset : offset + length]
        self._pager.note_read(length)
        return length

    def write(self, offset: int, data: ReadableBuffer) -> int:
        """Store ``data`` at ``offset`` straight into the memory; returns its length.

        Raises ``PermissionError`` for read-only memory and ``ValueError``
        for a range past the end (device memory does not grow).
        """
        if isinstance(cast(object, data), str):
            raise TypeError("data must be bytes-like, not str")
        src = memoryview(data).cast("B")
        offset = check_int(offset, "offset")
        if not self.writable:
            raise PermissionError(errno.EACCES, "the device memory is read-only")
        length = src.nbytes
        with self._using(offset, length) as view:
            view[offset : offset + length] = src
        if length:
            self._pager.written(self, offset, length)
        return length

    def discard(self, offset: int, length: int) -> None:
        """Zero a range of the memory (device memory cannot be given back)."""
        offset, length = self._check_range(offset, length)
        self.write(offset, bytes(length))

    def flush(self) -> None:
        """Push the memory to its backing file when it is a shared ``mmap`` (msync)."""
        buffer = self.buffer
        if isinstance(buffer, mmap.mmap) and self.writable:
            with self._using(0, 0):
                buffer.flush()

    def clone(self) -> VMObject:
        """Not for device memory, which the VM does not own."""
        raise TypeError("device memory cannot be cloned; copy it into vm.allocate() instead")


class DevicePager:
    """The pager of kind "device": one per VM. Every method runs with the VM lock held."""

    kind = "device"

    def __init__(self, vm: Kernel) -> None:
        self._kernel = vm
        self._objects: dict[int, DeviceObject] = {}
        self._reads = 0
        self._read_bytes = 0
        self._writes = 0
        self._write_bytes = 0
        self._pagein_pages = 0
        self._pageout_pages = 0
        self._invalidated_pages = 0

    # -- maps ------------------------------------------------------------------------

    def map(self, buffer: object) -> DeviceObject:
        """Wrap ``buffer`` in a new device object (the caller holds no lock)."""
        try:
            view = memoryview(buffer)  # type: ignore[arg-type]
        except TypeError:
            raise TypeError(
                "buffer must support the buffer protocol (bytearray, mmap, numpy array), "
                f"got {type(buffer).__name__}"
            ) from None
        if not view.c_contiguous:
            view.release()
            raise TypeError("buffer must be C-contiguous memory")
        view = view.cast("B")
        if view.nbytes < 1:
            view.release()
            raise ValueError("buffer must hold at least 1 byte, got 0")
        vm = self._kernel
        with vm.cond:
            vm.check_open()
            obj = DeviceObject(vm, self, buffer, view)
            vm.register_object(obj)
            self._objects[obj.oid] = obj
            return obj

    def note_read(self, nbytes: int) -> None:
        """Count a direct read (no lock needed: counters only)."""
        self._reads += 1
        self._read_bytes += nbytes

    def written(self, obj: DeviceObject, offset: int, nbytes: int) -> None:
        """A direct write happened: count it and drop stale frame copies of its pages."""
        vm = self._kernel
        ps = vm.page_size
        first = offset // ps
        end = -(-(offset + nbytes) // ps)
        with vm.cond:
            self._writes += 1
            self._write_bytes += nbytes
            if obj.pages:
                while True:
                    stale = [p for i, p in obj.pages.items() if first <= i < end]
                    busy = next((p for p in stale if p.busy or p.writing), None)
                    if busy is None:
                        break
                    vm.wait_page(busy)
                for page in stale:
                    vm.free_page(page)
                self._invalidated_pages += len(stale)

    # -- the pager interface ------------------------------------------------------------

    def has_page(self, obj: VMObject, pindex: int) -> bool:
        """Every page of the memory is on the "store"."""
        return 0 <= pindex < obj.npages

    def has_pages(self, obj: VMObject, start: int, npages: int) -> list[bool]:
        """``has_page`` for ``npages`` pages from ``start``. O(npages), no I/O."""
        return [self.has_page(obj, start + i) for i in range(npages)]

    def page_run(
        self, obj: VMObject, pindex: int, before_max: int, after_max: int
    ) -> tuple[int, int] | None:
        """Memory is random access: any run inside the object is one copy."""
        if not 0 <= pindex < obj.npages:
            return None
        return min(before_max, pindex), max(0, min(after_max, obj.npages - 1 - pindex))

    def readaround_npages(self, obj: VMObject, pindex: int, default_npages: int) -> int:
        """The fixed read-around window (sequential anonymous streams ramp up in the
        fault path, ``Kernel.fault_stream``)."""
        return default_npages

    def batches_pageout(self, obj: VMObject) -> bool:
        return False

    def cluster_bounds(self, obj: VMObject, pindex: int) -> tuple[int, int]:
        n = self._kernel.config.cluster_max_npages
        lo = pindex - pindex % n
        return lo, min(lo + n, obj.npages)

    def get_pages(self, obj: VMObject, pages: Sequence[Page], reqpage: int) -> PagerResult:
        """Copy the memory into ``pages``' frames (zeros past the end); never fails."""
        vm = self._kernel
        dobj = cast(DeviceObject, obj)
        view = dobj._view
        if view is None or pages[-1].pindex >= obj.npages:
            return PagerResult.FAIL
        ps = vm.page_size
        array = vm.frames.array
        for i, page in enumerate(pages):
            start = page.pindex * ps
            n = min(ps, dobj.size_bytes - start)
            vm.frames.view[page.frame * ps : page.frame * ps + n] = view[start : start + n]
            if n < ps:
                array[page.frame, n:] = 0
            if i != reqpage:
                page.busy = False
                page.dirty = False
                vm.queues.deactivate(page)
        self._pagein_pages += len(pages)
        vm.cond.notify_all()
        return PagerResult.OK

    def put_pages(self, obj: VMObject, pages: Sequence[Page], *, sync: bool) -> list[PagerResult]:
        """Copy ``pages``' frames into the memory (the valid part of the last page)."""
        vm = self._kernel
        dobj = cast(DeviceObject, obj)
        view = dobj._view
        result = PagerResult.OK
        if view is None or not dobj.writable:
            result = PagerResult.ERROR  # read-only memory: the pages stay dirty
        else:
            ps = vm.page_size
            for page in pages:
                start = page.pindex * ps
                n = min(ps, dobj.size_bytes - start)
                view[start : start + n] = vm.frames.view[page.frame * ps : page.frame * ps + n]
            self._pageout_pages += len(pages)
        for page in pages:
            page.writing = False
            page.wanted = False
            if result is PagerResult.OK:
                page.dirty = False
            else:
                vm.queues.activate(page)
        vm.cond.notify_all()
        return [result] * len(pages)

    def unswapped(self, obj: VMObject, pindex: int) -> None:
        """Nothing to free: the memory keeps its bytes until written."""

    def free_space(self, obj: VMObject, start: int, npages: int) -> None:
        """Nothing to free: device memory is not the VM's."""

    def dealloc(self, obj: VMObject) -> None:
        """Wait for copies in progress, then give up the buffer export."""
        vm = self._kernel
        dobj = cast(DeviceObject, obj)
        while dobj._users:
            vm.cond.wait()
        self._objects.pop(dobj.oid, None)
        view = dobj._view
        dobj._view = None
        if view is not None:
            view.release()

    # -- statistics and invariants ----------------------------------------------------

    def statistics(self) -> DevicePagerStatistics:
        """Counters and the memory mapped now (caller holds the VM lock)."""
        return DevicePagerStatistics(
            objects=len(self._objects),
            size_bytes=sum(o.size_bytes for o in self._objects.values()),
            reads=self._reads,
            read_bytes=self._read_bytes,
            writes=self._writes,
            write_bytes=self._write_bytes,
            pagein_pages=self._pagein_pages,
            pageout_pages=self._pageout_pages,
            invalidated_pages=self._invalidated_pages,
        )

    def check(self) -> None:
        """Check every device object (caller holds the VM lock); raise
        ``InvariantViolation`` listing every inconsistency.

        Each mapped object is registered, open, holds its memory with the
        right page count; frame copies of its pages (generic paths only) are
        clean and equal to the memory.
        """
        vm = self._kernel
        ps = vm.page_size
        problems: list[str] = []
        for oid, obj in self._objects.items():
            where = f"device object {oid}"
            if obj.closed:
                continue  # being destroyed: dealloc takes it out
            if vm.objects.get(oid) is not obj:
                problems.append(f"{where}: mapped but not registered with the VM")
            view = obj._view
            if view is None:
                problems.append(f"{where}: open without its memory")
                continue
            if view.nbytes != obj.size_bytes or obj.npages != -(-obj.size_bytes // ps):
                problems.append(
                    f"{where}: {obj.npages} pages, {obj.size_bytes} bytes, memory {view.nbytes}"
                )
            for pindex, page in obj.pages.items():
                if page.busy or page.writing:
                    continue
                start = pindex * ps
                n = min(ps, obj.size_bytes - start)
                frame = vm.frames.view[page.frame * ps : page.frame * ps + n]
                if page.dirty or frame != view[start : start + n]:
                    problems.append(f"{where}: frame copy of page {pindex} differs from memory")
        for other in vm.objects.values():
            if isinstance(other, DeviceObject) and self._objects.get(other.oid) is not other:
                problems.append(f"device object {other.oid}: registered but not mapped")
        if problems:
            raise InvariantViolation(problems)


def map_device(vm: Kernel, buffer: object) -> DeviceObject:
    """Map fixed memory as a device object: see ``VM.map_device`` and the module docstring."""
    return cast(DevicePager, vm.device_pager).map(buffer)  # this module's own pager
