"""Asynchronous pageout held pending: what a page may do while its write is in flight.

A ``HeldEngine`` keeps every asynchronous write PEND until the test completes
it, in any order, optionally failing it. While a write is in flight the page
stays dirty and ``writing``; readers copy it, writers wait; completion marks
it clean, a failed write makes it dirty again and reactivates it.
``swap_async_max`` bounds the writes in flight, and the pager map's reserve
keeps the page daemon's pageout moving when ordinary transfers hold the
whole general pool.
"""

from __future__ import annotations

import errno
import random
import threading
import time
from collections.abc import Callable

import pytest

from vmpager import DeviceError
from vmpager.io.engine import HeldEngine
from vmpager.io.request import IOKind
from vmpager.swap.meta import SWAPBLK_NONE
from vmpager.testing.worlds import PAGE, small_vm
from vmpager.vm.object import VMObject
from vmpager.vm.page import QUEUE_ACTIVE
from vmpager.vm.system import VM

pytestmark = pytest.mark.timeout(60)


def page_bytes(tag: int) -> bytes:
    return tag.to_bytes(4, "little") * (PAGE // 4)


def wait_until(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Poll ``predicate`` until true; fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.002)


def fill(obj: VMObject, first_tag: int = 1) -> None:
    for p in range(obj.npages):
        obj.write(p * PAGE, page_bytes(first_tag + p))


def block_of(vm: VM, obj: VMObject, pindex: int) -> int:
    return vm.swap_pager.meta.lookup(obj.oid, pindex)


def held_world(
    nframes: int = 16, npages: int = 8, **config: object
) -> tuple[VM, HeldEngine, VMObject]:
    engine = HeldEngine()
    vm, _ = small_vm(reference=True, nframes=nframes, swap_nblocks=64, engine=engine, **config)
    obj = vm.allocate(npages * PAGE)
    fill(obj)
    return vm, engine, obj


def test_pages_stay_dirty_and_writing_until_completion() -> None:
    vm, engine, obj = held_world()
    with vm:
        vm.pageout(asynchronous=True)
        assert len(engine.pending) == 2  # two clusters of four
        assert vm.statistics().async_writes_in_flight == 2
        for p in range(8):
            page = obj.pages[p]
            assert page.dirty and page.writing, page
            assert block_of(vm, obj, p) != SWAPBLK_NONE  # blocks assigned at submission
        vm.check()
        # Readers copy pages in flight without waiting.
        for p in range(8):
            assert obj.read(p * PAGE, PAGE) == page_bytes(1 + p)
        # Complete the second write first: its pages only become clean.
        done = engine.complete(1)
        assert [p.pindex for p in done.pages] == [4, 5, 6, 7]
        for p in range(8):
            page = obj.pages.get(p)
            if p >= 4:
                assert page is None or (not page.dirty and not page.writing), page
            else:
                assert page is not None and page.dirty and page.writing, page
        assert vm.statistics().async_writes_in_flight == 1
        vm.check()
        engine.complete(0)
        stats = vm.statistics()
        assert stats.async_writes_in_flight == 0
        assert stats.dirty_npages == 0
        assert stats.swap_used_blocks == 8
        vm.check()
        # Evict everything: the data comes back from swap.
        vm.pageout()
        assert vm.statistics().resident_npages == 0
        for p in range(8):
            assert obj.read(p * PAGE, PAGE) == page_bytes(1 + p)
        vm.check()


def test_writer_waits_for_the_write_in_flight() -> None:
    vm, engine, obj = held_world()
    with vm:
        vm.pageout(asynchronous=True)
        old_blk = block_of(vm, obj, 1)
        finished = threading.Event()

        def writer() -> None:
            obj.write(PAGE + 10, b"new")
            finished.set()

        thread = threading.Thread(target=writer, daemon=True)
        thread.start()
        thread.join(0.3)
        assert thread.is_alive() and not finished.is_set(), "a writer must wait for the pageout"
        assert obj.read(PAGE, PAGE) == page_bytes(2)  # the old contents, stable
        engine.complete(1)  # the other cluster: the writer still waits
        thread.join(0.2)
        assert not finished.is_set()
        engine.complete(0)
        thread.join(10)
        assert finished.is_set()
        page = obj.pages[1]
        assert page.dirty and not page.writing
        # The write made the swap copy stale: its block went back to the pool.
        assert block_of(vm, obj, 1) == SWAPBLK_NONE
        assert not vm.space.blocks_in_use(0).tolist().count(old_blk)
        want = bytearray(page_bytes(2))
        want[10:13] = b"new"
        assert obj.read(PAGE, PAGE) == bytes(want)
        vm.check()


@pytest.mark.parametrize("seed", range(4))
def test_completions_in_any_order_lose_nothing(seed: int) -> None:
    rng = random.Random(seed)
    engine = HeldEngine()
    vm, _ = small_vm(reference=True, nframes=24, swap_nblocks=96, engine=engine, swap_async_max=8)
    with vm:
        objs = [vm.allocate(6 * PAGE) for _ in range(3)]
        for i, obj in enumerate(objs):
            fill(obj, 100 * i)
        vm.pageout(asynchronous=True)
        assert len(engine.pending) >= 3
        while engine.pending:
            engine.complete(rng.randrange(len(engine.pending)))
            vm.check()
        vm.pageout()
        for i, obj in enumerate(objs):
            for p in range(obj.npages):
                assert obj.read(p * PAGE, PAGE) == page_bytes(100 * i + p)
        vm.check()


@pytest.mark.parametrize(
    ("err", "marked_bad"), [(errno.EAGAIN, False), (errno.EIO, True)], ids=["EAGAIN", "EIO"]
)
def test_failed_async_write_redirties_and_reactivates(err: int, marked_bad: bool) -> None:
    vm, engine, obj = held_world()
    with vm:
        vm.pageout(asynchronous=True)
        blk = engine.pending[0].blk
        request = engine.complete(0, error=DeviceError(err, "ram0", blk, "test"))
        assert [p.pindex for p in request.pages] == [0, 1, 2, 3]
        for p in range(4):
            page = obj.pages[p]
            assert page.dirty and not page.writing and page.queue == QUEUE_ACTIVE, page
            assert block_of(vm, obj, p) == SWAPBLK_NONE
        stats = vm.statistics()
        assert stats.write_errors == 1
        assert stats.bad_blocks_marked == (4 if marked_bad else 0)
        assert stats.swap_bad_blocks == (4 if marked_bad else 0)
        assert stats.async_writes_in_flight == 1
        vm.check()
        engine.complete(0)
        # A later pageout writes the failed pages again, never on bad blocks.
        vm.pageout(asynchronous=True)
        engine.complete_all()
        vm.pageout()
        for p in range(4):
            new_blk = block_of(vm, obj, p)
            assert new_blk != SWAPBLK_NONE
            if marked_bad:
                assert not blk <= new_blk < blk + 4
        for p in range(8):
            assert obj.read(p * PAGE, PAGE) == page_bytes(1 + p)
        vm.check()


def test_async_writes_in_flight_are_bounded_and_the_bound_changes_while_running() -> None:
    engine = HeldEngine()
    # A high free target puts every page on the inactive queue in one pass,
    # so the scan has more clusters to start than slots.
    vm, _ = small_vm(
        reference=True,
        nframes=32,
        swap_nblocks=128,
        engine=engine,
        swap_async_max=2,
        free_target_nframes=16,
    )
    with vm:
        obj = vm.allocate(24 * PAGE)
        fill(obj)
        waits0 = vm.inflight.statistics().waits
        errors: list[BaseException] = []

        def daemon() -> None:
            try:
                vm.pageout(asynchronous=True)
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=daemon, daemon=True)
        thread.start()
        # The scan blocks for a third slot while two writes are out.
        wait_until(lambda: vm.inflight.statistics().waits > waits0)
        assert len(engine.pending) == 2
        assert vm.statistics().async_writes_in_flight == 2
        assert thread.is_alive()
        # Raising the limit while running lets the blocked scan go on at once.
        waits1 = vm.inflight.statistics().waits
        assert vm.set_swap_async_max(3) == 3
        wait_until(lambda: len(engine.pending) == 3)
        wait_until(lambda: vm.inflight.statistics().waits > waits1)
        assert vm.statistics().swap_async_max == 3
        # Lowering it takes effect as writes finish: no new one until below 1.
        vm.set_swap_async_max(1)
        engine.complete(2)
        time.sleep(0.05)
        assert len(engine.pending) == 2, "no write may start while 2 are out and the limit is 1"
        high = 0
        deadline = time.monotonic() + 20
        while thread.is_alive() and time.monotonic() < deadline:
            if engine.pending:
                high = max(high, len(engine.pending))
                engine.complete(len(engine.pending) - 1)
            else:
                time.sleep(0.001)
        thread.join(1)
        assert not thread.is_alive() and not errors, errors
        assert high <= 2
        engine.complete_all()  # the scan may stop counting writes still out as free
        assert vm.inflight.statistics().writes_async_in_flight == 0
        for p in range(24):
            assert obj.read(p * PAGE, PAGE) == page_bytes(1 + p)
        vm.check()


