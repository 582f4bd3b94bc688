"""Batched access: many pages of one object held at once, their data moved by numpy.

``VMObject.read_words`` / ``write_words`` / ``read_pages`` / ``write_pages``
come here. A program that knows several accesses ahead gives them in one
call; the VM then

1. visits the pages already resident and idle (one look-up each, no fault);
2. pages the missing ones in together: for an anonymous object without a
   backing object, a frame for each (as many as are free), zero-filled
   where the page was never paged out, the rest read as runs of neighbouring
   blocks, ``batch_read_depth`` reads in flight at once (``SwapPager.read_runs``),
   so the disk works at queue depth 16 instead of 1;
3. looks again, until every page was visited; a page that is busy, being
   written (for a write), of a clone, or in a strategy request takes the
   ordinary fault path (``hold_page``) alone.

File and device objects have read and write rules of their own: their
batched calls go through those methods (the ``*_each`` functions below).

Pages are handled in chunks of at most ``batch_max_npages`` distinct pages
(and a quarter of the frames), so a call may be larger than memory. Every
page is visited exactly once, with the VM lock held and the page resident,
idle and (for a write) dirty; the copy in and out of its frame happens then.
Errors: ``DeviceError`` when a page's only copy cannot be read (pages
visited before stay visited: a write call may have stored part of its data),
``SwapExhausted`` as for ``write``, ``ObjectClosed``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from vmpager.swap.meta import SWAPBLK_NONE
from vmpager.vm import registry
from vmpager.vm.fault import hold_page
from vmpager.vm.kind import ObjectKind
from vmpager.vm.page import Page

if TYPE_CHECKING:
    from vmpager.vm.kernel import Kernel
    from vmpager.vm.object import VMObject

__all__ = [
    "Visit",
    "hold_batch",
    "last_values",
    "read_pages",
    "read_pages_each",
    "read_words",
    "read_words_each",
    "slot_accesses",
    "write_pages",
    "write_pages_each",
    "write_words",
    "write_words_each",
]

#: ``visit(slots, frames)``: the pages at ``slots`` of the call's sorted page
#: list are resident in ``frames`` (same length) and held: copy now.
Visit = Callable[[NDArray[np.intp], NDArray[np.intp]], None]

#: Rounds of page-ins a chunk may take before its last pages go one by one
#: through the fault path (pages read in are taken again under heavy pressure).
_MAX_ROUNDS = 4


def slot_accesses(
    order: NDArray[np.intp], bounds: NDArray[np.intp], slots: NDArray[np.intp]
) -> NDArray[np.intp]:
    """The accesses of ``slots``: ``order[bounds[s]:bounds[s + 1]]`` for each slot, concatenated."""
    if len(slots) == 1:
        s = int(slots[0])
        return order[bounds[s] : bounds[s + 1]]
    starts = bounds[slots]
    counts = bounds[slots + 1] - starts
    total = int(counts.sum())
    # Each slot's start repeated over its accesses, plus the rank inside the slot.
    base = np.repeat(starts - (np.cumsum(counts) - counts), counts)
    return order[base + np.arange(total, dtype=np.intp)]


def hold_batch(
    vm: Kernel,
    obj: VMObject,
    pindices: NDArray[np.int64],
    *,
    write: bool,
    overwrite: bool,
    visit: Visit,
) -> None:
    """Visit every page of ``pindices`` (sorted, distinct, in range) while it is held.

    VM lock held by the caller (waiting and I/O release it). ``write``: the
    pages are made dirty before their visit (their swap copies go stale);
    ``overwrite``: the visit replaces whole pages, so missing pages are not
    read. See the module docstring for the order of work and the errors.
    """
    chunk = max(1, min(vm.config.batch_max_npages, vm.frames.nframes // 4))
    plist: list[int] = pindices.tolist()
    # Only writes hand pages back: a program reading a batch often writes the
    # same pages next, and would fault them in again.
    stream = write and vm.streams_faults(obj)
    for start in range(0, len(plist), chunk):
        pages = plist[start : start + chunk]
        _hold_chunk(vm, obj, pages, start, write, overwrite, visit)
        if stream and pages[-1] - pages[0] == len(pages) - 1:
            _stream_chunk(vm, obj, pages[0], len(pages))


def _stream_chunk(vm: Kernel, obj: VMObject, first: int, npages: int) -> None:
    """A chunk of consecutive pages: the sequential-fault bookkeeping of the fault path.

    A written chunk that continues where the last one (or the last fault)
    ended is a stream at full speed: what it left a window behind goes to the
    head of the inactive queue, as for sequential faults (``VM._fault_done``),
    so a program streaming through more than memory in batches keeps what it
    had instead of cycling it out.
    """
    if first == obj.readahead_next:
        obj.readahead_npages = vm.config.readahead_max_npages
    else:
        obj.readahead_npages = 0
    vm.fault_done(obj, first, npages)


def _hold_chunk(
    vm: Kernel,
    obj: VMObject,
    chunk: list[int],
    base: int,
    write: bool,
    overwrite: bool,
    visit: Visit,
) -> None:
    pending = list(range(len(chunk)))
    rounds = 0
    counters = vm.counters
    fast_pagein = obj.kind is ObjectKind.ANONYMOUS and obj.backing is None
    while pending:
        # The fast page-in makes pages without asking the object's pager first.
        obj.check_open()
        pages = obj.pages
        reserve = vm.read_reserve
        frames = vm.frames
        ready: list[int] = []
        ready_frames: list[int] = []
        missing: list[int] = []
        slow: list[int] = []
        for i in pending:
            page = pages.get(chunk[i])
            if page is None:
                missing.append(i)
            elif page.busy or (write and page.writing):
                slow.append(i)
            else:
                if write and not page.dirty:
                    if frames.free_nframes <= reserve and frames.nframes - vm.ndirty - 1 < reserve:
                        slow.append(i)  # room_to_dirty makes room, and may wait
                        continue
                    vm.make_dirty(obj, page)
                page.referenced = True
                if page.prefetched:
                    page.prefetched = False
                    counters.readaround_hits += 1
                ready.append(i)
                ready_frames.append(page.frame)
        if ready:
            counters.hits += len(ready)
            visit(
                np.asarray(ready, dtype=np.intp) + base,
                np.asarray(ready_frames, dtype=np.intp),
            )
        if rounds >= _MAX_ROUNDS or not (fast_pagein and not obj.strategy_ranges):
            slow.extend(missing)
            missing = []
        started = _page_in_many(vm, obj, chunk, missing, write, overwrite) if missing else 0
        if started:
            rounds += 1
        elif missing and not (ready or slow):
            vm.wait_for_frame(for_read=not write)  # nothing could start: make room
        for i in sorted(slow):
            # The fault path alone (it counts its own faults and waits as it must).
            page = hold_page(vm, obj, chunk[i], write=write, overwrite=overwrite)
            visit(np.array([base + i], dtype=np.intp), np.array([page.frame], dtype=np.intp))
        # Pages just paged in (or zero-filled) are visited on the next look.
        done = set(ready)
        done.update(slow)
        pending = [i for i in pending if i not in done]


def _page_in_many(
    vm: Kernel, obj: VMObject, chunk: list[int], missing: list[int], write: bool, overwrite: bool
) -> int:
    """Bring in the pages ``missing`` (positions in ``chunk``, ascending) that get a frame.

    Returns how many got one (a prefix of ``missing``); they are resident
    and idle on return, or freed again when their read failed (then the
    error is raised). Never waits for frames; releases the lock for reads.
    """
    pager = vm.swap_pager
    counters = vm.counters
    frames = vm.frames
    for_read = not write
    runs: list[tuple[int, list[Page]]] = []
    run_blk = run_end_blk = -1
    run_pages: list[Page] = []
    run_room = 0
    started = 0
    for i in missing:
        pindex = chunk[i]
        frame = vm.alloc_frame(for_read=for_read)
        if frame is None:
            # The daemon frees the rest while these reads are in flight.
            vm.add_deficit(len(missing) - started)
            break
        started += 1
        counters.faults += 1
        page = Page(obj, pindex, frame)
        obj.pages[pindex] = page
        blk = pager.block_of(obj, pindex)
        if blk == SWAPBLK_NONE or overwrite:
            if blk != SWAPBLK_NONE:
                pager.unswapped(obj, pindex)  # replaced whole: the copy is stale
            elif not overwrite:
                frames.zero(frame)
                counters.zero_fills += 1
            page.dirty = write
            page.busy = False
            vm.queues.activate(page)
            continue
        if (
            run_pages
            and blk == run_end_blk
            and run_pages[-1].pindex == pindex - 1
            and len(run_pages) < run_room
        ):
            run_pages.append(page)
            run_end_blk += 1
            continue
        if run_pages:
            runs.append((run_blk, run_pages))
        run_blk, run_end_blk, run_pages = blk, blk + 1, [page]
        run_room = min(vm.config.cluster_max_npages, pager.run_limit(blk))
    if run_pages:
        runs.append((run_blk, run_pages))
    if runs:
        err = registry.read_runs(pager, obj, runs)
        if err is not None:
            raise err
    return started


def _group(
    pindex: NDArray[np.int64],
) -> tuple[NDArray[np.int64], NDArray[np.intp], NDArray[np.intp]]:
    """Distinct pages (sorted), and per page its accesses: ``order[bounds[s]:bounds[s+1]]``.

    One stable sort of the page numbers; the distinct pages are where the
    sorted sequence changes.
    """
    order = np.argsort(pindex, kind="stable").astype(np.intp, copy=False)
    ordered = pindex[order]
    starts = np.flatnonzero(np.diff(ordered)) + 1
    bounds = np.empty(len(starts) + 2, dtype=np.intp)
    bounds[0] = 0
    bounds[1:-1] = starts
    bounds[-1] = len(ordered)
    return ordered[bounds[:-1]], order, bounds


def last_values(
    offsets: NDArray[np.int64], values: NDArray[np.uint64]
) -> tuple[NDArray[np.int64], NDArray[np.uint64]]:
    """The distinct offsets, sorted, each with the last value given for it."""
    # First occurrences in the reversed arrays are the last ones.
    distinct, last = np.unique(offsets[::-1], return_index=True)
    return distinct, values[::-1][last]


def _located(
    order: NDArray[np.intp],
    bounds: NDArray[np.intp],
    slots: NDArray[np.intp],
    frames: NDArray[np.intp],
) -> tuple[NDArray[np.intp], NDArray[np.intp]]:
    """The accesses of ``slots`` and, for each, the frame its page is in."""
    return slot_accesses(order, bounds, slots), np.repeat(frames, bounds[slots + 1] - bounds[slots])


def read_words(vm: Kernel, obj: VMObject, offsets: NDArray[np.int64]) -> NDArray[np.uint64]:
    """The 8-byte words at ``offsets`` (checked: multiples of 8 inside the object)."""
    out = np.empty(len(offsets), dtype=np.uint64)
    if not len(offsets):
        return out
    shift = vm.page_shift
    upages, order, bounds = _group(offsets >> shift)
    word = (offsets & vm.page_mask) >> 3
    words = vm.frames.array.view(np.uint64)

    def visit(slots: NDArray[np.intp], frames: NDArray[np.intp]) -> None:
        acc, at = _located(order, bounds, slots, frames)
        out[acc] = words[at, word[acc]]

    with vm.cond:
        hold_batch(vm, obj, upages, write=False, overwrite=False, visit=visit)
    return out


def write_words(
    vm: Kernel, obj: VMObject, offsets: NDArray[np.int64], values: NDArray[np.uint64]
) -> None:
    """Store ``values[i]`` at ``offsets[i]``; an offset given twice keeps its last value."""
    if not len(offsets):
        return
    offsets, values = last_values(offsets, values)
    upages, order, bounds = _group(offsets >> vm.page_shift)
    word = (offsets & vm.page_mask) >> 3
    words = vm.frames.array.view(np.uint64)

    def visit(slots: NDArray[np.intp], frames: NDArray[np.intp]) -> None:
        acc, at = _located(order, bounds, slots, frames)
        words[at, word[acc]] = values[acc]

    with vm.cond:
        hold_batch(vm, obj, upages, write=True, overwrite=False, visit=visit)


def read_pages(vm: Kernel, obj: VMObject, pindices: NDArray[np.int64]) -> NDArray[np.uint8]:
    """Copies of the pages ``pindices`` (checked), one row each, in the order given."""
    out = np.empty((len(pindices), vm.page_size), dtype=np.uint8)
    if not len(pindices):
        return out
    upages, order, bounds = _group(pindices)
    array = vm.frames.array

    def visit(slots: NDArray[np.intp], frames: NDArray[np.intp]) -> None:
        acc, at = _located(order, bounds, slots, frames)
        out[acc] = array[at]

    with vm.cond:
        hold_batch(vm, obj, upages, write=False, overwrite=False, visit=visit)
    return out


def write_pages(
    vm: Kernel, obj: VMObject, pindices: NDArray[np.int64], data: NDArray[np.uint8]
) -> None:
    """Replace the pages ``pindices`` with the rows of ``data``; a page given twice keeps
    its last row. The old contents are never read."""
    if not len(pindices):
        return
    upages, last = np.unique(pindices[::-1], return_index=True)
    rows = (len(pindices) - 1 - last).astype(np.intp)  # the row of each distinct page
    array = vm.frames.array

    def visit(slots: NDArray[np.intp], frames: NDArray[np.intp]) -> None:
        array[frames] = data[rows[slots]]

    with vm.cond:
        hold_batch(vm, obj, upages, write=True, overwrite=True, visit=visit)


# -- objects with read/write of their own (files, device memory) -------------------------
#
# Their rules (read-only mappings, files that grow, memory that is not in
# frames) live in their read and write methods: the batched calls use those,
# one access at a time, with the same results as the calls above.


def read_words_each(obj: VMObject, offsets: NDArray[np.int64]) -> NDArray[np.uint64]:
    """``read_words`` through ``obj.read``."""
    out = np.empty(len(offsets), dtype=np.uint64)
    for i, offset in enumerate(offsets.tolist()):
        out[i] = int.from_bytes(obj.read(offset, 8), sys.byteorder)
    return out


def write_words_each(obj: VMObject, offsets: NDArray[np.int64], values: NDArray[np.uint64]) -> None:
    """``write_words`` through ``obj.write`` (the last value of a repeated offset wins)."""
    offsets, values = last_values(offsets, values)
    for offset, value in zip(offsets.tolist(), values.tolist(), strict=True):
        obj.write(offset, value.to_bytes(8, sys.byteorder))


def read_pages_each(obj: VMObject, pindices: NDArray[np.int64]) -> NDArray[np.uint8]:
    """``read_pages`` through ``obj.read``; bytes past the object's end read as zeros."""
    ps = obj.page_size
    out = np.zeros((len(pindices), ps), dtype=np.uint8)
    for i, pindex in enumerate(pindices.tolist()):
        data = obj.read(pindex * ps, min(ps, obj.size - pindex * ps))
        out[i, : len(data)] = np.frombuffer(data, dtype=np.uint8)
    return out


def write_pages_each(obj: VMObject, pindices: NDArray[np.int64], data: NDArray[np.uint8]) -> None:
    """``write_pages`` through ``obj.write`` (the last row of a repeated page wins)."""
    ps = obj.page_size
    for row, pindex in enumerate(pindices.tolist()):
        obj.write(pindex * ps, data[row].tobytes())
