"""VM objects: what users allocate, read, write, clone and close (struct vm_object).

An object is ``npages`` pages of ``page_size`` bytes. Its resident pages are
in ``pages``; the rest live with its pager (swap for anonymous memory) or in
a backing object (the shadow chain of a copy-on-write clone), or were never
written and read as zeros.

Methods here check arguments and forward to the VM, which does the work under
its lock. All methods are thread-safe and block while paging.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import numpy as np
from numpy.typing import ArrayLike, NDArray

from vmpager.units import check_int
from vmpager.vm import batch
from vmpager.vm.deadpager import DEAD_PAGER
from vmpager.vm.kind import ObjectKind

if TYPE_CHECKING:
    from vmpager.devices.protocol import ReadableBuffer, WritableBuffer
    from vmpager.vm.kernel import Kernel
    from vmpager.vm.page import Page
    from vmpager.vm.pagerops import Pager
    from vmpager.vm.storage import PageStorage

__all__ = [
    "NOT_RESERVED",
    "RESERVED_UNWRITTEN",
    "RESERVED_WRITTEN",
    "ObjectKind",
    "VMObject",
    "checked_range",
]

Int64Array = NDArray[np.int64]


def checked_range(obj: VMObject, offset: int, length: int) -> tuple[int, int]:
    """``(offset, length)`` as ints inside ``obj``; ``ObjectClosed`` for a closed
    object, ``ValueError``/``TypeError`` naming the argument otherwise. O(1)."""
    obj.check_open()
    offset = check_int(offset, "offset", minimum=0, maximum=obj.size)
    length = check_int(length, "length", minimum=0, maximum=obj.size - offset)
    return offset, length


#: ``VMObject.reserve_state`` values per page: no reserved block, a reserved
#: block without data yet (reads as zeros), a reserved block with data.
NOT_RESERVED = 0
RESERVED_UNWRITTEN = 1
RESERVED_WRITTEN = 2

#: Buffer types the hit path of ``write`` takes as they are (others go through memoryview).
_FAST_BUFFERS = (bytes, bytearray)


class VMObject:
    """A region of virtual memory of ``size`` bytes (a multiple of the page size)."""

    def __init__(self, kernel: Kernel, oid: int, npages: int, kind: str) -> None:
        self._kernel = kernel
        vm = kernel
        # The hit paths of read and write use these without going through the VM.
        self._lock = vm.lock
        self._arena = vm.frames.arena
        self._page_shift = vm.page_shift
        self._page_mask = vm.page_mask
        self._page_bytes = vm.page_size
        self.oid = oid
        self.npages = npages
        self.kind = ObjectKind(kind)
        self.pages: dict[int, Page] = {}
        #: Has swap metadata (OBJT_SWAP rather than OBJT_DEFAULT).
        self.swap_backed = False
        #: Shadow chain: where pages this object lacks come from.
        self.backing: VMObject | None = None
        self.backing_offset = 0
        #: Objects whose ``backing`` is this one (shadow_head).
        self.shadows: list[VMObject] = []
        #: Handles and shadows that keep this object alive.
        self.refcount = 1
        #: A frozen backing object made by ``clone``, invisible to users.
        self.internal = False
        #: Per page, for objects with reserved swap: NOT_RESERVED,
        #: RESERVED_UNWRITTEN (the block holds no data) or RESERVED_WRITTEN.
        self.reserve_state: bytearray | None = None
        #: Page ranges [start, end) of strategy requests in flight: faults wait.
        self.strategy_ranges: list[tuple[int, int]] = []
        #: Sequential fault detection (vm_map_entry next_read / read_ahead): the
        #: page after the last one paged in, and the current read-ahead window.
        self.readahead_next = 0
        self.readahead_npages = 0
        #: Shared page storage (mapped objects; see vm/storage.py), else None.
        self.storage: PageStorage | None = None
        #: The pager of the object's kind while it is open, the dead pager
        #: (vm/deadpager.py) once it is closed.
        self.pager: Pager = kernel.pagers.pager_for(self)

    # -- properties -----------------------------------------------------------

    @property
    def closed(self) -> bool:
        """Has the object been closed (its pager is the dead pager)?"""
        return self.pager is DEAD_PAGER

    def mark_closed(self) -> None:
        """Give the object the dead pager: from now on every access raises
        ``ObjectClosed``. Lock held; the caller frees its pages and store."""
        self.pager = DEAD_PAGER

    def check_open(self) -> None:
        """Raise ``ObjectClosed`` if the object is closed (for paths that change
        state before they reach its pager). O(1)."""
        if self.pager is DEAD_PAGER:
            DEAD_PAGER.refuse(self)

    def describe(self) -> str:
        """The object in words, for errors ("VM object 3")."""
        return f"VM object {self.oid}"

    @property
    def size(self) -> int:
        """Size in bytes."""
        return self.npages * self._kernel.page_size

    @property
    def kernel(self) -> Kernel:
        """The VM's internal interface (vm/kernel.py), for pagers and the NBD disk."""
        return self._kernel

    @property
    def page_size(self) -> int:
        return self._kernel.page_size

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        state = " closed" if self.closed else ""
        return (
            f"<VMObject {self.oid} {self.kind} {self.npages} pages, "
            f"{len(self.pages)} resident{state}>"
        )

    # -- data -------------------------------------------------------------------

    def _check_range(self, offset: int, length: int) -> tuple[int, int]:
        return checked_range(self, offset, length)

    def read(self, offset: int, length: int) -> bytes:
        """Return ``length`` bytes at ``offset`` (zeros where never written).

        Raises ``ValueError`` for a range outside the object and
        ``DeviceError`` when a page's only copy cannot be read.
        """
        if type(offset) is int is type(length) and length >= 0:
            # Hit path: a part of one resident, idle page, without the lock. The
            # copy is taken optimistically and kept only if, after it, the same
            # page is still the resident one and idle: a page that was freed (its
            # frame perhaps reused) and brought back is a new Page object. (A
            # negative offset finds no page: the slow path refuses it.)
            off = offset & self._page_mask
            if off + length <= self._page_bytes:
                pindex = offset >> self._page_shift
                pages = self.pages
                page = pages.get(pindex)
                if page is not None and not (page.busy or page.prefetched):
                    start = (page.frame << self._page_shift) + off
                    data = self._arena[start : start + length]
                    if pages.get(pindex) is page and not page.busy:
                        page.referenced = True
                        return data
        # A closed object has no pages: the fault reaches the dead pager.
        return self._kernel.read(self, offset, length)

    def readinto(self, offset: int, buffer: WritableBuffer) -> int:
        """Fill ``buffer`` with the bytes at ``offset``; returns its length."""
        view = memoryview(buffer).cast("B")
        if view.readonly:
            raise TypeError("buffer must be writable")
        offset, length = self._check_range(offset, view.nbytes)
        self._kernel.readinto(self, offset, view)
        return length

    def write(self, offset: int, data: ReadableBuffer) -> int:
        """Store ``data`` at ``offset``; returns the number of bytes written.

        Raises ``SwapExhausted`` when neither memory nor swap can take the
        new data (what was written before stays readable).
        """
        if type(offset) is int and type(data) in _FAST_BUFFERS:
            # Hit path: inside one resident, idle, dirty page (what hold_page does
            # for it), under the lock: a frame must not change hands mid-copy. A
            # clean page is made dirty here unless the read reserve is reached.
            # (acquire/release in try/finally: cheaper than ``with`` per call.)
            off = offset & self._page_mask
            end = off + len(data)
            if end <= self._page_bytes:
                lock = self._lock
                lock.acquire()
                try:
                    page = self.pages.get(offset >> self._page_shift)
                    if page is not None and not (page.busy or page.writing or page.prefetched):
                        if not page._dirty:
                            vm = self._kernel
                            reserve = vm.read_reserve
                            if (
                                vm.frames.free_nframes <= reserve
                                and vm.frames.nframes - vm.ndirty - 1 < reserve
                            ):
                                # The frames kept for page-ins would hold dirt
                                # (Kernel.room_to_dirty): the slow path makes room.
                                page = None
                            else:
                                vm.make_dirty(self, page)  # its swap copy is stale now
                        if page is not None:
                            page.referenced = True
                            start = page.frame << self._page_shift
                            self._arena[start + off : start + end] = data
                            return end - off
                finally:
                    lock.release()
        if isinstance(cast(object, data), str):
            raise TypeError("data must be bytes-like, not str")
        view = memoryview(data).cast("B")
        offset, length = self._check_range(offset, view.nbytes)
        self._kernel.write(self, offset, view)
        return length

    # -- batched access (vm/batch.py) ------------------------------------------------

    def _index_array(self, values: object, name: str, *, step: int, maximum: int) -> Int64Array:
        """``values`` as a 1-D int64 array of multiples of ``step`` in [0, maximum]."""
        self.check_open()
        array = np.asarray(values)
        if array.ndim == 1 and not len(array):
            return np.empty(0, dtype=np.int64)  # [] is float64 to numpy
        if array.ndim != 1 or array.dtype.kind not in "iu":
            raise TypeError(
                f"{name} must be a 1-D sequence of integers, got {array.ndim}-D {array.dtype}"
            )
        if array.dtype.kind == "u" and len(array) and int(array.max()) >= 1 << 63:
            raise ValueError(f"{name} must be in [0, {maximum}], got {int(array.max())}")
        array = array.astype(np.int64, copy=False)
        if len(array):
            low, high = int(array.min()), int(array.max())
            if low < 0 or high > maximum:
                bad = low if low < 0 else high
                raise ValueError(f"{name} must be in [0, {maximum}], got {bad}")
            if step > 1 and np.any(array & (step - 1)):
                raise ValueError(f"{name} must be multiples of {step}")
        return array

    def _frames_direct(self) -> bool:
        """Whether batched calls may work on the frames directly: True unless a
        subclass (files, device memory) has read and write rules of its own."""
        cls = type(self)
        return cls.read is VMObject.read and cls.write is VMObject.write

    def read_words(self, offsets: ArrayLike) -> NDArray[np.uint64]:
        """The 8-byte (native-endian) words at byte ``offsets``, in the order given.

        Offsets are multiples of 8 in ``[0, size - 8]``. Missing pages are
        paged in together, many reads in flight (see vm/batch.py); raises
        ``DeviceError`` when a page's only copy cannot be read.
        """
        array = self._index_array(offsets, "offsets", step=8, maximum=self.size - 8)
        if not self._frames_direct():
            return batch.read_words_each(self, array)
        return batch.read_words(self._kernel, self, array)

    def write_words(self, offsets: ArrayLike, values: ArrayLike) -> None:
        """Store ``values[i]`` as the 8-byte word at ``offsets[i]``.

        ``values``: integers in ``[0, 2**64)``, as many as offsets; an offset
        given twice keeps its last value. Raises ``SwapExhausted`` as
        ``write`` does; on an error some of the words may have been stored.
        """
        array = self._index_array(offsets, "offsets", step=8, maximum=self.size - 8)
        words = np.asarray(values)
        if words.shape == array.shape == (0,):
            return
        if words.shape != array.shape or words.dtype.kind not in "iu":
            raise TypeError(
                f"values must be {len(array)} integers, got shape {words.shape} of {words.dtype}"
            )
        if words.dtype.kind == "i" and len(words) and int(words.min()) < 0:
            raise ValueError(f"values must be in [0, 2**64), got {int(words.min())}")
        words = words.astype(np.uint64, copy=False)
        if not self._frames_direct():
            batch.write_words_each(self, array, words)
            return
        batch.write_words(self._kernel, self, array, words)

    def read_pages(self, pindices: ArrayLike) -> NDArray[np.uint8]:
        """Copies of whole pages, one row of ``page_size`` bytes per page index given."""
        array = self._index_array(pindices, "pindices", step=1, maximum=self.npages - 1)
        if not self._frames_direct():
            return batch.read_pages_each(self, array)
        return batch.read_pages(self._kernel, self, array)

    def write_pages(self, pindices: ArrayLike, data: ArrayLike) -> None:
        """Replace whole pages: row ``i`` of ``data`` (``page_size`` bytes) becomes page
        ``pindices[i]``; a page given twice keeps its last row. Old contents are not read."""
        array = self._index_array(pindices, "pindices", step=1, maximum=self.npages - 1)
        rows = np.asarray(data)
        if rows.ndim == 2 and rows.dtype != np.uint8:
            rows = np.ascontiguousarray(rows).view(np.uint8)
        if rows.shape != (len(array), self.page_size) or rows.dtype != np.uint8:
            raise TypeError(
                f"data must be {len(array)} rows of {self.page_size} bytes, "
                f"got shape {rows.shape} of {rows.dtype}"
            )
        if not self._frames_direct():
            # Later rows of a repeated page are written later: the last one wins.
            batch.write_pages_each(self, array, rows)
            return
        batch.write_pages(self._kernel, self, array, rows)

    def discard(self, offset: int, length: int) -> None:
        """Forget a range: it reads as zeros; whole pages give back frames and swap."""
        offset, length = self._check_range(offset, length)
        self._kernel.discard(self, offset, length)

    def map(self) -> memoryview:
        """A writable memoryview of the whole object (anonymous objects only).

        The first call moves the object into the VM's pager process, where its
        pages are served to the mapping and to this object's calls alike
        (mapped/moved.py, docs/mapped.md); ``TypeError`` for other kinds.
        """
        from vmpager.vm.system import map_object

        return map_object(self)

    def clone(self) -> VMObject:
        """A copy-on-write snapshot: from now on writes on either side are invisible
        to the other. Cheap: O(resident pages), no data is copied until written."""
        return self._kernel.clone(self)

    def reserve(self, offset: int = 0, length: int | None = None) -> None:
        """Assign swap to the pages of a range now (swap_pager_reserve), so that
        their pageouts cannot fail for lack of swap later.

        All or nothing: raises ``SwapExhausted`` (and takes nothing) when swap
        cannot hold the range. Whole pages covering the range are reserved.
        """
        if length is None:
            length = self.size - check_int(offset, "offset", minimum=0, maximum=self.size)
        offset, length = self._check_range(offset, length)
        self._kernel.reserve(self, offset, length)

    # -- strategy: cacheless block I/O (swap_pager_strategy) ----------------------

    def strategy_read(self, offset: int, buffer: WritableBuffer) -> None:
        """Fill ``buffer`` straight from swap (whole pages only); see pager/strategy.py."""
        view = memoryview(buffer).cast("B")
        if view.readonly:
            raise TypeError("buffer must be writable")
        self._kernel.strategy(self, "read", offset, view, view.nbytes)

    def strategy_write(self, offset: int, data: ReadableBuffer) -> None:
        """Write whole pages straight to swap, bypassing frames."""
        view = memoryview(data).cast("B")
        self._kernel.strategy(self, "write", offset, view, view.nbytes)

    def strategy_delete(self, offset: int, length: int) -> None:
        """Free the swap of whole pages (BIO_DELETE); they read as zeros."""
        self._kernel.strategy(self, "delete", offset, None, length)

    def _before_close(self) -> None:
        """Called with the VM lock held just before the object closes (file objects flush)."""

    def close(self) -> None:
        """Release the object: its frames and swap return to the VM. Idempotent."""
        if not self.closed:
            self._kernel.close_object(self)

    def __enter__(self) -> VMObject:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
