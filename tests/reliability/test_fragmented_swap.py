"""Pageout through fragmented swap: progress while one free block exists.

Swap is filled, then every page whose block is not a multiple of ``run + 1``
minus one is discarded, which leaves free runs of exactly ``run`` blocks
(1, 2 or 3) over most of the swap. Writing more than memory holds must then
page out into those short runs, not refuse with ``SwapExhausted`` while most
of swap is free; every page written reads back afterwards. ``SwapExhausted``
comes only when memory and swap truly cannot take a page, and its message
states the free blocks and the largest free run.

Both the default configuration (daemon thread, batched pageout) and the
reference's (FreeBSD ``swap_pager.c`` 2002 / NetBSD ``uvm_pager.c`` 1.48
policies: no daemon thread, clusters of neighbours of up to 16 pages, fixed
read-around) are exercised.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from vmpager import SwapExhausted
from vmpager.devices.memory import MemoryDevice
from vmpager.swap.meta import SWAPBLK_NONE
from vmpager.testing.worlds import PAGE, small_vm
from vmpager.vm.config import VMConfig
from vmpager.vm.object import VMObject
from vmpager.vm.system import VM

pytestmark = pytest.mark.timeout(300)

SWAP_NBLOCKS = 1024
NFRAMES = 64


def page_bytes(tag: int) -> bytes:
    return tag.to_bytes(4, "little") * (PAGE // 4)


def default_vm() -> VM:
    """The default configuration: daemon thread, batched pageout, 64-page clusters."""
    return VM(
        memory=NFRAMES * PAGE,
        swap=[MemoryDevice(SWAP_NBLOCKS, PAGE, name="ram0")],
        config=VMConfig(),
    )


def reference_vm() -> VM:
    """The reference's policies (``small_vm``'s) with the reference's 16-page clusters."""
    vm, _ = small_vm(nframes=NFRAMES, swap_nblocks=SWAP_NBLOCKS, cluster_max_npages=16)
    return vm


def reference_stripe_vm() -> VM:
    """The reference's policies on FreeBSD 2002's striped swap layout."""
    vm, _ = small_vm(
        nframes=NFRAMES, swap_nblocks=SWAP_NBLOCKS, cluster_max_npages=16, layout="stripe"
    )
    return vm


CONFIGS: dict[str, Any] = {
    "default": default_vm,
    "reference": reference_vm,
    "reference-stripe": reference_stripe_vm,
}


def fragment(vm: VM, run: int) -> tuple[VMObject, dict[int, bytes]]:
    """Fill the swap through strategy writes, then free runs of ``run`` blocks.

    Returns the filled object and the pages it keeps (page -> data); the kept
    pages' blocks are the ones at ``blk % (run + 1) == run``.
    """
    filler = vm.allocate(SWAP_NBLOCKS * PAGE)
    filler.strategy_write(0, b"".join(page_bytes(10_000 + p) for p in range(SWAP_NBLOCKS)))
    assert vm.space.free_blocks == 0
    kept: dict[int, bytes] = {}
    for p in range(SWAP_NBLOCKS):
        blk = vm.swap_pager.block_of(filler, p)
        assert blk != SWAPBLK_NONE
        if blk % (run + 1) == run:
            kept[p] = page_bytes(10_000 + p)
        else:
            filler.discard(p * PAGE, PAGE)
    space = vm.space
    assert space.largest_free_run() == run
    assert space.free_blocks >= SWAP_NBLOCKS // 2
    return filler, kept


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("run", [1, 2, 3])
def test_pageout_into_short_free_runs(config: str, run: int) -> None:
    vm = CONFIGS[config]()
    with vm:
        filler, kept = fragment(vm, run)
        free = vm.space.free_blocks
        # Far more than memory, and everything fits in swap's free blocks alone.
        npages = free
        assert npages > 4 * NFRAMES
        data = vm.allocate(npages * PAGE)
        for p in range(npages):
            data.write(p * PAGE, page_bytes(p + 1))
        for p in range(npages):
            assert data.read(p * PAGE, PAGE) == page_bytes(p + 1), p
        for p, want in kept.items():
            assert filler.read(p * PAGE, PAGE) == want, p
        vm.check()


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_exhausted_only_when_full_and_message_is_honest(config: str) -> None:
    vm = CONFIGS[config]()
    with vm:
        filler, kept = fragment(vm, 1)
        data = vm.allocate(4 * SWAP_NBLOCKS * PAGE)
        stored = 0
        with pytest.raises(SwapExhausted) as info:
            for p in range(4 * SWAP_NBLOCKS):
                data.write(p * PAGE, page_bytes(p + 1))
                stored += 1
        stats = vm.space.statistics()
        # Memory and swap really were full: no block was left for the page.
        assert stats.free == 0
        assert stored >= SWAP_NBLOCKS // 2
        message = str(info.value)
        assert re.search(rf"\b{stats.free} of {stats.total} blocks free\b", message), message
        assert "largest free run 0" in message, message
        for p in range(stored):
            assert data.read(p * PAGE, PAGE) == page_bytes(p + 1), p
        for p, want in kept.items():
            assert filler.read(p * PAGE, PAGE) == want, p
        vm.check()


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("run", [1, 2, 3])
def test_filled_by_writes_then_fragmented(config: str, run: int) -> None:
    """As a user would: write until ``SwapExhausted``, discard in a pattern that
    leaves free runs of ``run`` blocks, then write more than memory holds."""
    vm = CONFIGS[config]()
    with vm:
        first = vm.allocate((SWAP_NBLOCKS + 2 * NFRAMES) * PAGE)
        stored = 0
        with pytest.raises(SwapExhausted):
            for p in range(first.npages):
                first.write(p * PAGE, page_bytes(50_000 + p))
                stored += 1
        assert vm.space.free_blocks == 0
        kept: dict[int, bytes] = {}
        for p in range(stored):
            blk = vm.swap_pager.block_of(first, p)
            if blk == SWAPBLK_NONE or blk % (run + 1) == run:
                kept[p] = page_bytes(50_000 + p)
            else:
                first.discard(p * PAGE, PAGE)
        assert vm.space.largest_free_run() == run
        npages = vm.space.free_blocks - NFRAMES
        assert npages > 2 * NFRAMES
        more = vm.allocate(npages * PAGE)
        for p in range(npages):
            more.write(p * PAGE, page_bytes(p + 1))
        for p in range(npages):
            assert more.read(p * PAGE, PAGE) == page_bytes(p + 1), p
        for p, want in kept.items():
            assert first.read(p * PAGE, PAGE) == want, p
        vm.check()
