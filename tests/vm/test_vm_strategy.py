"""swap_pager_strategy: cacheless whole-page I/O on swap objects, chained children."""

from __future__ import annotations

import errno
import os
import threading

import pytest

from vmpager import DeviceError, SwapExhausted
from vmpager.io.engine import HeldEngine
from vmpager.pager.strategy import CHAIN_MAX_INFLIGHT
from vmpager.testing.worlds import PAGE, small_vm


def test_round_trip_zeros_and_delete() -> None:
    vm, _ = small_vm(nframes=4, swap_nblocks=64)
    with vm:
        obj = vm.allocate(16 * PAGE)
        data = os.urandom(6 * PAGE)
        obj.strategy_write(2 * PAGE, data)
        assert vm.statistics().resident_npages == 0  # cacheless
        buf = bytearray(10 * PAGE)
        obj.strategy_read(0, buf)
        assert bytes(buf) == bytes(2 * PAGE) + data + bytes(2 * PAGE)
        # The normal path sees strategy writes, and strategy reads see resident pages.
        assert obj.read(3 * PAGE, PAGE) == data[PAGE : 2 * PAGE]
        obj.write(3 * PAGE, b"resident")
        obj.strategy_read(3 * PAGE, memoryview(buf)[:PAGE])
        assert bytes(buf[:8]) == b"resident"
        # A strategy write replaces resident pages of its range.
        obj.strategy_write(3 * PAGE, bytes([7]) * PAGE)
        assert obj.read(3 * PAGE, PAGE) == bytes([7]) * PAGE
        used = vm.statistics().swap_used_blocks
        obj.strategy_delete(2 * PAGE, 2 * PAGE)
        assert vm.statistics().swap_used_blocks == used - 2
        assert obj.read(2 * PAGE, 2 * PAGE) == bytes(2 * PAGE)
        vm.check()


def test_requests_must_be_whole_pages() -> None:
    vm, _ = small_vm()
    with vm:
        obj = vm.allocate(4 * PAGE)
        with pytest.raises(ValueError, match="whole pages"):
            obj.strategy_write(1, bytes(PAGE))
        with pytest.raises(ValueError, match="whole pages"):
            obj.strategy_read(0, bytearray(100))
        with pytest.raises(ValueError, match="whole pages"):
            obj.strategy_delete(0, 10)
        with pytest.raises(ValueError, match=r"offset|length"):
            obj.strategy_write(4 * PAGE, bytes(PAGE))


def test_write_when_swap_is_full_takes_nothing() -> None:
    vm, _ = small_vm(nframes=4, swap_nblocks=8)
    with vm:
        obj = vm.allocate(16 * PAGE)
        obj.strategy_write(0, bytes([1]) * 6 * PAGE)
        with pytest.raises(SwapExhausted, match="ENOSPC"):
            obj.strategy_write(6 * PAGE, bytes(4 * PAGE))
        assert vm.statistics().swap_used_blocks == 6
        buf = bytearray(6 * PAGE)
        obj.strategy_read(0, buf)
        assert bytes(buf) == bytes([1]) * 6 * PAGE
        vm.check()


def test_split_into_children_at_most_four_in_flight_errors_to_parent() -> None:
    engine = HeldEngine()
    vm, _devs = small_vm(
        nframes=4, swap_nblocks=[16, 16], engine=engine, faulty=True, cluster_max_npages=2
    )
    with vm:
        obj = vm.allocate(16 * PAGE)
        result: list[BaseException | None] = []

        def write() -> None:
            try:
                obj.strategy_write(0, bytes([9]) * 12 * PAGE)  # 6 children of 2 pages
                result.append(None)
            except BaseException as exc:
                result.append(exc)

        t = threading.Thread(target=write)
        t.start()
        seen = 0
        while seen < 6:
            while not engine.pending:
                t.join(0.01)
            assert len(engine.pending) <= CHAIN_MAX_INFLIGHT
            # Complete out of order; fail the third child hard.
            index = len(engine.pending) - 1
            error = DeviceError(errno.EIO, "test", 0) if seen == 2 else None
            engine.complete(index, error)
            seen += 1
        t.join(10)
        assert not t.is_alive()
        assert isinstance(result[0], DeviceError)
        stats = vm.statistics()
        assert stats.swap_bad_blocks == 2  # NetBSD 1.48's policy: hard error marks bad
        assert stats.swap_used_blocks == 10  # the five good children kept their blocks
        vm.check()


def test_overwrite_of_owned_blocks_succeeds_on_a_full_swap() -> None:
    """As FreeBSD's swap_pager_strategy: pages that own blocks are written in
    place when swap has no room for fresh ones; pages without one still need
    a free block (all or nothing)."""
    vm, _ = small_vm(nframes=4, swap_nblocks=8)
    with vm:
        obj = vm.allocate(16 * PAGE)
        obj.strategy_write(0, bytes([1]) * 8 * PAGE)
        assert vm.space.free_blocks == 0
        blocks = [vm.swap_pager.block_of(obj, p) for p in range(8)]
        obj.strategy_write(2 * PAGE, bytes([2]) * 4 * PAGE)  # full swap: in place
        assert [vm.swap_pager.block_of(obj, p) for p in range(8)] == blocks
        buf = bytearray(8 * PAGE)
        obj.strategy_read(0, buf)
        assert bytes(buf) == bytes([1]) * 2 * PAGE + bytes([2]) * 4 * PAGE + bytes([1]) * 2 * PAGE
        # A request that also covers a page without a block takes nothing.
        with pytest.raises(SwapExhausted, match=r"1 have no swap block.*0 of 8 blocks free"):
            obj.strategy_write(7 * PAGE, bytes([3]) * 2 * PAGE)
        obj.strategy_read(0, buf)
        assert bytes(buf[7 * PAGE :]) == bytes([1]) * PAGE
        assert obj.read(8 * PAGE, PAGE) == bytes(PAGE)
        # With room again, overwrites go to fresh blocks (switched on success).
        obj.strategy_delete(0, 2 * PAGE)
        obj.strategy_write(7 * PAGE, bytes([4]) * PAGE)
        assert vm.swap_pager.block_of(obj, 7) != blocks[7]
        assert obj.read(7 * PAGE, PAGE) == bytes([4]) * PAGE
        vm.check()


def test_chained_error_is_the_last_child_to_fail() -> None:
    """vm_pager_chain_iodone: each failed child overwrites the parent's error."""
    engine = HeldEngine()
    vm, _devs = small_vm(nframes=4, swap_nblocks=32, engine=engine, cluster_max_npages=2)
    with vm:
        obj = vm.allocate(8 * PAGE)
        result: list[BaseException | None] = []

        def write() -> None:
            try:
                obj.strategy_write(0, bytes([9]) * 6 * PAGE)  # 3 children of 2 pages
                result.append(None)
            except BaseException as exc:
                result.append(exc)

        t = threading.Thread(target=write)
        t.start()
        errnos = [errno.EIO, None, errno.ENOSPC]
        for err in errnos:
            while not engine.pending:
                t.join(0.01)
            engine.complete(0, None if err is None else DeviceError(err, "test", 0))
        t.join(10)
        assert isinstance(result[0], DeviceError)
        assert result[0].errno == errno.ENOSPC
        vm.check()
