"""The pager map's reserved window (NetBSD ``emergva``, ``uvm_pager.c`` 1.48).

The window is exclusive: one daemon transfer at a time, whatever its size;
ordinary callers never touch it; an asynchronous pageout holds its mapping
until its completion, so the window is what keeps the daemon writing when
ordinary users have spent the general pool.
"""

from __future__ import annotations

import threading

import pytest

from vmpager.io.engine import HeldEngine
from vmpager.testing.worlds import PAGE, small_vm
from vmpager.vm.pagermap import PagerMap


def test_window_is_exclusive_and_only_for_the_daemon() -> None:
    cond = threading.Condition()
    pmap = PagerMap(cond, 48, 16)
    with cond:
        general = pmap.try_map_in(32, daemon=False)
        assert general == 32
        assert pmap.try_map_in(1, daemon=False) is None  # ordinary: no window
        first = pmap.try_map_in(2, daemon=True)
        assert first is not None and first < 0  # the window, though 14 pages stay unused
        got: list[int | None] = []
        waiter = threading.Thread(target=lambda: got.append(_locked(cond, pmap, 1)))
        waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive() and not got  # a second daemon transfer waits for the window
    with cond:
        pmap.map_out(first)
    waiter.join(5)
    assert got and got[0] is not None and got[0] < 0
    with cond:
        pmap.map_out(got[0])
        pmap.map_out(general)
    pmap.check()
    assert pmap.statistics().reserve_uses == 2


def _locked(cond: threading.Condition, pmap: PagerMap, npages: int) -> int | None:
    with cond:
        return pmap.try_map_in(npages, daemon=True)


def test_sizes_beyond_the_pool_are_value_errors_and_beyond_the_window_wait() -> None:
    cond = threading.Condition()
    pmap = PagerMap(cond, 48, 16)
    with cond:
        for daemon in (False, True):
            with pytest.raises(ValueError, match=r"npages must be in \[1, 32\], got 33"):
                pmap.try_map_in(33, daemon=daemon)
            with pytest.raises(ValueError, match="npages"):
                pmap.try_map_in(0, daemon=daemon)
        big = pmap.try_map_in(17, daemon=True)  # too big for the window: general pool
        assert big == 17
        rest = pmap.try_map_in(15, daemon=False)
        assert rest == 15
        small = pmap.try_map_in(16, daemon=True)  # general pool spent: the window
        assert small == -16
        for token in (big, rest, small):
            pmap.map_out(token)
    pmap.check()


def test_async_pageouts_hold_mappings_and_the_daemon_goes_on_alone() -> None:
    """Ordinary users hold the whole general pool: the daemon's asynchronous
    pageouts still run, one at a time in the window, each holding it until its
    completion; every page written reads back."""
    engine = HeldEngine()
    vm, _ = small_vm(nframes=16, swap_nblocks=64, engine=engine, cluster_max_npages=4)
    with vm:
        pmap = vm.pagermap
        obj = vm.allocate(12 * PAGE)
        for p in range(12):
            obj.write(p * PAGE, bytes([p + 1]) * PAGE)
        general = pmap.size_npages - pmap.reserve_npages
        with vm.kernel.cond:
            token = pmap.try_map_in(general, daemon=False)
        assert token is not None
        done = threading.Event()
        thread = threading.Thread(
            target=lambda: (vm.pageout(asynchronous=True), done.set()), daemon=True
        )
        thread.start()
        deadline = 200
        while not done.is_set() and deadline:
            deadline -= 1
            thread.join(0.05)
            with vm.kernel.cond:
                if engine.pending:
                    # The write in flight holds the window; nothing else maps.
                    assert len(engine.pending) == 1
                    assert pmap.statistics().reserve_in_use_npages == len(engine.pending[0].pages)
            engine.complete_all()
        assert done.is_set()
        engine.complete_all()
        assert pmap.statistics().reserve_uses >= 2
        with vm.kernel.cond:
            pmap.map_out(token)
        assert pmap.statistics().in_use_npages == 0
        assert pmap.statistics().reserve_in_use_npages == 0
        for p in range(12):
            assert obj.read(p * PAGE, PAGE) == bytes([p + 1]) * PAGE
        vm.check()
