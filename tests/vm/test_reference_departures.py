"""Where vmpager departs from its reference sources, the behaviour it chose.

Reference sources: NetBSD ``uvm_pager.c`` 1.48 and FreeBSD ``swap_pager.c``
(2002). Each test shows one departure listed in docs/design.md
("Departures"), and, where a ``VMConfig`` switch selects the reference's
behaviour, that the switch does.
"""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Callable

from vmpager.io.engine import HeldEngine
from vmpager.testing.worlds import PAGE, small_vm
from vmpager.vm.config import VMConfig
from vmpager.vm.object import VMObject
from vmpager.vm.pagerops import PagerResult
from vmpager.vm.put import pager_put
from vmpager.vm.system import VM


def page_bytes(tag: int) -> bytes:
    return tag.to_bytes(4, "little") * (PAGE // 4)


def fill(obj: VMObject, first_tag: int = 1) -> None:
    for p in range(obj.npages):
        obj.write(p * PAGE, page_bytes(first_tag + p))


def wait_until(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.002)


def dev_block(vm: VM, obj: VMObject, pindex: int) -> int:
    return vm.space.locate(vm.swap_pager.block_of(obj, pindex))[1]


# -- read-around ---------------------------------------------------------------


def test_readaround_default_is_8_each_side_and_7_selects_freebsd() -> None:
    """swap_pager_haspage (2002) gives at most SWB_NPAGES/2 - 1 = 7 on each side."""
    assert VMConfig().readaround_npages == 8
    for window in (8, 7):
        vm, _ = small_vm(reference=True, nframes=64, swap_nblocks=64, readaround_npages=window)
        with vm:
            obj = vm.allocate(32 * PAGE)
            fill(obj)
            vm.pageout()
            assert not obj.pages
            before = vm.statistics().readaround_pages
            assert obj.read(16 * PAGE, PAGE) == page_bytes(17)
            assert vm.statistics().readaround_pages - before == 2 * window
            assert sorted(obj.pages) == list(range(16 - window, 17 + window))
            vm.check()


def test_pageout_writes_64_pages_at_once_and_16_selects_freebsd() -> None:
    """FreeBSD 2002's swap pager writes at most 16 pages (nsw_cluster_max); the
    default writes the page daemon's batches 64 pages at a time, and 256
    (1 MiB writes) is one switch away."""
    assert VMConfig().cluster_max_npages == 64
    for cluster in (256, 64, 16):
        vm, _ = small_vm(nframes=600, swap_nblocks=1024, cluster_max_npages=cluster)
        with vm:
            obj = vm.allocate(512 * PAGE)
            fill(obj)
            assert len(obj.pages) == 512
            vm.pageout(512)
            assert not obj.pages
            histogram = dict(vm.statistics().cluster_histogram)
            assert max(histogram) == cluster
            assert sum(size * count for size, count in histogram.items()) == 512
            assert obj.read(300 * PAGE, PAGE) == page_bytes(301)
            vm.check()


def test_failed_readaround_retries_the_requested_page_alone() -> None:
    """A bad block next to the page fails the read-around transfer; the page
    itself is read again alone and served (the reference returns the error)."""
    vm, devices = small_vm(
        reference=True, nframes=64, swap_nblocks=64, faulty=True, readaround_npages=8
    )
    with vm:
        obj = vm.allocate(32 * PAGE)
        fill(obj)
        vm.pageout()
        devices[0].fail_reads([dev_block(vm, obj, 17)], errno.EIO, times=1)
        assert obj.read(16 * PAGE, PAGE) == page_bytes(17)
        assert vm.statistics().read_errors == 1
        assert list(obj.pages) == [16]
        assert obj.read(17 * PAGE, PAGE) == page_bytes(18)
        vm.check()


# -- clustering (uvm_mk_pcluster) -----------------------------------------------


def test_cluster_takes_active_neighbours_unless_switched_to_the_reference() -> None:
    assert VMConfig().pageout_cluster_active
    for active, expected in ((True, 4), (False, 1)):
        vm, _ = small_vm(reference=True, nframes=16, swap_nblocks=64)
        with vm:
            obj = vm.allocate(4 * PAGE)
            fill(obj)
            with vm.kernel.cond:
                for page in obj.pages.values():
                    vm.queues.activate(page)
                center = obj.pages[1]
                vm.queues.deactivate(center)
                outcome = pager_put(
                    vm.swap_pager, obj, center, sync=True, max_npages=4, active=active
                )
            assert outcome.result is PagerResult.OK
            assert outcome.cluster_npages == expected
            assert sum(not p.dirty for p in obj.pages.values()) == expected
            for p in range(4):
                assert obj.read(p * PAGE, PAGE) == page_bytes(p + 1)
            vm.check()


def test_the_scan_follows_the_cluster_switch() -> None:
    for active, expected in ((True, 4), (False, 1)):
        vm, _ = small_vm(reference=True, nframes=16, swap_nblocks=64, pageout_cluster_active=active)
        with vm:
            obj = vm.allocate(4 * PAGE)
            fill(obj)
            with vm.kernel.cond:
                for page in obj.pages.values():
                    vm.queues.activate(page)
                    page.referenced = True
                vm.queues.deactivate(obj.pages[1])
                obj.pages[1].referenced = False
                vm.daemon.scan(vm.frames.free_nframes + 1, asynchronous=False)
            assert vm.statistics().pageout_pages == expected
            vm.check()


# -- uvm_pager_put ------------------------------------------------------------------


def test_transient_retry_of_the_centre_takes_a_fresh_block() -> None:
    """The failed transfer's blocks, the centre's too, are given back before the
    retry; the reference keeps the centre's slot."""
    vm, devices = small_vm(reference=True, nframes=16, swap_nblocks=64, faulty=True)
    with vm:
        obj = vm.allocate(4 * PAGE)
        fill(obj)
        devices[0].fail_writes(range(4), errno.EAGAIN, times=1)
        with vm.kernel.cond:
            outcome = pager_put(vm.swap_pager, obj, obj.pages[1], sync=True, max_npages=4)
        assert outcome.retried and outcome.result is PagerResult.OK
        assert outcome.cluster_npages == 4
        assert dev_block(vm, obj, 1) == 4  # not 1, its block in the failed run
        assert vm.statistics().swap_used_blocks == 1
        assert vm.statistics().swap_bad_blocks == 0
        for p in range(4):
            assert obj.read(p * PAGE, PAGE) == page_bytes(p + 1)
        vm.check()


def test_refused_cluster_is_not_retried() -> None:
    """FAIL (no free block at all, after halving to single blocks) is final, as in
    the reference, which retries on EAGAIN only."""
    vm, _ = small_vm(reference=True, nframes=16, swap_nblocks=8)
    with vm:
        filler = vm.allocate(8 * PAGE)
        filler.strategy_write(0, bytes(8 * PAGE))
        obj = vm.allocate(4 * PAGE)
        fill(obj)
        with vm.kernel.cond:
            outcome = pager_put(vm.swap_pager, obj, obj.pages[1], sync=True, max_npages=4)
        assert outcome.result is PagerResult.FAIL and not outcome.retried
        assert all(p.dirty and not p.writing for p in obj.pages.values())
        vm.check()


def test_hard_error_marks_only_the_failed_transfer_bad() -> None:
    """A cluster written as two transfers (free runs of 4): the blocks of the one
    that failed are marked bad, those of the one that succeeded keep good data."""
    vm, devices = small_vm(
        reference=True, nframes=32, swap_nblocks=16, faulty=True, cluster_max_npages=8
    )
    with vm:
        a = vm.allocate(16 * PAGE)
        fill(a, 1000)
        vm.pageout()
        for first in (0, 8):  # free runs 0..3 and 8..11
            a.discard(first * PAGE, 4 * PAGE)
        devices[0].fail_writes(range(8, 12), errno.EIO, times=1)
        b = vm.allocate(8 * PAGE)
        fill(b)
        with vm.kernel.cond:
            outcome = pager_put(vm.swap_pager, b, b.pages[0], sync=True, max_npages=8)
        assert outcome.cluster_npages == 8 and outcome.result is PagerResult.OK
        stats = vm.statistics()
        assert stats.swap_bad_blocks == 4
        assert [vm.swap_pager.block_of(b, p) for p in range(4)] == [0, 1, 2, 3]
        assert all(not b.pages[p].dirty for p in range(4))
        assert all(b.pages[p].dirty for p in range(4, 8))
        for p in range(8):
            assert b.read(p * PAGE, PAGE) == page_bytes(p + 1)
        for p in (4, 5, 6, 7, 12, 13, 14, 15):
            assert a.read(p * PAGE, PAGE) == page_bytes(1000 + p)
        vm.check()


# -- swap_async_max -------------------------------------------------------------------


def test_new_swap_async_max_applies_at_once() -> None:
    """A raised limit lets the waiting pageout start more writes before any
    completes; the reference applies it at the next putpages (and a decrease
    only when enough writes have completed)."""
    engine = HeldEngine()
    vm, _ = small_vm(
        reference=True,
        nframes=16,
        swap_nblocks=64,
        engine=engine,
        cluster_max_npages=1,
        swap_async_max=2,
    )
    with vm:
        obj = vm.allocate(8 * PAGE)
        fill(obj)
        thread = threading.Thread(target=lambda: vm.pageout(asynchronous=True), daemon=True)
        thread.start()
        wait_until(lambda: len(engine.pending) == 2)
        time.sleep(0.05)
        assert len(engine.pending) == 2  # the pageout waits for a slot
        assert vm.set_swap_async_max(5) == 5
        # The waiting pageout goes on before any write completes; in the
        # reference it sleeps in getpbuf until a completion wakes it.
        wait_until(lambda: len(engine.pending) > 2)
        assert vm.statistics().swap_async_max == 5
        while thread.is_alive():
            engine.complete_all()
            thread.join(0.01)
        engine.complete_all()
        for p in range(8):
            assert obj.read(p * PAGE, PAGE) == page_bytes(p + 1)
        vm.check()


# -- PG_RELEASED ----------------------------------------------------------------------


def test_closing_an_object_waits_for_its_pages_being_written() -> None:
    """No PG_RELEASED: closing waits for the write in flight, then frees the
    pages and their blocks."""
    engine = HeldEngine()
    vm, _ = small_vm(reference=True, nframes=16, swap_nblocks=64, engine=engine)
    with vm:
        obj = vm.allocate(4 * PAGE)
        fill(obj)
        vm.pageout(asynchronous=True)
        assert engine.pending
        closer = threading.Thread(target=obj.close, daemon=True)
        closer.start()
        closer.join(0.2)
        assert closer.is_alive()  # waiting for the pages being written
        engine.complete_all()
        closer.join(10)
        assert not closer.is_alive()
        stats = vm.statistics()
        assert stats.swap_used_blocks == 0 and stats.resident_npages == 0
        vm.check()
