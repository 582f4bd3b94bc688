"""The swap pager: anonymous objects paged to the swap space (FreeBSD swap_pager.c).

Per object, ``SwapMeta`` maps page indices to swap blocks; ``SwapSpace``
allocates blocks over the swap devices. An anonymous object has no swap
until its first pageout (OBJT_DEFAULT becoming OBJT_SWAP).

- ``put_pages``: assign the largest run of blocks the cluster allows,
  halving on failure down to single blocks (FreeBSD's 2002
  ``swap_pager_putpages`` stops at four pages, which starves pageout on
  fragmented swap); with not one block free, FAIL the pages tried and go on
  with the rest from full size, as the reference does; a run never crosses
  a stripe or device. Synchronous unless the caller is the page
  daemon; asynchronous writes are bounded by ``swap_async_max``. Pages stay
  dirty until their write completes: completion marks them clean; a failed
  write leaves them dirty, reactivates them and disposes of the blocks as
  the write-error policy says.
- ``get_pages``: one vectored read of the contiguous run around the
  requested page. A read error invalidates the pages read, and the caller
  raises ``DeviceError``: a page with a swap copy never reads as zeros.
- ``page_run`` (haspage with before/after), ``unswapped``, ``free_space``,
  ``dealloc``; ``reserve`` assigns blocks up front (swap_pager_reserve).

Every method runs with the VM lock held; device transfers run with it
released while the pages involved are busy or writing.
"""

from __future__ import annotations

import errno
import functools
import logging
from collections.abc import Sequence
from operator import attrgetter
from typing import TYPE_CHECKING, TypeAlias

from vmpager.errors import CorruptPage, DeviceError
from vmpager.io.request import IOKind, IORequest
from vmpager.pager import strategy
from vmpager.swap.meta import SWAPBLK_NONE, SwapMeta
from vmpager.vm.config import WriteErrorPolicy
from vmpager.vm.object import NOT_RESERVED, RESERVED_UNWRITTEN, RESERVED_WRITTEN
from vmpager.vm.pagerops import PagerResult

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from vmpager.swap.space import SwapSpace, SwapSpaceStatistics
    from vmpager.vm.kernel import Kernel
    from vmpager.vm.object import VMObject
    from vmpager.vm.page import Page

__all__ = ["SwapPager"]

log = logging.getLogger("vmpager.swap")

Int64Array: TypeAlias = "npt.NDArray[np.int64]"


_owner = attrgetter("obj")
_frame_of = attrgetter("frame")

#: Smallest run a pageout halves towards. FreeBSD ``swap_pager_putpages``
#: (2002) stops halving at 4 pages and fails those; here the halving goes on
#: down to single blocks, so that swap fragmented into free runs shorter than
#: 4 still takes pageouts (else they are refused while most of swap is free).
MIN_PAGEOUT_RUN = 1


