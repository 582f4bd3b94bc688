"""Swap and memory full: refusals the caller can handle, never loss.

- A write that needs room nobody can give raises ``SwapExhausted``; what it
  did not store is simply not there, and everything written before stays.
- Reads of data already written keep working, also after writes to pages
  that were read back in (the read reserve must stay usable).
- Freeing space (discard, close, swapon) makes writes work again.
- The almost-full warnings of logger ``vmpager.swap`` fire once per crossing.
"""

from __future__ import annotations

import itertools
import logging
import random

import pytest

from vmpager import SwapExhausted
from vmpager.devices.memory import MemoryDevice
from vmpager.testing.worlds import PAGE, small_vm
from vmpager.vm.object import VMObject
from vmpager.vm.system import VM

pytestmark = pytest.mark.timeout(120)


def page_bytes(tag: int) -> bytes:
    return tag.to_bytes(4, "little") * (PAGE // 4)


def fill_until_full(obj: VMObject, first_tag: int = 1) -> int:
    """Write whole pages until SwapExhausted; returns how many were stored."""
    for p in range(obj.npages):
        try:
            obj.write(p * PAGE, page_bytes(first_tag + p))
        except SwapExhausted:
            return p
    raise AssertionError("the object fit: the world is too big for this test")


def test_full_write_refused_then_everything_readable() -> None:
    vm, _ = small_vm(nframes=8, swap_nblocks=16)
    with vm:
        obj = vm.allocate(64 * PAGE)
        stored = fill_until_full(obj)
        # Memory minus the read reserve, plus swap (blocks, maybe minus a
        # fragment the halving allocator could not use).
        assert 16 <= stored <= 8 - vm.kernel.read_reserve + 16
        stats = vm.statistics()
        assert stats.swap_exhausted == 1
        assert stats.swap_full
        # The refused page holds nothing; every stored one its data.
        assert obj.read(stored * PAGE, PAGE) == bytes(PAGE)
        for p in range(stored):
            assert obj.read(p * PAGE, PAGE) == page_bytes(1 + p), p
        # Again in another order: page-ins keep working on a full machine.
        for p in random.Random(0).sample(range(stored), stored):
            assert obj.read(p * PAGE, PAGE) == page_bytes(1 + p), p
        # A second refused write changes nothing.
        with pytest.raises(SwapExhausted):
            obj.write((stored + 1) * PAGE, page_bytes(999))
        assert obj.read((stored + 1) * PAGE, PAGE) == bytes(PAGE)
        vm.check()


def test_reads_keep_working_after_writes_to_pages_read_back() -> None:
    """Writes to pages just read from swap must not fill the read reserve with dirt.

    Once every frame held a dirty page and swap was full, reading anything
    from swap raised SwapExhausted although that data had been stored.
    """
    vm, _ = small_vm(nframes=8, swap_nblocks=16, readaround_npages=0)
    with vm:
        obj = vm.allocate(64 * PAGE)
        stored = fill_until_full(obj)
        model = {p: page_bytes(1 + p) for p in range(stored)}
        rng = random.Random(1)
        refused = 0
        for step in range(300):
            p = rng.randrange(stored)
            if rng.random() < 0.5:
                data = page_bytes(10_000 + step)
                try:
                    obj.write(p * PAGE, data)
                except SwapExhausted:
                    refused += 1
                    continue
                model[p] = data
            else:
                assert obj.read(p * PAGE, PAGE) == model[p], (step, p)
        for p, data in model.items():
            assert obj.read(p * PAGE, PAGE) == data
        vm.check()


def test_write_fault_on_a_swapped_page_does_not_use_the_read_reserve() -> None:
    """Writing into a page on swap pages it in for a write: the write floor applies."""
    vm, _ = small_vm(nframes=8, swap_nblocks=16, readaround_npages=0)
    with vm:
        obj = vm.allocate(64 * PAGE)
        stored = fill_until_full(obj)
        on_swap = [p for p in range(stored) if p not in obj.pages]
        assert on_swap
        for p in on_swap:
            try:
                obj.write(p * PAGE + 1, b"w")
            except SwapExhausted:
                break
        dirty = sum(1 for page in obj.pages.values() if page.dirty)
        assert dirty <= vm.frames.nframes - vm.kernel.read_reserve
        for p in range(stored):
            obj.read(p * PAGE, PAGE)
        vm.check()


@pytest.mark.parametrize("how", ["discard", "close", "swapon"])
def test_writes_work_again_once_space_is_freed(how: str) -> None:
    vm, _ = small_vm(nframes=8, swap_nblocks=16)
    with vm:
        other = vm.allocate(8 * PAGE)
        for p in range(8):
            other.write(p * PAGE, page_bytes(500 + p))
        obj = vm.allocate(64 * PAGE)
        stored = fill_until_full(obj)
        with pytest.raises(SwapExhausted):
            obj.write(stored * PAGE, page_bytes(1 + stored))
        if how == "discard":
            obj.discard(0, 8 * PAGE)
        elif how == "close":
            other.close()
        else:
            vm.swapon(MemoryDevice(32, PAGE, name="extra"))
        more = 0
        for p in range(stored, min(stored + 6, obj.npages)):
            obj.write(p * PAGE, page_bytes(1 + p))
            more += 1
        assert more == 6
        first = 8 if how == "discard" else 0
        for p in range(first, stored + more):
            assert obj.read(p * PAGE, PAGE) == page_bytes(1 + p), p
        if how != "close":
            for p in range(8):
                assert other.read(p * PAGE, PAGE) == page_bytes(500 + p)
        vm.check()


def test_memory_only_vm_refuses_and_keeps_data() -> None:
    with VM(memory=8 * PAGE, swap=[]) as vm:
        obj = vm.allocate(32 * PAGE)
        stored = fill_until_full(obj)
        assert stored == 8 - vm.kernel.read_reserve
        for p in range(stored):
            assert obj.read(p * PAGE, PAGE) == page_bytes(1 + p)
        # Reads of never-written pages still get (clean, droppable) frames.
        for p in range(stored, 32):
            assert obj.read(p * PAGE, 16) == bytes(16)
        obj.discard(0, PAGE)
        obj.write(stored * PAGE, page_bytes(1 + stored))
        assert obj.read(stored * PAGE, PAGE) == page_bytes(1 + stored)
        vm.check()


def _almost_full_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "vmpager.swap" and r.levelno == logging.WARNING and "almost full" in r.message
    ]