def test_swap_async_max_is_clamped_and_type_checked() -> None:
    vm, _ = small_vm(reference=True, nswbuf=32)
    with vm:
        assert vm.set_swap_async_max(0) == 1
        assert vm.set_swap_async_max(-5) == 1
        assert vm.set_swap_async_max(10**6) == 16  # nswbuf // 2
        assert vm.statistics().swap_async_max == 16
        assert vm.set_swap_async_max(7) == 7
        with pytest.raises(TypeError, match="swap_async_max"):
            vm.set_swap_async_max("3")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="swap_async_max"):
            vm.set_swap_async_max(True)
        assert vm.statistics().swap_async_max == 7


def test_pager_map_reserve_keeps_the_daemon_paging_out() -> None:
    vm, _ = small_vm(reference=True, nframes=16, swap_nblocks=64)
    with vm:
        pmap = vm.pagermap
        swapped = vm.allocate(4 * PAGE)
        fill(swapped, 50)
        vm.pageout()  # swapped/ lives on swap only
        assert not swapped.pages
        dirty = vm.allocate(8 * PAGE)
        fill(dirty, 1)
        # Another user takes the whole general pool (the pager map is used
        # with the VM lock held).
        general = pmap.size_npages - pmap.reserve_npages
        with vm.kernel.cond:
            token = pmap.try_map_in(general, daemon=False)
            assert token is not None
            assert pmap.try_map_in(1, daemon=False) is None
        # An ordinary page-in now waits for a mapping...
        got: list[bytes] = []
        reader = threading.Thread(target=lambda: got.append(swapped.read(0, PAGE)), daemon=True)
        waits0 = pmap.statistics().waits
        reader.start()
        wait_until(lambda: pmap.statistics().waits > waits0)
        assert reader.is_alive() and not got
        # ...but the page daemon's pageout goes on, on the reserve.
        uses0 = pmap.statistics().reserve_uses
        freed = vm.pageout()
        assert freed > 0
        assert pmap.statistics().reserve_uses > uses0
        assert vm.statistics().pageout_pages >= 12
        assert not any(p.dirty for p in dirty.pages.values())
        assert reader.is_alive() and not got
        with vm.kernel.cond:
            pmap.map_out(token)
        reader.join(10)
        assert got == [page_bytes(50)]
        for p in range(8):
            assert dirty.read(p * PAGE, PAGE) == page_bytes(1 + p)
        assert pmap.statistics().in_use_npages == 0
        vm.check()