class SwapPager:
    """Pager for anonymous memory; one per VM."""

    kind = "swap"

    def __init__(self, vm: Kernel, space: SwapSpace) -> None:
        self._vm = vm
        self.space = space
        self.meta = SwapMeta(self._free_blocks)
        self._policy = vm.config.write_error_policy
        #: Blocks whose copies went stale when their pages were made dirty, not
        #: yet given back to the swap space (``flush_stale``).
        self._stale: list[int] = []
        self._stale_batch = max(vm.config.swap_free_batch_nblocks, 1)
        #: Pager-map tokens of asynchronous writes in flight, by request id.
        self._async_maps: dict[int, int] = {}

    # -- block bookkeeping ------------------------------------------------

    def _free_blocks(self, blk: int, nblocks: int) -> None:
        self.space.free(blk, nblocks)
        self._vm.note_swap_freed()

    def flush_stale(self) -> int:
        """Give the blocks of pages made dirty back to the swap space now; returns how many.

        ``unswapped`` only collects them: freeing a block costs a few
        microseconds, and a sequential stream dirties neighbours whose blocks
        are neighbours too, so freeing them sorted, as runs, costs one call
        per run. Collected blocks belong to nobody but are not free yet; they
        are given back before any allocation of this pager and whenever the
        VM reports or checks swap use (the caller holds the VM lock).
        """
        stale = self._stale
        if not stale:
            return 0
        stale.sort()
        count = len(stale)
        self.space.free_many(stale)
        stale.clear()
        self._vm.note_swap_freed()
        return count

    def marks_bad(self, err: DeviceError) -> bool:
        """Whether the write-error policy marks the blocks of a write failed with ``err`` bad."""
        return not self._is_transient(err) and self._policy is not WriteErrorPolicy.FREEBSD

    def _is_transient(self, err: DeviceError) -> bool:
        if self._policy is WriteErrorPolicy.NETBSD:
            return err.errno == errno.ENOMEM
        return err.errno == errno.EAGAIN

    # -- queries ------------------------------------------------------------

    def has_page(self, obj: VMObject, pindex: int) -> bool:
        return self.block_of(obj, pindex) != SWAPBLK_NONE

    def has_pages(self, obj: VMObject, start: int, npages: int) -> list[bool]:
        """``has_page`` for ``npages`` pages from ``start``. O(npages), no I/O."""
        if not obj.swap_backed:
            return [self.has_page(obj, start + i) for i in range(npages)]
        blocks = self.meta.lookup_range(obj.oid, start, npages).tolist()
        state = obj.reserve_state
        # A reserved block that was never written holds no data.
        return [
            blk >= 0 and (state is None or state[start + i] != RESERVED_UNWRITTEN)
            for i, blk in enumerate(blocks)
        ]

    def page_run(
        self, obj: VMObject, pindex: int, before_max: int, after_max: int
    ) -> tuple[int, int] | None:
        before_max = min(before_max, pindex)
        after_max = max(0, min(after_max, obj.npages - 1 - pindex))
        first = pindex - before_max
        blocks = self.meta.lookup_range(obj.oid, first, before_max + 1 + after_max).tolist()
        state = obj.reserve_state
        if state is not None:
            # A reserved block that was never written holds no data.
            for i in range(len(blocks)):
                if state[first + i] == RESERVED_UNWRITTEN:
                    blocks[i] = SWAPBLK_NONE
        blk0 = blocks[before_max]
        if blk0 == SWAPBLK_NONE:
            return None
        before = 0
        while (
            before < min(before_max, blk0) and blocks[before_max - before - 1] == blk0 - before - 1
        ):
            before += 1
        after = 0
        while after < after_max and blocks[before_max + after + 1] == blk0 + after + 1:
            after += 1
        # One transfer must stay inside one stripe / device.
        while before and self.space.run_limit(blk0 - before) <= before:
            before -= 1
        after = min(after, self.space.run_limit(blk0) - 1)
        return before, after

    def readaround_npages(self, obj: VMObject, pindex: int, default_npages: int) -> int:
        """The fixed read-around window (sequential anonymous streams ramp up in the
        fault path, ``Kernel.fault_stream``)."""
        return default_npages

    def batches_pageout(self, obj: VMObject) -> bool:
        # Reserved objects keep their blocks: they go through put_pages, page by cluster.
        return obj.reserve_state is None

    def cluster_bounds(self, obj: VMObject, pindex: int) -> tuple[int, int]:
        # uao_cluster: the aligned window of one maximal transfer around pindex.
        n = self._vm.config.cluster_max_npages
        lo = pindex - pindex % n
        return lo, min(lo + n, obj.npages)

    # -- page-in --------------------------------------------------------------

    def get_pages(self, obj: VMObject, pages: Sequence[Page], reqpage: int) -> PagerResult:
        if len(pages) == 1:
            return self._get_page(obj, pages[0])
        return self._get_run(obj, pages, reqpage)

    def _get_run(self, obj: VMObject, pages: Sequence[Page], reqpage: int) -> PagerResult:
        """``get_pages`` of any run: one request through ``Kernel.transfer_unlocked``."""
        vm = self._vm
        blk = self.meta.lookup(obj.oid, pages[reqpage].pindex)
        if blk == SWAPBLK_NONE:
            return PagerResult.FAIL
        first_blk = blk - reqpage
        frames = vm.frames
        request = IORequest(
            IOKind.READ,
            first_blk,
            [frames.frame_view(p.frame) for p in pages],
            list(pages),
            self._read_done,
            reqpage=reqpage,
        )
        vm.inflight.acquire(IOKind.READ)
        token = vm.pagermap.map_in(len(pages), daemon=vm.in_daemon())
        try:
            vm.transfer_unlocked(request)
        finally:
            vm.pagermap.map_out(token)
            vm.inflight.release(IOKind.READ)
        vm.counters.pageins += 1
        vm.counters.pagein_pages += len(pages)
        self._read_done(request)
        if request.error is not None:
            vm.note_read_error(request.error)
            return PagerResult.ERROR
        return PagerResult.OK

    def _get_page(self, obj: VMObject, page: Page) -> PagerResult:
        """``get_pages`` of one page (a random fault): the same transfer, counters,
        errors and results as ``_get_run``, without the request a run needs. The read is the swap
        space's ``read_page``, with the VM lock released, the page busy, one read
        slot and one page of the pager map held, as ``get_pages`` does."""
        vm = self._vm
        blk = self.meta.lookup(obj.oid, page.pindex)
        if blk == SWAPBLK_NONE:
            return PagerResult.FAIL
        view = vm.frames.frame_view(page.frame)
        inflight = vm.inflight
        pagermap = vm.pagermap
        inflight.acquire(IOKind.READ)
        token = pagermap.map_in(1, daemon=vm.in_daemon())
        err: DeviceError | None = None
        try:
            lock = vm.lock
            lock.release()
            try:
                self.space.read_page(blk, view)
            except CorruptPage as exc:
                err = vm.name_corrupt(exc, blk, (page,))
            except DeviceError as exc:
                err = exc
            except OSError as exc:
                err = DeviceError(exc.errno or errno.EIO, "swap", blk, str(exc))
            finally:
                lock.acquire()
        finally:
            pagermap.map_out(token)
            inflight.release(IOKind.READ)
        counters = vm.counters
        counters.pageins += 1
        counters.pagein_pages += 1
        if err is not None:
            log.error("swap_pager: I/O error - pagein failed; %s", err)
            counters.read_errors += 1
            vm.cond.notify_all()
            vm.note_read_error(err)
            return PagerResult.ERROR
        vm.cond.notify_all()
        return PagerResult.OK

    def block_of(self, obj: VMObject, pindex: int) -> int:
        """The block holding the data of ``(obj, pindex)``, or ``SWAPBLK_NONE`` (also for
        a reserved block never written: it holds no data)."""
        blk = self.meta.lookup(obj.oid, pindex)
        state = obj.reserve_state
        if blk != SWAPBLK_NONE and state is not None and state[pindex] == RESERVED_UNWRITTEN:
            return SWAPBLK_NONE
        return blk

    def run_limit(self, blk: int) -> int:
        """The most blocks one transfer from ``blk`` may span (device or stripe end)."""
        return self.space.run_limit(blk)

    def read_runs(
        self, obj: VMObject, runs: Sequence[tuple[int, list[Page]]]
    ) -> DeviceError | None:
        """Read several runs of ``obj``'s pages at once: the batched calls' page-in.

        Each run is ``(blk, pages)``: consecutive busy, clean pages whose data
        are the consecutive blocks from ``blk``, inside one ``run_limit``. Up to
        ``batch_read_depth`` reads are in flight at once (as many read slots
        as are free, at least one; a pager-map window for the largest runs
        that can be in flight together), the VM lock released meanwhile. On
        return every page of a run that was read is valid, clean, idle and
        active; the pages of a run whose read failed are freed (their data
        stays on swap) and the first such error is returned. Waiters are
        notified.
        """
        vm = self._vm
        inflight = vm.inflight
        inflight.acquire(IOKind.READ)
        slots = 1
        while slots < min(vm.config.batch_read_depth, len(runs)) and inflight.try_acquire(
            IOKind.READ
        ):
            slots += 1
        window = sum(sorted((len(pages) for _, pages in runs), reverse=True)[:slots])
        general = vm.pagermap.size_npages - vm.pagermap.reserve_npages
        token = vm.pagermap.map_in(min(window, general), daemon=vm.in_daemon())
        view = vm.frames.frame_view
        requests = [(blk, [view(p.frame) for p in pages]) for blk, pages in runs]
        errors: list[DeviceError | None] = []
        vm.lock.release()
        try:
            errors = vm.space.read_many(requests, functools.partial(vm.fanout.run, width=slots))
        finally:
            vm.lock.acquire()
            vm.pagermap.map_out(token)
            for _ in range(slots):
                inflight.release(IOKind.READ)
            if len(errors) != len(runs):
                # Interrupted: nothing read here is trusted; the data is still on swap.
                for _, pages in runs:
                    for page in pages:
                        vm.free_page(page)
        first_error: DeviceError | None = None
        counters = vm.counters
        activate = vm.queues.activate
        for (blk, pages), err in zip(runs, errors, strict=True):
            counters.pageins += 1
            counters.pagein_pages += len(pages)
            if err is None:
                for page in pages:
                    page.busy = False
                    activate(page)
                continue
            if isinstance(err, CorruptPage):
                err = vm.name_corrupt(err, blk, pages)
            log.error("swap_pager: I/O error - pagein failed; %s", err)
            counters.read_errors += 1
            if first_error is None:
                first_error = err
            for page in pages:
                vm.free_page(page)
        vm.cond.notify_all()
        return first_error

    def _read_done(self, request: IORequest[Page]) -> None:
        vm = self._vm
        err = request.error
        if err is not None:
            log.error("swap_pager: I/O error - pagein failed; %s", err)
            vm.counters.read_errors += 1
        for i, page in enumerate(request.pages):
            if i == request.reqpage:
                continue  # stays busy for the caller
            if err is not None:
                vm.free_page(page)
            else:
                page.dirty = False
                page.busy = False
                vm.queues.deactivate(page)
        vm.cond.notify_all()

    # -- pageout ----------------------------------------------------------------

    def put_pages(self, obj: VMObject, pages: Sequence[Page], *, sync: bool) -> list[PagerResult]:
        vm = self._vm
        if not vm.in_daemon():
            sync = True  # only the page daemon writes asynchronously
        obj.swap_backed = True
        self.flush_stale()
        results = [PagerResult.FAIL] * len(pages)
        cluster_max = vm.config.cluster_max_npages
        i = 0
        count = len(pages)
        reserved = obj.reserve_state
        while i < count:
            n = min(count - i, cluster_max)
            if reserved is not None:
                in_place = self._reserved_run(obj, pages, i, n)
                if in_place is not None:
                    got: tuple[int, int] | None = in_place
                else:
                    # Stop the fresh run before the next page with a reservation.
                    n = next(
                        (k for k in range(1, n) if self._reserved_run(obj, pages, i + k, 1)), n
                    )
                    got = self.space.alloc(n, min_count=MIN_PAGEOUT_RUN)
            else:
                got = self.space.alloc(n, min_count=MIN_PAGEOUT_RUN)
            if got is None:
                # Not one free block: these pages stay dirty; as
                # swap_pager_putpages, fail them and go on with the rest
                # from full size (a free may have come meanwhile).
                self._refuse(pages[i : i + n])
                i += n
                continue
            blk, n = got
            chunk = list(pages[i : i + n])
            if reserved is None:
                self._build_runs(chunk, blk)
            else:
                oid = obj.oid
                for j, page in enumerate(chunk):
                    if self.meta.lookup(oid, page.pindex) != blk + j:
                        self.meta.build(oid, page.pindex, blk + j)
            results[i : i + n] = self._start_write(chunk, blk, sync=sync)
            i += n
        return results

    def put_batch(self, pages: Sequence[Page], *, sync: bool) -> list[PagerResult]:
        """Write dirty pages of any anonymous objects together, in runs of contiguous blocks.

        The page daemon's clustering by pageout order (rather than by object
        neighbourhood, as ``put_pages``): however scattered the pages are in
        their objects, each run of up to ``cluster_max_npages`` goes to one
        run of swap blocks in one write, in the order given: pages handed in
        the order of their objects land in block order, so read-around still
        finds them together. Each page must be dirty, marked
        ``writing``, idle, and belong to a swap-paged object without a swap
        reservation (those write in place: ``put_pages``). Results per page
        as ``put_pages``: PEND (asynchronous, the daemon only), OK, or FAIL
        (no swap: the page stays dirty and is reactivated). Lock held; a
        synchronous write releases it during the transfer.
        """
        vm = self._vm
        if not vm.in_daemon():
            sync = True
        self.flush_stale()
        results = [PagerResult.FAIL] * len(pages)
        cluster_max = vm.config.cluster_max_npages
        i = 0
        count = len(pages)
        while i < count:
            n = min(count - i, cluster_max)
            got = self.space.alloc(n, min_count=MIN_PAGEOUT_RUN)
            if got is None:
                self._refuse(pages[i : i + n])
                i += n
                continue
            blk, n = got
            chunk = list(pages[i : i + n])
            self._build_runs(chunk, blk)
            results[i : i + n] = self._start_write(chunk, blk, sync=sync)
            i += n
        return results

    def _build_runs(self, chunk: list[Page], blk: int) -> None:
        """Give ``chunk[j]`` block ``blk + j`` in the metadata (its objects become
        swap-backed): one ``build_run`` per run of consecutive pages of one object."""
        build_run = self.meta.build_run
        start = 0
        count = len(chunk)
        while start < count:
            first = chunk[start]
            obj = first.obj
            obj.swap_backed = True
            end = start + 1
            pindex = first.pindex + 1
            while end < count and chunk[end].pindex == pindex and chunk[end].obj is obj:
                end += 1
                pindex += 1
            build_run(obj.oid, first.pindex, blk + start, end - start)
            start = end

    def _refuse(self, pages: Sequence[Page]) -> None:
        """No swap for ``pages``: they stay dirty and go back to the active queue."""
        self._drop_cluster(pages)
        self._vm.counters.pageout_fail_pages += len(pages)

    def _drop_cluster(
        self, pages: Sequence[Page], blk: int | None = None, *, mark_bad: bool = False
    ) -> None:
        """Give up on writing ``pages``: NetBSD's ``uvm_pager_dropcluster`` (``uvm_pager.c``
        1.48) with ``PGO_REALLOCSWAP``, for every page of a failed or refused transfer.

        Each page stops being written, stays dirty (its data is only in its
        frame), goes back to the active queue, and its waiters are woken.
        ``blk``: the first block of the transfer, whose blocks the pages
        lose (REALLOCSWAP): given back to the swap space, or with
        ``mark_bad`` marked bad (never handed out again); a reserved block
        without ``mark_bad`` is kept for the next try. ``blk=None``: no
        blocks were assigned (swap refused the pages).

        The reference's ``PG_RELEASED`` case (the object was destroyed while
        the cluster was busy) cannot arise: discarding or closing an object
        waits for its pages being written (``VM._drop_pages``), so every
        page here still belongs to a live object. Lock held.
        """
        vm = self._vm
        meta = self.meta
        activate = vm.queues.activate
        for j, page in enumerate(pages):
            if blk is not None:
                oid = page.obj.oid
                assert meta.lookup(oid, page.pindex) == blk + j
                state = page.obj.reserve_state
                if mark_bad:
                    meta.pop(oid, page.pindex)
                    if state is not None:
                        state[page.pindex] = NOT_RESERVED  # the reservation dies with its bad block
                elif state is None or not state[page.pindex]:
                    meta.free(oid, page.pindex)
            page.writing = False
            page.dirty = True
            activate(page)
            page.wanted = False
        if blk is not None and mark_bad:
            self.space.mark_bad(blk, len(pages))
            vm.counters.bad_blocks_marked += len(pages)
        vm.cond.notify_all()

    def _start_write(self, chunk: list[Page], blk: int, *, sync: bool) -> list[PagerResult]:
        """Write ``chunk`` (blocks assigned from ``blk`` on) now or through the engine."""
        vm = self._vm
        n = len(chunk)
        kind = IOKind.WRITE_SYNC if sync else IOKind.WRITE_ASYNC
        request = IORequest(
            kind,
            blk,
            self._vm.frames.run_views(list(map(_frame_of, chunk))),
            chunk,
            self._write_done,
        )
        vm.counters.pageouts += 1
        vm.counters.pageout_pages += n
        vm.counters.note_cluster(n)
        if not sync:
            vm.inflight.acquire(kind)  # waits while swap_async_max writes are out
            # The mapping is held until the completion (uvm_aio_aiodone maps
            # out): asynchronous pageouts are what the daemon's window is for.
            self._async_maps[id(request)] = vm.pagermap.map_in(n, daemon=True)
            vm.engine.submit(request)
            return [PagerResult.PEND] * n
        vm.inflight.acquire(kind)
        token = vm.pagermap.map_in(n, daemon=vm.in_daemon())
        try:
            vm.transfer_unlocked(request)
        finally:
            vm.pagermap.map_out(token)
            vm.inflight.release(kind)
        return self._finish_write(request)

    def _write_done(self, request: IORequest[Page]) -> None:
        """Completion of an asynchronous write (engine -> Kernel, lock held)."""
        self._vm.pagermap.map_out(self._async_maps.pop(id(request)))
        self._vm.inflight.release(request.kind)
        self._finish_write(request)

    def _finish_write(self, request: IORequest[Page]) -> list[PagerResult]:
        vm = self._vm
        err = request.error
        if err is None:
            pages = request.pages
            vm.mark_written(pages)
            for obj in set(map(_owner, pages)):
                state = obj.reserve_state
                if state is not None:
                    for page in pages:
                        if page.obj is obj and state[page.pindex]:
                            state[page.pindex] = RESERVED_WRITTEN
            vm.cond.notify_all()
            if request.kind is IOKind.WRITE_ASYNC:
                vm.free_written_if_short(request.pages)
            return [PagerResult.OK] * len(request.pages)
        vm.counters.write_errors += 1
        transient = self._is_transient(err)
        mark_bad = self.marks_bad(err)
        log.warning(
            "swap_pager: I/O error - pageout failed; %s (%s)",
            err,
            "transient" if transient else ("blocks marked bad" if mark_bad else "hard"),
        )
        self._drop_cluster(request.pages, request.blk, mark_bad=mark_bad)
        result = PagerResult.AGAIN if transient else PagerResult.ERROR
        return [result] * len(request.pages)

    # -- metadata operations ------------------------------------------------------

    def unswapped(self, obj: VMObject, pindex: int) -> None:
        if not obj.swap_backed:
            return
        state = obj.reserve_state
        if state is not None and state[pindex]:
            # The copy is stale but the block stays reserved for the next pageout.
            state[pindex] = RESERVED_UNWRITTEN
            return
        blk = self.meta.pop(obj.oid, pindex)
        if blk != SWAPBLK_NONE:
            stale = self._stale
            stale.append(blk)
            if len(stale) >= self._stale_batch:
                self.flush_stale()

    def release_block(self, obj: VMObject, pindex: int) -> None:
        """Free the page's block even if it is reserved (swapoff moving it away)."""
        if obj.reserve_state is not None:
            obj.reserve_state[pindex] = NOT_RESERVED
        self.meta.free(obj.oid, pindex)

    def free_space(self, obj: VMObject, start: int, npages: int) -> None:
        if obj.swap_backed:
            self.meta.free_range(obj.oid, start, npages)
            if obj.reserve_state is not None:
                obj.reserve_state[start : start + npages] = bytes(npages)
            self.flush_stale()

    def dealloc(self, obj: VMObject) -> None:
        if obj.swap_backed:
            self.meta.free_all(obj.oid)
            self.flush_stale()
        obj.reserve_state = None

    # -- reservation (swap_pager_reserve) ------------------------------------------

    def _reserved_run(
        self, obj: VMObject, pages: Sequence[Page], i: int, n: int
    ) -> tuple[int, int] | None:
        """``(blk, k)``: pages[i:i+k] have contiguous reserved blocks, one transfer."""
        state = obj.reserve_state
        assert state is not None
        page = pages[i]
        if not state[page.pindex]:
            return None
        blk = self.meta.lookup(obj.oid, page.pindex)
        if blk == SWAPBLK_NONE:
            return None
        limit = min(n, self.space.run_limit(blk))
        k = 1
        while k < limit:
            nxt = pages[i + k]
            if not state[nxt.pindex] or self.meta.lookup(obj.oid, nxt.pindex) != blk + k:
                break
            k += 1
        return blk, k

    def reserve(self, obj: VMObject, start: int, npages: int) -> bool:
        """Assign swap blocks to pages ``[start, start + npages)`` that have none.

        FreeBSD's swap_pager_reserve (2002): largest runs first (up to the cluster
        size), halving on failure; all or nothing: on failure every block
        taken here is given back and False is returned. Reserved blocks hold
        no data until the page is first written out: they read as before
        (zeros), pageouts of these pages write in place and cannot fail for
        lack of swap, and a page made dirty keeps its block. ``discard``
        and ``close`` release the reservation.
        """
        self.flush_stale()
        oid = obj.oid
        existing = self.meta.lookup_range(oid, start, npages).tolist()
        if obj.reserve_state is None:
            obj.reserve_state = bytearray(obj.npages)
        state = obj.reserve_state
        taken: list[int] = []
        cluster_max = self._vm.config.cluster_max_npages
        pindex = start
        end = start + npages
        while pindex < end:
            if existing[pindex - start] != SWAPBLK_NONE:
                pindex += 1
                continue
            run = 1
            while (
                pindex + run < end
                and run < cluster_max
                and existing[pindex + run - start] == SWAPBLK_NONE
            ):
                run += 1
            got = self.space.alloc(run, min_count=1)
            if got is None:
                for p in taken:
                    self.meta.free(oid, p)
                    state[p] = NOT_RESERVED
                return False
            blk, n = got
            obj.swap_backed = True
            for j in range(n):
                page = obj.pages.get(pindex + j)
                self.meta.build(oid, pindex + j, blk + j)
                state[pindex + j] = RESERVED_UNWRITTEN
                taken.append(pindex + j)
                if page is not None and not page.dirty:
                    page.dirty = True  # its data is nowhere else now
            pindex += n
        return True

    def space_statistics(self) -> SwapSpaceStatistics:
        """The swap space's use, the blocks of stale copies given back first. Lock held."""
        self.flush_stale()
        return self.space.statistics()

    def blocks_in_use(self, index: int) -> Int64Array:
        """The blocks of device ``index`` that hold pages (stale copies given back
        first). Lock held. O(blocks in use)."""
        self.flush_stale()
        return self.space.blocks_in_use(index)

    def swapped_pages(
        self,
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """``(oids, pindexes, blocks)`` of every page with a swap copy (deferred
        frees done first). Lock held. O(pages swapped)."""
        self.flush_stale()
        return self.meta.owner_arrays()

    def describe_free(self) -> str:
        """Free swap in words, for error messages (stale copies given back first)."""
        self.flush_stale()
        return self.space.describe_free()

    def strategy(
        self, obj: VMObject, op: str, offset: int, buffer: memoryview | None, length: int
    ) -> None:
        """Strategy I/O on ``obj``'s swap (``pager/strategy.py``); deferred frees first,
        since it allocates blocks itself. Lock held; blocks until done."""
        self.flush_stale()
        strategy.strategy(self._vm, obj, op, offset, buffer, length)

    def check(self) -> None:
        """The swap metadata's consistency (``SwapMeta.check``), after giving back the
        blocks of stale copies (they are free, not in limbo). Lock held."""
        self.flush_stale()
        self.meta.check()

    def release_reservation(self, holder: VMObject, former: VMObject) -> None:
        """Clone froze ``former`` into ``holder``: reserved blocks that hold no data
        are freed, and the reservation ends (the frozen contents never change)."""
        state = former.reserve_state
        former.reserve_state = None
        if state is None:
            return
        for pindex, value in enumerate(state):
            if value == RESERVED_UNWRITTEN:
                self.meta.free(holder.oid, pindex)
