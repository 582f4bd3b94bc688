"""A clone with reserved swap, collapsed into: the reservation must not hide the data.

``reserve`` gives a page a block that holds no data yet; when the backing
object collapses into the clone, the backing object's copy of such a page is
the data and must survive (the reservation keeps holding one block).
"""

from __future__ import annotations

import pytest

from vmpager.testing.worlds import PAGE, small_vm

pytestmark = pytest.mark.timeout(60)


def page_bytes(tag: int) -> bytes:
    return tag.to_bytes(4, "little") * (PAGE // 4)


@pytest.mark.parametrize("where", ["swap", "resident_clean", "resident_dirty"])
def test_collapse_into_a_clone_with_reserved_pages_keeps_the_data(where: str) -> None:
    vm, _ = small_vm(nframes=16, swap_nblocks=64, readaround_npages=0)
    with vm:
        a = vm.allocate(4 * PAGE)
        for p in range(4):
            a.write(p * PAGE, page_bytes(p + 1))
        if where != "resident_dirty":
            vm.pageout()
        if where == "resident_clean":
            for p in range(4):
                a.read(p * PAGE, 1)
        b = a.clone()
        b.reserve(0, b.size)
        b.write(PAGE, page_bytes(99))  # one page of b's own
        used = vm.statistics().swap_used_blocks
        a.close()  # the frozen backing object collapses into b
        vm.check()
        want = [page_bytes(1), page_bytes(99), page_bytes(3), page_bytes(4)]
        for p in range(4):
            assert b.read(p * PAGE, PAGE) == want[p], p
        vm.pageout()
        for p in range(4):
            assert b.read(p * PAGE, PAGE) == want[p], p
        # The reservation still holds: one block per page of b, no more.
        assert vm.swap_pager.meta.count(b.oid) == 4
        assert vm.statistics().swap_used_blocks <= used
        vm.check()
