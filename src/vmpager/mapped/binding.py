"""A mapped object's pages, shared with the client: the pager process's side.

One ``SharedRegion`` per mapped VM object. The client maps a memfd of the
object's size (MAP_SHARED) and registered it with userfaultfd; the pager
process holds the same memfd and userfaultfd. A page of the object is
*bound* when memfd page ``p`` exists: its contents are there, and its VM
frame is emptied (``MADV_DONTNEED``), so the page is counted once against
the budget. Unbound pages live in ordinary frames and their memfd page is a
hole: the client's access faults, and the pager answers.

Binding (a fault on page ``p``): the VM makes the page resident (swap-in
with read-ahead, zero-fill, copy-on-write), ``UFFDIO_COPY`` copies the frame
into memfd page ``p`` and maps it in the client (write-protected while the
VM page is clean, so the first write faults once and marks it dirty), then
the frame is emptied. A stream's next pages are bound together (one
``pwritev`` into the memfd, one ``process_madvise`` for the frames). A frame
that a pageout is still reading is aliased onto the memfd page instead
(``mmap MAP_FIXED``). A bound page is always on the active queue.

Unbinding (the page leaves the active queue, ``PageStorage.leaving_active``,
or a call, a clone or the cap needs it): write-protect the client's page,
read the memfd page back into the frame, punch the memfd page (the client's
mapping of it is zapped). Pages that go together (the pages a stream left
behind, the oldest past the cap, a call's range) go in runs of consecutive
pages, one call of each kind per run. The page stays
resident in the VM, on the inactive queue: a client touch faults and binds
it again cheaply (the BSD inactive queue's second chance), else the page
daemon launders and frees it as any anonymous page. The clean pages a
stream leaves behind (not written while bound, their swap copy valid) are
dropped instead: punched and freed at once, with no copy back. Freeing a
bound page punches its hole.

The number of bound pages is capped (an aliased frame splits the frame
arena's mapping, and a process has at most ``vm.max_map_count`` mappings):
past the cap the oldest bound pages are deactivated.

All methods run with the VM lock held.
"""

from __future__ import annotations

import ctypes
import itertools
import os
from collections import OrderedDict
from typing import TYPE_CHECKING

from vmpager.mapped import uffd as U
from vmpager.vm.page import QUEUE_ACTIVE

if TYPE_CHECKING:
    from vmpager.vm.kernel import Kernel
    from vmpager.vm.object import VMObject
    from vmpager.vm.page import Page

__all__ = ["SharedRegion", "bound_page_limit"]

#: Read-ahead of a sequential stream of client faults: first and largest window.
_AHEAD_MIN = 8
_AHEAD_MAX = 128
_NSTREAMS = 8
#: In the read-as-write mode, one read fault in this many is still mapped
#: write-protected (a probe: each costs a second fault when the page is written).
_PROBE_EVERY = 32
#: Pages unbound together past the cap of bound pages.
_UNBIND_BATCH = 64
#: Most pages unbound in one run: one buffer per frame at worst, and a vectored
#: read takes at most IOV_MAX (1024) buffers.
_RUN_MAX = 512


