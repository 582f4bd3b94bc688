"""Pageout in batches (``pageout_batching``) and batched swap frees.

With ``pageout_batching`` the page daemon collects the dirty pages of
anonymous objects it meets on the inactive queue, whatever their objects and
offsets, and writes each batch of up to ``cluster_max_npages`` to one run of
swap blocks, in (object, page) order. With ``swap_free_batch_nblocks`` > 1
the blocks of pages made dirty go back to the swap space in sorted batches,
and before anything allocates swap or reports its use.
"""

from __future__ import annotations

import errno
from typing import Any

import pytest

from vmpager import SwapExhausted
from vmpager.io.engine import HeldEngine
from vmpager.swap.meta import SWAPBLK_NONE
from vmpager.testing.worlds import PAGE, small_vm
from vmpager.vm.object import VMObject
from vmpager.vm.system import VM

pytestmark = pytest.mark.timeout(60)


def page_bytes(tag: int) -> bytes:
    return tag.to_bytes(4, "little") * (PAGE // 4)


def batching_vm(**config: Any) -> tuple[VM, list[Any]]:
    base: dict[str, Any] = {
        "nframes": 32,
        "swap_nblocks": 64,
        "cluster_max_npages": 8,
        "pageout_batching": True,
    }
    base.update(config)
    return small_vm(**base)


def blocks(vm: VM, obj: VMObject) -> dict[int, int]:
    return dict(vm.swap_pager.meta.pages(obj.oid))


def test_scattered_pages_of_two_objects_go_out_in_one_write_in_object_order() -> None:
    vm, devices = batching_vm()
    with vm:
        a = vm.allocate(16 * PAGE)
        b = vm.allocate(16 * PAGE)
        # Interleaved and out of order on the queues.
        for p in (9, 3, 12, 1):
            a.write(p * PAGE, page_bytes(100 + p))
            b.write(p * PAGE, page_bytes(200 + p))
        writes = devices[0].statistics().write_ops
        vm.pageout()
        assert devices[0].statistics().write_ops == writes + 1
        assert dict(vm.statistics().cluster_histogram) == {8: 1}
        where_a, where_b = blocks(vm, a), blocks(vm, b)
        run = [where_a[p] for p in (1, 3, 9, 12)] + [where_b[p] for p in (1, 3, 9, 12)]
        assert run == list(range(run[0], run[0] + 8))
        assert not a.pages and not b.pages
        for p in (9, 3, 12, 1):
            assert a.read(p * PAGE, PAGE) == page_bytes(100 + p)
            assert b.read(p * PAGE, PAGE) == page_bytes(200 + p)
        vm.check()


def test_without_the_option_clusters_are_neighbours_in_one_object() -> None:
    vm, _ = batching_vm(pageout_batching=False)
    with vm:
        a = vm.allocate(16 * PAGE)
        for p in (9, 3, 12, 1):
            a.write(p * PAGE, page_bytes(p))
        vm.pageout()
        assert dict(vm.statistics().cluster_histogram) == {1: 4}
        vm.check()


def test_no_swap_leaves_the_batch_dirty_and_resident() -> None:
    vm, _ = batching_vm(nframes=16, swap_nblocks=4)
    with vm:
        obj = vm.allocate(32 * PAGE)
        written = 0
        with pytest.raises(SwapExhausted):
            for p in range(32):
                obj.write(p * PAGE, page_bytes(p))
                written += 1
        assert vm.statistics().pageout_fail_pages > 0
        for p in range(written):
            assert obj.read(p * PAGE, PAGE) == page_bytes(p)
        vm.check()


@pytest.mark.parametrize("err", [errno.EAGAIN, errno.EIO])
def test_a_failed_batch_write_keeps_every_page(err: int) -> None:
    vm, devices = batching_vm(faulty=True)
    dev = devices[0]
    with vm:
        a = vm.allocate(8 * PAGE)
        b = vm.allocate(8 * PAGE)
        for p in range(4):
            a.write(2 * p * PAGE, page_bytes(p))
            b.write(2 * p * PAGE, page_bytes(50 + p))
        dev.fail_writes(range(dev.nblocks), errno=err, times=1)
        vm.pageout()
        stats = vm.statistics()
        assert stats.write_errors == 1
        assert stats.swap_bad_blocks == (8 if err == errno.EIO else 0)
        vm.pageout()  # the pages are dirty again: the next write goes elsewhere
        for p in range(4):
            assert a.read(2 * p * PAGE, PAGE) == page_bytes(p)
            assert b.read(2 * p * PAGE, PAGE) == page_bytes(50 + p)
        vm.check()


def test_asynchronous_batches_complete_later() -> None:
    engine = HeldEngine()
    vm, _ = batching_vm(engine=engine, cluster_max_npages=4)
    with vm:
        a = vm.allocate(8 * PAGE)
        b = vm.allocate(8 * PAGE)
        for p in range(3):
            a.write(p * PAGE, page_bytes(p))
            b.write(5 * PAGE + p * PAGE, page_bytes(10 + p))
        vm.pageout(asynchronous=True)
        assert sorted(len(r.pages) for r in engine.pending) == [2, 4]
        objects = {p.obj.oid for r in engine.pending for p in r.pages}
        assert objects == {a.oid, b.oid}
        assert all(p.writing and p.dirty for r in engine.pending for p in r.pages)
        vm.check()
        engine.complete_all()
        assert not any(p.dirty for p in list(a.pages.values()) + list(b.pages.values()))
        for p in range(3):
            assert a.read(p * PAGE, PAGE) == page_bytes(p)
        vm.check()


def test_reserved_objects_are_written_in_place_not_batched() -> None:
    vm, _ = batching_vm()
    with vm:
        obj = vm.allocate(8 * PAGE, reserve=True)
        reserved = blocks(vm, obj)
        other = vm.allocate(8 * PAGE)
        for p in range(4):
            obj.write(p * PAGE, page_bytes(p))
            other.write(p * PAGE, page_bytes(9))
        vm.pageout()
        assert blocks(vm, obj) == reserved
        for p in range(4):
            assert obj.read(p * PAGE, PAGE) == page_bytes(p)
        vm.check()


def test_blocks_of_dirtied_pages_are_freed_in_batches() -> None:
    vm, _ = small_vm(nframes=32, swap_nblocks=64, swap_free_batch_nblocks=8)
    with vm:
        obj = vm.allocate(16 * PAGE)
        for p in range(16):
            obj.write(p * PAGE, page_bytes(p))
        vm.pageout()
        used = vm.space.statistics().used
        assert used == 16
        for p in range(5):  # paged in, then made dirty: the copies are stale
            obj.write(p * PAGE, page_bytes(20 + p))
            assert vm.swap_pager.meta.lookup(obj.oid, p) == SWAPBLK_NONE
        assert vm.space.statistics().used == used  # not given back yet
        vm.check()  # ...but the check gives them back first
        assert vm.space.statistics().used == used - 5
        for p in range(5, 13):  # eight more: a full batch goes back at once
            obj.write(p * PAGE, page_bytes(20 + p))
        assert vm.space.statistics().used == used - 13
        assert vm.statistics().swap_used_blocks == 16 - 13
        for p in range(16):
            want = page_bytes(20 + p) if p < 13 else page_bytes(p)
            assert obj.read(p * PAGE, PAGE) == want
        vm.check()


def test_stale_blocks_go_back_before_swap_is_allocated() -> None:
    vm, _ = small_vm(nframes=8, swap_nblocks=12, swap_free_batch_nblocks=64)
    with vm:
        obj = vm.allocate(12 * PAGE)
        for p in range(12):
            obj.write(p * PAGE, page_bytes(p))
        vm.pageout()
        # Rewrite everything twice: without the flush before allocating, the
        # stale blocks would fill the 12-block swap.
        for rnd in range(2):
            for p in range(12):
                obj.write(p * PAGE, page_bytes(100 * rnd + p))
            vm.pageout()
        for p in range(12):
            assert obj.read(p * PAGE, PAGE) == page_bytes(100 + p)
        vm.check()
