"""The page daemon: keeps free frames between the minimum and the target (vm_pageout).

A scan first walks the inactive queue from its head (oldest first):

- busy or being written: skip;
- referenced since the last look: reactivate (second chance);
- clean: free the frame (the swap copy, if any, stays valid);
- dirty: launder it: ``pager_put`` clusters it with its dirty neighbours and
  writes them (asynchronously when the daemon thread runs it).

Then, if the inactive queue is shorter than its target, it ages the active
queue: a referenced page gains activity (``act_count``), an unreferenced one
loses it, and a page whose activity reaches zero is deactivated. Frequently
used pages thus stay active longer than pages used once.

The daemon runs in its own thread, woken when free frames fall below the
minimum or a faulting thread waits for a frame; it reports "stuck" when a
full scan made no progress and no write is in flight, so waiters can raise
``SwapExhausted`` instead of waiting forever. With ``daemon_thread=False``
the faulting thread runs the same scan itself with synchronous writes.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vmpager.io.request import IOKind
from vmpager.vm import registry
from vmpager.vm.pagerops import PagerResult
from vmpager.vm.put import pager_put
from vmpager.vm.queues import ACT_ADVANCE, ACT_DECLINE, ACT_MAX

if TYPE_CHECKING:
    from vmpager.vm.kernel import Kernel
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


def _object_order(page: Page) -> tuple[int, int]:
    return page.obj.oid, page.pindex


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
        """One pass over the queues, aiming for ``target_free`` free frames."""
        vm = self._vm
        frames = vm.frames
        queues = vm.queues
        inactive = queues.inactive
        self.scans += 1
        result = ScanResult()
        max_npages = vm.config.cluster_max_npages

        # Dirty pages of anonymous objects, written together in pageout order.
        batch: list[Page] = []
        batching = vm.config.pageout_batching

        def short() -> bool:
            pending = self._pending_npages(asynchronous) + len(batch)
            return frames.free_nframes + pending < target_free

        budget = len(inactive)
        while budget > 0 and inactive and short():
            budget -= 1
            page = next(iter(inactive))
            if page.busy or page.writing:
                inactive.move_to_end(page)
                continue
            if page.referenced:
                page.referenced = False
                page.act_count = min(page.act_count + ACT_ADVANCE, ACT_MAX)
                queues.activate(page)
                result.reactivated += 1
                continue
            if not page.dirty:
                vm.free_page(page)
                result.freed += 1
                continue
            obj = page.obj
            pager = obj.pager
            inactive.move_to_end(page)
            if batching and pager.batches_pageout(obj):
                page.writing = True
                batch.append(page)
                if len(batch) >= max_npages:
                    self._launder_batch(batch, asynchronous, result)
                    batch = []
                continue
            outcome = pager_put(
                pager,
                obj,
                page,
                sync=not asynchronous,
                max_npages=max_npages,
                active=vm.config.pageout_cluster_active,
            )
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
        if batch:
            self._launder_batch(batch, asynchronous, result)
        self._age_active(result)
        return result

    def _launder_batch(self, batch: list[Page], asynchronous: bool, result: ScanResult) -> None:
        """Write ``batch`` (dirty pages marked writing) through the swap pager's batch put."""
        vm = self._vm
        # Object order: neighbours in an object become neighbours on swap.
        batch.sort(key=_object_order)
        results = registry.put_batch(vm.swap_pager, batch, sync=not asynchronous)
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
        while budget > 0 and active and len(queues.inactive) < target:
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
                queues.deactivate(page)
                result.deactivated += 1
            else:
                active.move_to_end(page)
                result.aged += 1

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
