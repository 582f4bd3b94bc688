"""The page daemon: keeps free frames between the minimum and the target (vm_pageout).

A scan first walks the inactive queue from its head (oldest first):

- busy or being written: skip;
- referenced since the last look: reactivate (second chance);
- clean: free the frame (the swap copy, if any, stays valid);
- dirty: launder it: ``pager_put`` clusters it with its dirty neighbours and
  writes them (asynchronously when the daemon thread runs it).

Then, if the inactive queue is shorter than its target, it ages the active
queue: a referenced page gains activity (``act_count``), an unreferenced one
loses it, and a page whose activity reaches zero is deactivated (the pages
of one pass together, at its end: mapped objects' storage unbinds them in
runs). Frequently used pages thus stay active longer than pages used once.

The daemon runs in its own thread, woken when free frames fall below the
minimum or a faulting thread waits for a frame; it reports "stuck" when a
full scan made no progress and no write is in flight, so waiters can raise
``SwapExhausted`` instead of waiting forever. With ``daemon_thread=False``
the faulting thread runs the same scan itself with synchronous writes.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from itertools import islice
from operator import attrgetter
from typing import TYPE_CHECKING

from vmpager.io.request import IOKind
from vmpager.vm import registry
from vmpager.vm.pagerops import PagerResult
from vmpager.vm.put import pager_put
from vmpager.vm.queues import ACT_ADVANCE, ACT_DECLINE, ACT_MAX

if TYPE_CHECKING:
    from vmpager.vm.kernel import Kernel
    from vmpager.vm.object import VMObject
    from vmpager.vm.page import Page

__all__ = ["WRITE_ERROR_PASSES", "PageDaemon", "ScanResult"]

#: Passes ``run_until`` retries after passes whose writes all failed: enough
#: for a transient fault to clear or for bad blocks to be left behind, few
#: enough that a device failing every write ends in SwapExhausted, not a hang.
WRITE_ERROR_PASSES = 3


@dataclass(slots=True)
class ScanResult:
    freed: int = 0
    laundered_pages: int = 0
    launder_failures: int = 0
    deactivated: int = 0
    reactivated: int = 0
    #: Active pages whose activity count fell (or whose reference was consumed).
    aged: int = 0
    #: Launder failures that were failed writes (AGAIN/ERROR), not a full swap.
    write_errors: int = 0

    @property
    def progress(self) -> bool:
        """Frames freed or writes started; aging counts only if nothing was refused.

        Aging counts because a pass that only lowers activity counts brings
        pages closer to deactivation: with the lock held nobody references
        them between passes, so the counts fall to zero in at most
        ``ACT_MAX`` passes. Pages the pager refused (no swap) are reactivated
        and would be deactivated again on the next pass: that cycle is not
        progress.
        """
        if self.freed or self.laundered_pages:
            return True
        return bool(self.deactivated or self.aged) and not self.launder_failures


#: Object order of pages: (object id, page index), computed in C.
_object_order = attrgetter("obj.oid", "pindex")


class PageDaemon:
    """Pageout policy and its thread; every method runs with the VM lock held."""

    def __init__(self, vm: Kernel) -> None:
        self._vm = vm
        self._thread: threading.Thread | None = None
        self._stop = False
        self.ident: int | None = None
        #: The daemon thread is waiting on the VM condition (a waiter must notify it).
        self.sleeping = False
        self.scans = 0
        self.wakeups = 0

    # -- the scan -------------------------------------------------------------

    def scan(self, target_free: int, *, asynchronous: bool) -> ScanResult:
        """One pass over the queues, aiming for ``target_free`` free frames.

        The inactive queue is taken from its head in slices (as many pages as
        the batch being gathered has room for, and never more than the frames
        still missing): the decisions
        for the pages of a slice are the per-page ones of the module
        docstring, in queue order, and the slice is given up as soon as
        anything may have released the lock (a launder), so every page
        looked at is still where the slice found it. The frames still
        missing are counted once per slice, not once per page: each page of
        a slice frees at most one frame (freed, or laundered), so a slice no
        longer than the shortfall never overshoots it. Clean pages are freed
        together at the end of each slice.
        """
        vm = self._vm
        frames = vm.frames
        queues = vm.queues
        inactive = queues.inactive
        move_to_end = inactive.move_to_end
        activate = queues.activate
        self.scans += 1
        result = ScanResult()
        max_npages = vm.config.cluster_max_npages
        cluster_active = vm.config.pageout_cluster_active

        # Dirty pages of anonymous objects, written together in pageout order.
        batch: list[Page] = []
        batching = vm.config.pageout_batching
        clean: list[Page] = []
        last_obj: VMObject | None = None
        last_batches = False

        budget = len(inactive)
        while budget > 0 and inactive:
            short = (
                target_free - frames.free_nframes - self._pending_npages(asynchronous) - len(batch)
            )
            if short <= 0:
                break
            # A full batch ends the slice (its launder may release the lock): no
            # more pages than it has room for, so that none are taken in vain.
            chunk = list(islice(inactive, min(short, budget, max_npages - len(batch))))
            budget -= len(chunk)
            for page in chunk:
                if page.busy or page.writing:
                    move_to_end(page)
                    continue
                if page.referenced:
                    page.referenced = False
                    page.act_count = min(page.act_count + ACT_ADVANCE, ACT_MAX)
                    activate(page)
                    result.reactivated += 1
                    continue
                if not page._dirty:
                    clean.append(page)
                    continue
                obj = page.obj
                if obj is not last_obj:
                    last_obj = obj
                    last_batches = batching and obj.pager.batches_pageout(obj)
                move_to_end(page)
                if last_batches:
                    page.writing = True
                    batch.append(page)
                    if len(batch) >= max_npages:
                        budget += self._unscanned(chunk, page)
                        self._free_clean(clean, result)
                        self._launder_batch(batch, asynchronous, result)
                        batch = []
                        last_obj = None  # the lock may have been released
                        break
                    continue
                budget += self._unscanned(chunk, page)
                self._free_clean(clean, result)
                outcome = pager_put(
                    obj.pager,
                    obj,
                    page,
                    sync=not asynchronous,
                    max_npages=max_npages,
                    active=cluster_active,
                )
                last_obj = None  # the lock may have been released
                if outcome.result is PagerResult.PEND:
                    result.laundered_pages += outcome.cluster_npages
                elif outcome.result is PagerResult.OK:
                    result.laundered_pages += outcome.cluster_npages
                    if vm.free_if_clean(page):
                        result.freed += 1
                else:
                    result.launder_failures += 1
                    if outcome.result in (PagerResult.AGAIN, PagerResult.ERROR):
                        result.write_errors += 1
                break
            self._free_clean(clean, result)
        if batch:
            self._launder_batch(batch, asynchronous, result)
        self._age_active(result)
        return result

    @staticmethod
    def _unscanned(chunk: list[Page], page: Page) -> int:
        """How many pages of ``chunk`` come after ``page`` (given back to the budget)."""
        return len(chunk) - 1 - chunk.index(page)

    def _free_clean(self, clean: list[Page], result: ScanResult) -> None:
        """Free the clean idle pages a slice found (still so: the lock was held)."""
        if clean:
            self._vm.free_pages(clean)
            result.freed += len(clean)
            clean.clear()

    def _launder_batch(self, batch: list[Page], asynchronous: bool, result: ScanResult) -> None:
        """Write ``batch`` (dirty pages marked writing) through the swap pager's batch put."""
        vm = self._vm
        # Object order: neighbours in an object become neighbours on swap.
        batch.sort(key=_object_order)
        results = registry.put_batch(vm.swap_pager, batch, sync=not asynchronous)
        if results.count(PagerResult.PEND) == len(results):
            result.laundered_pages += len(results)
            return
        for page, outcome in zip(batch, results, strict=True):
            if outcome is PagerResult.PEND:
                result.laundered_pages += 1
            elif outcome is PagerResult.OK:
                result.laundered_pages += 1
                if vm.free_if_clean(page):
                    result.freed += 1
            else:
                result.launder_failures += 1
                if outcome in (PagerResult.AGAIN, PagerResult.ERROR):
                    result.write_errors += 1

    def _age_active(self, result: ScanResult) -> None:
        vm = self._vm
        queues = vm.queues
        active = queues.active
        budget = len(active)
        target = vm.inactive_target
        # The pages to deactivate are moved to the active queue's tail as they are
        # found (the budget never comes back to them) and deactivated together at
        # the end: the storage of mapped objects unbinds them in runs.
        leaving: list[Page] = []
        while budget > 0 and active and len(queues.inactive) + len(leaving) < target:
            budget -= 1
            page = next(iter(active))
            if page.busy or page.writing:
                active.move_to_end(page)
                continue
            if page.referenced:
                page.referenced = False
                page.act_count = min(page.act_count + ACT_ADVANCE, ACT_MAX)
                active.move_to_end(page)
                result.aged += 1
                continue
            page.act_count -= ACT_DECLINE
            if page.act_count <= 0:
                page.act_count = 0
                active.move_to_end(page)
                leaving.append(page)
                result.deactivated += 1
            else:
                active.move_to_end(page)
                result.aged += 1
        if leaving:
            queues.deactivate_pages(leaving)

    def _pending_npages(self, asynchronous: bool) -> int:
        """Frames the asynchronous writes in flight will free on completion.

        Only an asynchronous run counts on them; a synchronous one serves a
        thread that needs frames now, so it launders other pages instead.
        """
        if not asynchronous:
            return 0
        return self._vm.inflight.in_flight(IOKind.WRITE_ASYNC) * self._vm.config.cluster_max_npages

    def run_until(self, target_free: int, *, asynchronous: bool) -> bool:
        """Scan until ``target_free`` frames are free (an asynchronous run counts
        writes in flight as freed).

        Returns False when a scan made no progress and nothing is in flight
        (writes; for an asynchronous run, reads filling busy pages too):
        memory is full of pages nobody can take. A pass whose writes failed
        is tried again, up to ``WRITE_ERROR_PASSES`` times per call: the
        failed pages are dirty and queued again, and their next write goes
        to other blocks (or the fault has cleared). A pass that marked blocks
        bad is retried without limit: swap has changed, and a device that
        fails every write runs out of blocks to mark, after which pageout
        goes to the healthy devices. A synchronous run that
        can do nothing more while writes are in flight waits for their
        completions (releasing the lock, which they need).
        """
        vm = self._vm
        error_passes = 0
        while True:
            if vm.frames.free_nframes + self._pending_npages(asynchronous) >= target_free:
                return True
            marked_bad = vm.counters.bad_blocks_marked
            result = self.scan(target_free, asynchronous=asynchronous)
            if result.progress or self.reclaim_clean(target_free):
                continue
            if vm.counters.bad_blocks_marked > marked_bad:
                # The failed writes left their blocks behind as bad: the next
                # pass writes elsewhere (another device, if one is failing every
                # write). Terminates: each such pass marks blocks that stay bad.
                continue
            if result.write_errors and error_passes < WRITE_ERROR_PASSES:
                error_passes += 1
                continue
            in_flight = vm.inflight.in_flight(IOKind.WRITE_ASYNC)
            if in_flight and not asynchronous:
                vm.cond.wait(1.0)
                continue
            # Pages being read in are busy, so a scan passes them by; they will
            # be idle (and takeable) when the reads end: the daemon is not stuck.
            # (A synchronous run returns: its caller waits for reads in flight.)
            return in_flight > 0 or (asynchronous and vm.inflight.in_flight(IOKind.READ) > 0)

    def reclaim_clean(self, target_free: int) -> int:
        """Last resort when a pass freed nothing: free clean idle pages wherever they are.

        Reached when swap refuses dirty pages; clean pages may then sit behind
        them in the active queue, and page-ins need their frames. O(resident).
        """
        vm = self._vm
        freed = 0
        for queue in (vm.queues.inactive, vm.queues.active):
            for page in [p for p in queue if not (p.dirty or p.busy or p.writing)]:
                if vm.frames.free_nframes >= target_free:
                    return freed
                vm.free_page(page)
                freed += 1
        return freed

    # -- the thread ------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="vmpager-pagedaemon", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        vm = self._vm
        self.ident = threading.get_ident()
        with vm.daemon_cond:
            while not self._stop:
                if not vm.daemon_needed():
                    self._sleep(None)
                    continue
                self.wakeups += 1
                ok = self.run_until(vm.begin_pageout_pass(), asynchronous=True)
                vm.set_stuck(not ok)
                # Always give the lock up after a pass: the waiters need it.
                if ok and vm.inflight.in_flight(IOKind.WRITE_ASYNC):
                    self._sleep(0.05)  # completions will free frames
                else:
                    self._sleep(None)

    def _sleep(self, timeout: float | None) -> None:
        """Wait on the daemon's own condition (``VM._wake_daemon`` wakes it), ``sleeping`` set."""
        self.sleeping = True
        try:
            self._vm.daemon_cond.wait(timeout)
        finally:
            self.sleeping = False

    def stop(self) -> None:
        thread = self._thread
        if thread is None:
            return
        with self._vm.cond:
            self._stop = True
            self._vm.daemon_cond.notify_all()
        thread.join()
        self._thread = None