def bound_page_limit() -> int:
    """How many pages may be bound at once in this process (mappings to spare)."""
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            most = int(f.read())
    except (OSError, ValueError):
        most = 65530
    return max(64, (most - 4096) // 2)


def _clean(page: Page) -> bool:
    """Must the client's first write fault? Yes while the page is clean, and while a
    pageout of it is in flight: its completion marks it clean, so a write that
    did not fault would be lost."""
    return not page.dirty or page.writing


class _Held(Exception):
    """A fault found the region held by a call or a flush when about to bind: retry."""


class SharedRegion:
    """The pager's half of one mapped object (implements ``vm.storage.PageStorage``)."""

    def __init__(
        self,
        vm: Kernel,
        obj: VMObject,
        uffd: U.Userfaultfd,
        memfd: int,
        client_base: int,
        limit: int,
        counts: dict[str, int],
    ) -> None:
        self.vm = vm
        self.obj = obj
        self.uffd = uffd
        self.memfd = memfd
        self.base = client_base
        self.size = obj.npages << vm.page_shift  # file objects: size is the file's
        self.ps = vm.page_size
        self._shift = vm.page_shift
        self.arena = vm.frames.array.ctypes.data
        #: A spare anonymous page for unbinding: its page moves onto a frame and it
        #: stays mapped, empty (MREMAP_DONTUNMAP), so no other mapping can take
        #: its place in the meantime.
        self.scratch = U.reserve(self.ps)
        #: pindex -> bound page, oldest binding first.
        self.bound: OrderedDict[int, Page] = OrderedDict()
        #: Bound pages the client may write without a fault (not write-protected).
        self.writable: set[int] = set()
        self.limit = limit
        self.counts = counts
        #: Expected next faults of the streams seen: page -> (direction, window).
        self._streams: OrderedDict[int, tuple[int, int]] = OrderedDict()
        #: Read faults mapped write-protected, and how many of them were then
        #: written (decayed counts): when most are, read faults map pages
        #: writable and dirty at once, saving the second fault (see ``fault``).
        self._protected = 0
        self._written = 0
        self._reads = 0
        #: Bound pages whose frame is an alias of the memfd page (bound while a
        #: pageout of them was reading the frame); the others' frames are empty.
        self.aliased: set[int] = set()
        #: A flush of the file is writing its pages: faults wait (``fault``).
        self.flushing = False
        #: Calls on the object in progress (the VM reads and writes frames, which
        #: must hold the pages: ``detach`` first); faults wait meanwhile.
        self.calls = 0
        self.closed = False

    # -- faults ------------------------------------------------------------

    def fault(self, fault: U.Fault) -> None:
        """Resolve one client fault in this region. VM lock held; may wait for I/O.

        Faults wait while a call or a flush uses the object's frames; one that
        began before (its page-in released the lock) and would bind a page
        meanwhile starts again once they are done (``_Held``)."""
        while True:
            while self.held:
                self.vm.cond.wait()
            try:
                self._fault(fault)
            except _Held:
                continue
            return

    @property
    def held(self) -> bool:
        """Is a call or a flush using the frames? Then no page may be bound."""
        return self.flushing or self.calls > 0

    def _fault(self, fault: U.Fault) -> None:
        pindex = (fault.address - self.base) >> self._shift
        addr = self.base + (pindex << self._shift)
        counts = self.counts
        if (fault.write or fault.wp) and not getattr(self.obj, "writable", True):
            raise PermissionError(
                f"write to a read-only file mapping ({getattr(self.obj, 'path', '?')}, mode 'r')"
            )
        if fault.wp:
            counts["wp_faults"] += 1
            self._written += 1
            page = self._hold(pindex, write=True)
            if self.bound.get(pindex) is page:
                self.uffd.writeprotect(addr, self.ps, False)  # and wake
                self.writable.add(pindex)
            else:
                self._bind(page, wp=False)
            return
        if pindex in self.bound:  # another thread's fault bound it first
            counts["spurious_faults"] += 1
            self.uffd.wake(addr, self.ps)
            return
        soft = pindex in self.obj.pages
        counts["soft_faults" if soft else "faults"] += 1
        likely = fault.write or 2 * self._written > self._protected
        write = likely = likely and getattr(self.obj, "writable", True)
        if not fault.write:
            # Read-modify-write programs (a[i] += 1) fault twice per page: a read,
            # then a write-protect fault. When most read-mapped pages are written
            # soon after, take the read as a write (the page is dirty at once,
            # its swap copy freed): one fault instead of two.
            # In that mode one read fault in 32 is still mapped protected: a probe
            # that keeps the estimate current.
            self._reads += 1
            write = likely and self._reads % _PROBE_EVERY != 0
            if write:
                counts["early_dirty"] += 1
            else:
                self._probed()
        page = self._hold(pindex, write=write)
        if self.bound.get(pindex) is page:
            self.uffd.wake(addr, self.ps)
        else:
            self._bind(page, wp=_clean(page))
        # A read fault in read-as-write mode probes its read-ahead window too (a page
        # mapped protected), so a stream that only reads (a.sum() after the array
        # was written) turns the mode off within a few windows instead of dirtying,
        # and writing back, everything it reads.
        self._read_ahead(pindex, likely, probe=likely and not fault.write)

    def _probed(self) -> None:
        """One more page mapped write-protected for a read (decayed count)."""
        self._protected += 1
        if self._protected >= 1024:
            self._protected //= 2
            self._written //= 2

    def _hold(self, pindex: int, *, write: bool) -> Page:
        page = self.vm.hold_page(self.obj, pindex, write=write, overwrite=False)
        if page.obj is not self.obj:
            # A clone's backing page: the client may only see pages of its own
            # object (a frame shared with a clone must not be aliased), so copy it up.
            page = self.vm.hold_page(self.obj, pindex, write=True, overwrite=False)
        return page

    def _read_ahead(self, pindex: int, write: bool, *, probe: bool = False) -> None:
        """A fault where a stream was expected continues it: bind its next pages too.

        Streams go up or down (a quicksort partition scans from both ends) and
        several may be interleaved: the last ``_NSTREAMS`` expected pages are
        remembered. A fault nobody expected starts two candidates (the page
        after it and the page before it). The window doubles from
        ``_AHEAD_MIN`` to ``_AHEAD_MAX`` pages; a falling stream's window is
        paged in upwards, so the VM's own sequential read-ahead reads it in
        large transfers.
        """
        streams = self._streams
        entry = streams.pop(pindex, None)
        if entry is None:
            self._expect(pindex + 1, 1, 0)
            self._expect(pindex - 1, -1, 0)
            return
        direction, window = entry
        window = min(max(_AHEAD_MIN, 2 * window), _AHEAD_MAX)
        if direction > 0:
            first, end = pindex + 1, min(pindex + 1 + window, self.obj.npages)
            self._expect(end, 1, window)
        else:
            first, end = max(pindex - window, 0), pindex
            self._expect(first - 1, -1, window)
        vm = self.vm
        behind = self.obj.readahead_npages
        if direction > 0 and behind >= vm.config.readahead_max_npages:
            # The VM gives up the pages a full-speed stream left a window behind
            # (Kernel.fault_done), one by one as the window's pages come in: unbind
            # them first, together.
            self._unbind_range(max(first - behind - window - 1, 0), end - behind)
        # Probes: one page in 32 while the estimate rests on little evidence (just
        # after a write pass: a.sum() of an array just filled), one a window after.
        every = _PROBE_EVERY if self._protected + self._written < 64 else _AHEAD_MAX
        held: list[Page] = []
        for q in range(first, end):
            if q in self.bound:
                continue
            if vm.frames.free_nframes <= vm.free_min_nframes and q not in self.obj.pages:
                break  # no frame to spare without waiting: stop here
            if probe and q % every == 0:
                page = self._hold(q, write=False)
                if _clean(page):
                    self._probed()
                held.append(page)
            else:
                held.append(self._hold(q, write=write))
        # Holding may have released the lock (I/O): bind what is still there, idle
        # and unbound, in runs of consecutive pages (none while a call or a flush
        # uses the frames).
        if self.held:
            return
        pages = self.obj.pages
        run: list[Page] = []
        for page in held:
            ok = (
                pages.get(page.pindex) is page
                and not page.busy
                and page.pindex not in self.bound
                and page.obj is self.obj
            )
            if run and (not ok or page.pindex != run[-1].pindex + 1):
                self._bind_run(run)
                run = []
            if ok:
                run.append(page)
        if run:
            self._bind_run(run)

    def _expect(self, pindex: int, direction: int, window: int) -> None:
        if 0 <= pindex < self.obj.npages:
            self._streams[pindex] = (direction, window)
            if len(self._streams) > _NSTREAMS:
                self._streams.popitem(last=False)

    def _bind_run(self, run: list[Page]) -> None:
        """Bind consecutive pages the client has not touched yet, without a copy ioctl
        each: protect the clean ones (a write-protect marker on the empty entry),
        write all the frames into the memfd in one ``pwritev``, alias each frame.
        The client's first access then maps the page without a userfault (a write
        to a protected page still faults once)."""
        ps = self.ps
        shift = self._shift
        first = run[0].pindex
        clean = [_clean(page) for page in run]
        i = 0
        while i < len(run):
            # One call per stretch: protect the clean pages; clear the dirty ones'
            # protection (a marker left where a protected page was punched would
            # make the first write fault).
            j = i
            while j < len(run) and clean[j] == clean[i]:
                j += 1
            start, length = self.base + ((first + i) << shift), (j - i) * ps
            self.uffd.writeprotect(start, length, clean[i], wake=False)
            i = j
        buffers = self._frame_buffers(run)
        for page in run:
            page.busy = True  # the lockless read path waits until the frames are shared
        try:
            written = os.pwritev(self.memfd, buffers, first << shift)
            if written != len(run) * ps:
                raise OSError(f"short write to the memfd: {written} of {len(run) * ps} bytes")
            self._give_frames(run)
        finally:
            for page in run:
                page.busy = False
        self._bound_run(run, clean)
        self.counts["ahead_pages"] += len(run)

    def _frame_buffers(self, run: list[Page]) -> list[memoryview]:
        """The frames of consecutive pages ``run`` as buffers for one vectored read or
        write, frames that follow each other in memory merged into one buffer."""
        fview = self.vm.frames.view
        shift = self._shift
        buffers = []
        first = last = run[0].frame
        for page in run[1:]:
            frame = page.frame
            if frame != last + 1:
                buffers.append(fview[first << shift : (last + 1) << shift])
                first = frame
            last = frame
        buffers.append(fview[first << shift : (last + 1) << shift])
        return buffers

    def _bind(self, page: Page, *, wp: bool) -> None:
        pindex = page.pindex
        offset = pindex << self._shift
        frame_addr = self.arena + (page.frame << self._shift)
        # The copy wakes the faulting thread at once: what it then writes is in the
        # memfd page, and a call that reads the page takes the VM lock (to detach
        # it) after this fault is done. Busy meanwhile, for the VM's lockless read
        # path all the same.
        if self.held:
            raise _Held
        page.busy = True
        try:
            if not self.uffd.copy(self.base + offset, frame_addr, self.ps, wp=wp):
                raise AssertionError(f"memfd page {pindex} exists but is not bound")
            self._give_frame(page)
        finally:
            page.busy = False
        self._bound(page, writable=not wp)

    def _give_frame(self, page: Page) -> None:
        """The memfd page now holds the page's contents: free the frame's memory
        (``MADV_DONTNEED``: the frame reads as zeros until the page unbinds), so the
        page is counted once against the budget. No mapping changes, so the frame
        arena stays one mapping. A frame a pageout is reading (``page.writing``)
        is aliased to the memfd page instead (``mmap MAP_FIXED``): the write must
        see the contents."""
        frame_addr = self.arena + (page.frame << self._shift)
        if page.writing:
            U.map_fixed(frame_addr, self.ps, self.memfd, page.pindex << self._shift)
            self.aliased.add(page.pindex)
        else:
            U.madvise(frame_addr, self.ps, U.MADV_DONTNEED)

    def _give_frames(self, run: list[Page]) -> None:
        """``_give_frame`` for several pages: one system call for the emptied frames."""
        shift = self._shift
        empty = []
        for page in run:
            if page.writing:
                self._give_frame(page)
            else:
                empty.append(self.arena + (page.frame << shift))
        U.madvise_pages(empty, self.ps, U.MADV_DONTNEED)

    def _bound(self, page: Page, *, writable: bool) -> None:
        pindex = page.pindex
        self.bound[pindex] = page
        if writable:
            self.writable.add(pindex)
        else:
            self.writable.discard(pindex)
        page.referenced = True
        self.vm.queues.activate(page)
        if len(self.bound) > self.limit:
            # Past the cap (mappings to spare), the oldest go together.
            self._unbind_oldest(_UNBIND_BATCH)

    def _bound_run(self, run: list[Page], clean: list[bool]) -> None:
        """``_bound`` for the pages of a run (``clean``: each one's write protection),
        with one look at the cap for the whole run."""
        bound, writable = self.bound, self.writable
        activate = self.vm.queues.activate
        for page, protected in zip(run, clean, strict=True):
            pindex = page.pindex
            bound[pindex] = page
            if protected:
                writable.discard(pindex)
            else:
                writable.add(pindex)
            page.referenced = True
            activate(page)
        excess = len(bound) - self.limit
        if excess > 0:
            self._unbind_oldest(max(_UNBIND_BATCH, excess))

    def _unbind_oldest(self, n: int) -> None:
        """Unbind the ``n`` oldest bound pages together and deactivate them (the BSD
        inactive queue: a touch soft-faults them back)."""
        self._unbind_pages(list(itertools.islice(self.bound.values(), n)))

    def _unbind_range(self, first: int, end: int) -> None:
        """Give up what a stream left behind in ``[first, end)``: what
        ``Kernel.fault_done`` does (the pages go to the head of the inactive queue,
        unreferenced: the next the daemon frees), done before it and together.

        A clean page (the client never wrote it while bound: it is write-protected,
        and its VM page is not dirty, so its swap copy, if any, is valid; without
        one it reads as zeros) is dropped at once: its memfd page is punched and its
        VM page freed, with no copy back into the frame and no trip through the
        inactive queue. The others are unbound (read back, punched) and deactivated.
        """
        bound = self.bound
        pages = [page for p in range(first, end) if (page := bound.get(p)) is not None]
        writable, aliased = self.writable, self.aliased
        keep: list[Page] = []
        drop: list[Page] = []
        for page in pages:
            p = page.pindex
            if page.dirty or page.busy or page.writing or p in writable or p in aliased:
                keep.append(page)
            else:
                drop.append(page)
        if drop:
            self._drop_pages(drop)
        self._unbind_pages(keep, noreuse=True)

    def _drop_pages(self, pages: list[Page]) -> None:
        """Free clean bound ``pages`` (ascending, none writable, aliased, busy or in a
        pageout): punch their memfd pages in runs (the client's mappings of them are
        zapped: its next access faults and pages them in again), then free them in
        the VM. Their frames are empty already (their memory was given up when they
        were bound)."""
        shift = self._shift
        bound = self.bound
        start = prev = pages[0].pindex
        for page in pages[1:]:
            p = page.pindex
            if p != prev + 1:
                U.fallocate_punch(self.memfd, start << shift, (prev + 1 - start) << shift)
                start = p
            prev = p
        U.fallocate_punch(self.memfd, start << shift, (prev + 1 - start) << shift)
        free_page = self.vm.free_page
        # Highest first: the free list hands frames out last-freed first, so a run
        # paged in next may get them in ascending order, to be copied in one piece
        # (``_frame_buffers``; in practice most runs' frames are scattered).
        for page in reversed(pages):
            del bound[page.pindex]
            free_page(page)
        self.counts["dropped"] += len(pages)

    def _unbind_pages(self, pages: list[Page], *, noreuse: bool = False) -> None:
        """Unbind bound ``pages`` in runs of consecutive pages (one protect, one read,
        one punch each), then take them off the active queue: to the inactive
        queue's tail, or with ``noreuse`` its head, unreferenced. Aliased pages
        take the single-page path."""
        if not pages:
            return
        pages.sort(key=lambda page: page.pindex)
        self._unbind_runs(pages, aliased=False)
        queues = self.vm.queues
        if noreuse:
            # Highest first: each goes to the head, so the head ends in ascending order.
            for page in reversed(pages):
                page.referenced = False
                queues.deactivate_noreuse(page)
        else:
            for page in pages:
                queues.deactivate(page)

    def _unbind_runs(self, pages: list[Page], *, aliased: bool) -> None:
        """Unbind bound ``pages`` (ascending page index) in runs of consecutive pages,
        one protect, one read and one punch per run. Aliased pages are passed over,
        or with ``aliased`` unbound alone (``leaving_active``)."""
        run: list[Page] = []
        for page in pages:
            if page.pindex in self.aliased:
                if aliased:
                    self.leaving_active(page)
                continue  # rare: leaving_active unbinds it alone when it leaves
            if run and (page.pindex != run[-1].pindex + 1 or len(run) >= _RUN_MAX):
                self._unbind_run(run)
                run = []
            run.append(page)
        if run:
            self._unbind_run(run)

    def _unbind_run(self, run: list[Page]) -> None:
        """Unbind consecutive pages (none aliased, at most ``_RUN_MAX``): protect them
        from client writes, read the memfd pages back into their frames in one
        ``preadv``, punch them."""
        shift = self._shift
        offset = run[0].pindex << shift
        length = len(run) << shift
        writable = self.writable
        if any(page.pindex in writable for page in run):
            try:
                self.uffd.writeprotect(self.base + offset, length, True)
            except OSError:
                pass  # the client unmapped the region or exited
        buffers = self._frame_buffers(run)
        got = os.preadv(self.memfd, buffers, offset)
        if got != length:
            raise OSError(f"short read of the memfd: {got} of {length} bytes")
        U.fallocate_punch(self.memfd, offset, length)
        for page in run:
            del self.bound[page.pindex]
            writable.discard(page.pindex)
        self.counts["unbinds"] += len(run)
        self.counts["unbind_runs"] += 1

    # -- PageStorage ------------------------------------------------------------------

    def leaving_active(self, page: Page) -> None:
        if self.bound.get(page.pindex) is not page:
            return
        offset = page.pindex << self._shift
        frame_addr = self.arena + (page.frame << self._shift)
        if page.pindex in self.writable:
            try:
                # No client write may land between the copy and the punch.
                self.uffd.writeprotect(self.base + offset, self.ps, True)
            except OSError:
                pass  # the client unmapped the region or exited
            self.writable.discard(page.pindex)
        if page.pindex in self.aliased:
            ctypes.memmove(self.scratch, frame_addr, self.ps)
            U.mremap_fixed(self.scratch, self.ps, frame_addr, keep=True)
            self.aliased.discard(page.pindex)
        else:
            start = page.frame << self._shift
            got = os.preadv(self.memfd, [self.vm.frames.view[start : start + self.ps]], offset)
            if got != self.ps:
                raise OSError(f"short read of the memfd: {got} of {self.ps} bytes")
        U.fallocate_punch(self.memfd, offset, self.ps)
        del self.bound[page.pindex]
        self.counts["unbinds"] += 1
        self.counts["unbind_runs"] += 1

    def leaving_active_pages(self, pages: list[Page]) -> None:
        """``leaving_active`` for several pages at once (the page daemon's
        deactivations): the bound ones are unbound in runs of consecutive pages."""
        bound = self.bound
        mine = [page for page in pages if bound.get(page.pindex) is page]
        if not mine:
            return
        mine.sort(key=lambda page: page.pindex)
        self._unbind_runs(mine, aliased=True)
        self.counts["daemon_unbinds"] += len(mine)

    def freeing(self, page: Page) -> None:
        if self.bound.get(page.pindex) is not page:
            return
        offset = page.pindex << self._shift
        U.fallocate_punch(self.memfd, offset, self.ps)
        if page.pindex in self.aliased:
            U.map_fixed(self.arena + (page.frame << self._shift), self.ps)
            self.aliased.discard(page.pindex)
        del self.bound[page.pindex]
        self.writable.discard(page.pindex)

    def check(self, obj: VMObject) -> list[str]:
        problems = []
        for pindex, page in self.bound.items():
            if obj.pages.get(pindex) is not page:
                problems.append(f"mapped page {obj.oid}:{pindex} is bound but not resident")
            elif page.queue != QUEUE_ACTIVE:
                problems.append(f"mapped page {obj.oid}:{pindex} is bound but not active")
        for pindex in self.aliased - self.bound.keys():
            problems.append(f"mapped page {obj.oid}:{pindex} is aliased but not bound")
        if not self.closed:
            allocated = U.allocated_bytes(self.memfd)
            if allocated != len(self.bound) * self.ps:
                problems.append(
                    f"mapped object {obj.oid}: memfd holds {allocated} bytes, "
                    f"{len(self.bound)} pages bound"
                )
        return problems

    # -- end ------------------------------------------------------------

    def detach(self, first: int, end: int) -> None:
        """Unbind the bound pages in ``[first, end)`` (their frames hold them again)
        and deactivate them, before a call reads or writes them through the VM.
        VM lock held."""
        bound = self.bound
        if end - first > len(bound):
            pages = [page for p, page in bound.items() if first <= p < end]
        else:
            pages = [page for p in range(first, end) if (page := bound.get(p)) is not None]
        self._unbind_pages(pages)

    def detach_pages(self, pindices: list[int]) -> None:
        """``detach`` for scattered pages."""
        bound = self.bound
        self._unbind_pages([page for p in pindices if (page := bound.get(p)) is not None])

    def unbind_all(self) -> None:
        """Unbind and deactivate every bound page (before a clone, an unmap, a flush).
        VM lock held."""
        self._unbind_pages(list(self.bound.values()))

    def close(self) -> None:
        """The client unmapped the region: detach every page, forget the memfd."""
        if self.closed:
            return
        if not self.obj.closed:
            self.unbind_all()
        else:
            for page in list(self.bound.values()):
                self.freeing(page)
        self.closed = True
        self.obj.storage = None
        os.close(self.memfd)
        U.munmap(self.scratch, self.ps)

    def allocated_bytes(self) -> int:
        return 0 if self.closed else U.allocated_bytes(self.memfd)