def test_pageout_waits_for_the_reserve_only_when_it_is_spent_too() -> None:
    vm, _ = small_vm(reference=True, nframes=16, swap_nblocks=64)
    with vm:
        pmap = vm.pagermap
        obj = vm.allocate(8 * PAGE)
        fill(obj)
        general = pmap.size_npages - pmap.reserve_npages
        with vm.kernel.cond:
            token = pmap.try_map_in(general, daemon=False)
            reserve = pmap.try_map_in(pmap.reserve_npages, daemon=True)
        assert token is not None and reserve is not None and reserve < 0
        done = threading.Event()
        thread = threading.Thread(target=lambda: (vm.pageout(), done.set()), daemon=True)
        thread.start()
        thread.join(0.3)
        assert not done.is_set(), "with the reserve spent too, pageout must wait"
        with vm.kernel.cond:
            pmap.map_out(reserve)
        thread.join(10)
        assert done.is_set()
        with vm.kernel.cond:
            pmap.map_out(token)
        for p in range(8):
            assert obj.read(p * PAGE, PAGE) == page_bytes(1 + p)
        vm.check()


def test_sync_pageout_lets_readers_copy_and_makes_writers_wait() -> None:
    vm, devices = small_vm(reference=True, nframes=16, swap_nblocks=64, faulty=True)
    with vm:
        obj = vm.allocate(4 * PAGE)
        fill(obj)
        devices[0].latency_s = 0.5
        thread = threading.Thread(target=vm.pageout, daemon=True)
        thread.start()
        wait_until(lambda: any(p.writing for p in list(obj.pages.values())))
        t0 = time.monotonic()
        assert obj.read(0, PAGE) == page_bytes(1)
        assert time.monotonic() - t0 < 0.4, "a reader must not wait for the write"
        assert thread.is_alive()
        obj.write(2 * PAGE, b"after")  # waits for the write to finish
        assert not obj.pages[2].writing and obj.pages[2].dirty
        thread.join(10)
        devices[0].latency_s = 0
        assert obj.read(2 * PAGE, 5) == b"after"
        assert vm.inflight.statistics().writes_sync_in_flight == 0
        assert vm.inflight.in_flight(IOKind.WRITE_SYNC) == 0
        vm.check()


