"""Copy-on-write faults when frames are short: the copy-up must not livelock."""

from __future__ import annotations

import threading

import pytest

from vmpager import SwapExhausted
from vmpager.testing.worlds import PAGE, small_vm

pytestmark = pytest.mark.timeout(60)


def page_bytes(tag: int) -> bytes:
    return tag.to_bytes(4, "little") * (PAGE // 4)


@pytest.mark.parametrize("swap_nblocks", [8, 64])
def test_write_to_a_clone_page_on_swap_with_one_frame_above_the_reserve(
    swap_nblocks: int,
) -> None:
    """Page the backing page in, then copy it up: the wait for the copy's frame
    must not drop the backing page it is about to copy.

    The wait freed the clean backing page, the next look paged it in again,
    and so on forever with the VM lock held.
    """
    vm, _ = small_vm(nframes=8, swap_nblocks=swap_nblocks, readaround_npages=0)
    with vm:
        a = vm.allocate(8 * PAGE)
        for p in range(8):
            a.write(p * PAGE, page_bytes(p))
        vm.pageout()
        b = a.clone()
        c = vm.allocate(8 * PAGE)
        # Dirty pages until exactly one frame above the read reserve is free.
        p = 0
        while vm.statistics().free_nframes > vm.kernel.read_reserve + 1:
            c.write(p * PAGE, page_bytes(100 + p))
            p += 1
        outcome: list[object] = []

        def write() -> None:
            try:
                b.write(10, b"clone")
                outcome.append("ok")
            except SwapExhausted as exc:
                outcome.append(exc)

        thread = threading.Thread(target=write, daemon=True)
        thread.start()
        thread.join(20)
        assert not thread.is_alive(), "the copy-up fault livelocks"
        if swap_nblocks == 8:
            # Swap full of a's pages, memory full of c's: the copy has nowhere to go.
            assert isinstance(outcome[0], SwapExhausted)
            assert b.read(0, PAGE) == page_bytes(0)
        else:
            assert outcome == ["ok"]
            want = bytearray(page_bytes(0))
            want[10:15] = b"clone"
            assert b.read(0, PAGE) == bytes(want)
        assert a.read(0, PAGE) == page_bytes(0)
        for q in range(p):
            assert c.read(q * PAGE, PAGE) == page_bytes(100 + q)
        vm.check()