def _cleared(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "vmpager.swap" and "no longer" in r.message]


def test_water_mark_warnings_fire_once_per_crossing(caplog: pytest.LogCaptureFixture) -> None:
    """Default marks: almost full below 128 free blocks, cleared above 512."""
    caplog.set_level(logging.INFO, logger="vmpager.swap")
    vm, _ = small_vm(nframes=16, swap_nblocks=1024, readaround_npages=0)
    with vm:
        stats = vm.space.statistics()
        low, high = stats.low_water, stats.high_water
        assert (low, high) == (128, 512)
        obj = vm.allocate(1024 * PAGE)
        # Use swap down to a little above the low mark: no warning yet.
        for p in range(1024 - low - 16 - 16):
            obj.write(p * PAGE, page_bytes(p))
        vm.pageout()
        assert vm.space.free_blocks > low
        assert not _almost_full_warnings(caplog)
        # Cross the low mark and go on using swap: one warning.
        for p in range(1024 - low - 32, 1024 - 48):
            obj.write(p * PAGE, page_bytes(p))
        vm.pageout()
        assert vm.space.free_blocks < low
        assert len(_almost_full_warnings(caplog)) == 1
        assert vm.statistics().swap_almost_full
        # Free a little: still below the high mark, still almost full, no message.
        obj.discard(0, 200 * PAGE)
        assert low < vm.space.free_blocks < high
        assert vm.statistics().swap_almost_full and not _cleared(caplog)
        # Free past the high mark: cleared once.
        obj.discard(200 * PAGE, 300 * PAGE)
        assert vm.space.free_blocks > high
        assert len(_cleared(caplog)) == 1
        assert not vm.statistics().swap_almost_full
        # Second crossing: a second warning, and only one.
        for p in range(0, 500):
            obj.write(p * PAGE, page_bytes(p))
        vm.pageout()
        assert vm.space.free_blocks < low
        assert len(_almost_full_warnings(caplog)) == 2
        for p in range(1024 - 48):
            assert obj.read(p * PAGE, PAGE) == page_bytes(p)
        vm.check()


def test_swap_full_warning_once_per_failure_streak(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="vmpager.swap")
    vm, _ = small_vm(nframes=8, swap_nblocks=16)
    with vm:
        obj = vm.allocate(64 * PAGE)
        stored = fill_until_full(obj)
        for _ in range(3):
            with pytest.raises(SwapExhausted):
                obj.write(stored * PAGE, page_bytes(1))
        full = [r for r in caplog.records if "swap space full" in r.message]
        assert len(full) == 1
        assert vm.space.statistics().full_events == 1
        assert vm.statistics().swap_exhausted == 4
        vm.check()


def test_fragmented_free_swap_is_still_used() -> None:
    """Free blocks that form no run as long as a cluster still take single pages.

    A cluster whose allocation failed (FAIL) was given up, so writes raised
    SwapExhausted with half of swap free in isolated blocks.
    """
    vm, _ = small_vm(nframes=8, swap_nblocks=16, readaround_npages=0)
    with vm:
        a = vm.allocate(16 * PAGE)
        for p in range(16):
            a.write(p * PAGE, page_bytes(p))
        vm.pageout()
        for p in range(0, 16, 2):
            a.discard(p * PAGE, PAGE)
        free = sorted(set(range(16)) - {blk for _, _, blk in vm.swap_pager.meta.items()})
        assert len(free) == 8 and all(y - x > 1 for x, y in itertools.pairwise(free))
        b = vm.allocate(16 * PAGE)
        stored = fill_until_full(b, 100)
        # Every free block, plus memory minus the read reserve.
        assert stored == 8 + vm.frames.nframes - vm.kernel.read_reserve
        assert vm.statistics().swap_used_blocks == 16
        for p in range(stored):
            assert b.read(p * PAGE, PAGE) == page_bytes(100 + p)
        for p in range(1, 16, 2):
            assert a.read(p * PAGE, PAGE) == page_bytes(p)
        vm.check()