def test_a_write_may_complete_while_the_pager_waits_to_start_the_next_part() -> None:
    """A cluster split over two runs of swap, one async slot: the first part's
    write completes while the pager waits for a slot for the second part.

    put_pages then returned PEND for pages whose write had already finished
    (and whose frames may be free again); the contract check took that for a
    pager that lost track of its pages.
    """
    engine = HeldEngine()
    vm, _ = small_vm(
        reference=True,
        nframes=16,
        swap_nblocks=32,
        engine=engine,
        cluster_max_npages=8,
        swap_async_max=1,
    )
    with vm:
        a = vm.allocate(32 * PAGE)
        fill(a, 1000)
        vm.pageout()
        for first in (0, 8, 16, 24):  # free runs of 4 blocks, nothing longer
            a.discard(first * PAGE, 4 * PAGE)
        b = vm.allocate(8 * PAGE)
        fill(b, 1)
        errors: list[BaseException] = []

        def daemon() -> None:
            try:
                vm.pageout(asynchronous=True)
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=daemon, daemon=True)
        thread.start()
        wait_until(lambda: len(engine.pending) == 1)
        assert [p.pindex for p in engine.pending[0].pages] == [0, 1, 2, 3]
        engine.complete(0)  # the first part finishes while the pager waits
        deadline = time.monotonic() + 10
        while thread.is_alive() and time.monotonic() < deadline:
            if engine.pending:
                engine.complete(0)
            time.sleep(0.001)
        thread.join(1)
        assert not errors, errors
        engine.complete_all()
        for p in range(8):
            assert b.read(p * PAGE, PAGE) == page_bytes(1 + p)
        vm.check()


def test_daemon_thread_pages_out_while_the_general_pager_map_is_spent() -> None:
    """With the daemon thread: new writes keep going (the daemon makes room) while
    page-ins, which need an ordinary mapping, wait for one."""
    vm, _ = small_vm(reference=True, nframes=16, swap_nblocks=128, daemon_thread=True)
    with vm:
        pmap = vm.pagermap
        swapped = vm.allocate(4 * PAGE)
        fill(swapped, 50)
        vm.pageout()
        vm.wait_idle()
        general = pmap.size_npages - pmap.reserve_npages
        with vm.kernel.cond:
            token = pmap.try_map_in(general, daemon=False)
        assert token is not None
        got: list[bytes] = []
        reader = threading.Thread(target=lambda: got.append(swapped.read(0, PAGE)), daemon=True)
        reader.start()
        # Far more new pages than frames: only the daemon's pageouts make room.
        obj = vm.allocate(64 * PAGE)
        fill(obj, 1)
        assert vm.statistics().pageout_pages >= 40
        assert reader.is_alive() and not got, "a page-in must wait for a mapping"
        with vm.kernel.cond:
            pmap.map_out(token)
        reader.join(10)
        assert got == [page_bytes(50)]
        for p in range(64):
            assert obj.read(p * PAGE, PAGE) == page_bytes(1 + p)
        vm.check()
