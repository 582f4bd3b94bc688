"""The fault path: make a page of an object resident (vm_fault).

``hold_page`` returns, with the VM lock held, a resident page whose frame
holds the data of ``(obj, pindex)``:

1. resident in ``obj`` and idle: a hit;
2. busy (being filled) or, for a write, being written out: wait, retry;
3. not resident: walk the shadow chain; the first level that has the page
   resident or on its pager supplies it; a read uses the backing page in
   place, a write copies it up into ``obj`` (copy-on-write);
4. on a pager: ``get_pages`` with read-around: the pages before and after
   that are contiguous on the store, inside one stripe, not resident and
   inside the object, up to the read-around window on each side;
5. nowhere: a zero-filled page (clean for a read, dirty for a write).

A thread that finds no free frame wakes the page daemon and waits; when
neither memory nor swap can make room, a write raises ``SwapExhausted``.
Page-ins may use the last ``read_reserve`` frames, so reading data that is
already on swap keeps working when memory is full of unswappable dirt.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vmpager.errors import DeviceError
from vmpager.vm.kind import ObjectKind
from vmpager.vm.page import QUEUE_ACTIVE, Page
from vmpager.vm.pagerops import PagerResult
from vmpager.vm.queues import ACT_INIT
from vmpager.vm.registry import get_pages

if TYPE_CHECKING:
    from vmpager.vm.kernel import Kernel
    from vmpager.vm.object import VMObject
    from vmpager.vm.pagerops import Pager

__all__ = ["hold_new_run", "hold_page"]


def hold_page(vm: Kernel, obj: VMObject, pindex: int, *, write: bool, overwrite: bool) -> Page:
    """Return the resident page with the data of ``(obj, pindex)``; VM lock held.

    For a write the page belongs to ``obj``, is idle and already marked dirty
    (its stale swap copy freed), and ``overwrite`` (the caller replaces the
    whole page) skips reading the old contents. For a read the page may
    belong to a backing object. The page stays valid while the caller keeps
    the lock.
    """
    pages = obj.pages
    while True:
        page = pages.get(pindex)
        if page is not None:
            if page.busy or (write and page.writing):
                vm.wait_page(page)
                continue
            page.referenced = True
            if page.prefetched:
                page.prefetched = False
                vm.counters.readaround_hits += 1
            if write and not page._dirty:
                if not vm.room_to_dirty():
                    continue  # it made room, releasing the lock: look again
                vm.make_dirty(obj, page)
            return page
        page = _fault_in(vm, obj, pindex, write=write, overwrite=overwrite)
        if page is not None:
            return page


def hold_new_run(vm: Kernel, obj: VMObject, first: int, npages: int) -> list[Page]:
    """Up to ``npages`` new pages from ``first`` for a write that replaces them whole.

    What ``hold_page(..., write=True, overwrite=True)`` does page by page for
    pages that are nowhere (not resident, not on the pager), done for the run
    at once: frames taken without waiting, one look at the pager, one update
    of the stream, one wake of the daemon. The pages are dirty, idle, on the
    active queue, and their contents are NOT initialised: the caller must
    overwrite every one of them before it releases the lock. VM lock held.

    Returns the pages of the longest such run from ``first`` that free frames
    (above the read reserve) cover; an empty list when the per-page path must
    decide (first page resident or on the pager, no free frame, a shadow, a
    strategy request, a closed, mapped or non-anonymous object). O(npages).
    """
    if (
        obj.kind is not ObjectKind.ANONYMOUS
        or obj.backing is not None
        or obj.storage is not None
        or obj.strategy_ranges
        or obj.closed
    ):
        return []
    pages = obj.pages
    count = 0
    while count < npages and first + count not in pages:
        count += 1
    frames = vm.frames
    count = min(count, frames.free_nframes - vm.read_reserve)
    if count <= 0:
        return []
    if obj.swap_backed:
        on_pager = obj.pager.has_pages(obj, first, count)
        if True in on_pager:
            count = on_pager.index(True)
            if not count:
                return []
    alloc = frames.alloc
    run: list[Page] = []
    append = run.append
    active = vm.queues.active
    for pindex in range(first, first + count):
        page = Page(obj, pindex, alloc())  # type: ignore[arg-type]  # counted free above
        page.busy = False
        page._dirty = True
        page.queue = QUEUE_ACTIVE
        page.act_count = ACT_INIT
        pages[pindex] = page
        active[page] = None
        append(page)
    vm.ndirty += count
    vm.counters.faults += count
    if frames.free_nframes < vm.free_min_nframes:
        vm.wake_daemon()
    if vm.streams_faults(obj):
        vm.fault_stream_run(obj, first, count)
    return run


def _fault_in(
    vm: Kernel, obj: VMObject, pindex: int, *, write: bool, overwrite: bool
) -> Page | None:
    """Bring the page in; None means "state changed while waiting, look again"."""
    if obj.strategy_ranges and any(s <= pindex < e for s, e in obj.strategy_ranges):
        vm.cond.wait()  # a strategy request owns this page right now
        return None
    vm.counters.faults += 1
    level: VMObject | None = obj
    index = pindex
    while level is not None:
        if level is not obj:
            source = level.pages.get(index)
            if source is not None:
                if source.busy:
                    vm.wait_page(source)
                    return None
                if not write:
                    source.referenced = True
                    return source
                return _copy_up(vm, obj, pindex, source, overwrite)
        pager = level.pager
        if pager.has_page(level, index):
            if write and overwrite and level is obj:
                # The whole page is replaced: its swap copy is stale, skip the read.
                page = _new_page(vm, obj, pindex, for_read=False)
                if page is not None:
                    pager.unswapped(obj, pindex)
                    page.dirty = True
                    _finish_new(vm, page)
                return page
            if write and overwrite:
                return _zero_or_blank(vm, obj, pindex, write=True, zero=False)
            # A write fault on obj's own page makes it dirty: the write floor
            # applies, or dirty pages could fill the frames kept for page-ins.
            read = _page_in(vm, level, index, for_read=not (write and level is obj))
            if read is None or not write:
                return read
            if level is not obj:
                return None  # resident in the backing object now: the next look copies it up
            vm.make_dirty(obj, read)
            return read
        if level.backing is None:
            break
        index += level.backing_offset
        level = level.backing
    return _zero_or_blank(vm, obj, pindex, write=write, zero=not overwrite)


def _new_page(vm: Kernel, obj: VMObject, pindex: int, *, for_read: bool) -> Page | None:
    frame = vm.alloc_frame(for_read=for_read)
    if frame is None:
        vm.wait_for_frame(for_read=for_read)
        return None
    page = Page(obj, pindex, frame)
    obj.pages[pindex] = page
    return page


def _finish_new(vm: Kernel, page: Page) -> None:
    page.busy = False
    vm.queues.activate(page)


def _zero_or_blank(
    vm: Kernel, obj: VMObject, pindex: int, *, write: bool, zero: bool
) -> Page | None:
    page = _new_page(vm, obj, pindex, for_read=not write)
    if page is None:
        return None
    if vm.streams_faults(obj):
        vm.fault_stream(obj, pindex)  # a stream of new pages leaves its past behind too
        vm.fault_done(obj, pindex, 1)
    if zero:
        vm.frames.zero(page.frame)
        vm.counters.zero_fills += 1
    page.dirty = write
    _finish_new(vm, page)
    return page


def _copy_up(vm: Kernel, obj: VMObject, pindex: int, source: Page, overwrite: bool) -> Page | None:
    if vm.frames.free_nframes <= vm.read_reserve:
        # Pin the source while room is made: the pageout scan would drop it
        # (clean, often just paged in for this fault), the next look would
        # page it in again, and so on for ever.
        source.busy = True
        try:
            vm.wait_for_frame(for_read=False)
        finally:
            source.busy = False
            if source.wanted:
                source.wanted = False
                vm.cond.notify_all()
        return None
    page = _new_page(vm, obj, pindex, for_read=False)
    if page is None:
        return None
    if not overwrite:
        # _new_page may not wait, so ``source`` is still resident and idle.
        vm.frames.array[page.frame] = vm.frames.array[source.frame]
    vm.counters.cow_copies += 1
    page.dirty = True
    _finish_new(vm, page)
    return page


def _page_in(vm: Kernel, obj: VMObject, pindex: int, *, for_read: bool = True) -> Page | None:
    """Read ``pindex`` of ``obj`` from its pager, with read-around.

    ``for_read=False`` when the page will be written at once: its frame may
    not come from the read reserve.
    """
    pager = obj.pager
    page = _new_page(vm, obj, pindex, for_read=for_read)
    if page is None:
        return None
    run_pages: list[Page] = [page]
    stream = vm.streams_faults(obj)
    try:
        reqpage = _gather_readaround(vm, pager, obj, pindex, run_pages, stream)
        result = get_pages(pager, obj, run_pages, reqpage)
        if result is not PagerResult.OK and len(run_pages) > 1:
            # The read-around transfer failed as a whole (its other pages are
            # freed): read the requested page alone, so that a bad block
            # near it fails only its own page, and the error names its block.
            vm.take_read_error()
            run_pages = [page]
            result = get_pages(pager, obj, run_pages, 0)
    except BaseException:
        # Leave nothing busy behind: pages not yet released are dropped (their
        # data is still on the store).
        for extra in run_pages:
            if extra.busy and obj.pages.get(extra.pindex) is extra:
                vm.free_page(extra)
        raise
    if result is PagerResult.OK:
        if stream:
            vm.fault_done(obj, run_pages[0].pindex, len(run_pages))
        page.busy = False  # clean: get_pages filled it from the store
        vm.queues.activate(page)
        vm.cond.notify_all()
        return page
    err = vm.take_read_error()
    vm.free_page(page)
    vm.cond.notify_all()
    if err is None:
        err = DeviceError(5, "swap", -1, f"page {obj.oid}:{pindex}: {result.value}")
    raise err


def _gather_readaround(
    vm: Kernel, pager: Pager, obj: VMObject, pindex: int, run_pages: list[Page], stream: bool
) -> int:
    """Extend ``run_pages`` (holding the requested page) with read-around pages.

    Adds busy pages before and after ``pindex`` that the pager can read in
    the same transfer, are not resident, and can get a frame without
    waiting. ``stream``: the fault path detects sequential streams on
    ``obj`` (``Kernel.streams_faults``). Returns the index of the requested
    page in the run.
    """
    page = run_pages[0]
    if stream:
        # Sequential faults read ahead, random ones read their page alone:
        # read-around there would mostly bring pages nobody uses.
        behind, ahead = 0, vm.fault_stream(obj, pindex)
    else:
        behind = ahead = vm.readaround_npages(obj, pindex)
    if not (behind or ahead):
        return 0
    run = pager.page_run(obj, pindex, behind, ahead)
    if run is None:  # cannot happen while the lock is held since has_page
        raise AssertionError(f"page {obj.oid}:{pindex} vanished from its pager")
    before, after = run
    pages_dict = obj.pages
    head: list[Page] = []
    for i in range(1, before + 1):
        if pindex - i in pages_dict:
            break
        frame = vm.alloc_frame_for_readaround()
        if frame is None:
            break
        extra = Page(obj, pindex - i, frame)
        extra.prefetched = True
        pages_dict[pindex - i] = extra
        head.append(extra)
    head.reverse()
    run_pages[:0] = head
    for i in range(1, after + 1):
        if pindex + i in pages_dict:
            break
        frame = vm.alloc_frame_for_readaround()
        if frame is None:
            break
        extra = Page(obj, pindex + i, frame)
        extra.prefetched = True
        pages_dict[pindex + i] = extra
        run_pages.append(extra)
    vm.counters.readaround_pages += len(run_pages) - 1
    assert run_pages[len(head)] is page
    return len(head)
