"""Sequential read-ahead on anonymous memory, and what a stream leaves behind.

With ``sequential_readahead`` a fault at the page after the last one paged
in continues a stream: its read-ahead window doubles from
``readaround_npages`` up to ``readahead_max_npages``; any other fault reads
its page alone. A stream at the full window hands the pages one window
behind it to the head of the inactive queue, references cleared, as many as
it brought in. Without the option FreeBSD 2002's read-around applies
(tests/vm/test_vm_cluster.py).
"""

from __future__ import annotations

from typing import Any

import pytest

from vmpager.testing.worlds import PAGE, small_vm
from vmpager.vm.object import VMObject
from vmpager.vm.page import QUEUE_INACTIVE
from vmpager.vm.system import VM

pytestmark = pytest.mark.timeout(60)


def page_bytes(tag: int) -> bytes:
    return tag.to_bytes(4, "little") * (PAGE // 4)


def swapped(npages: int, **config: Any) -> tuple[VM, VMObject]:
    """Every page written, then paged out in order (contiguous blocks); nothing resident."""
    base: dict[str, Any] = {
        "nframes": 96,
        "swap_nblocks": 4 * npages,
        "readaround_npages": 2,
        "readahead_max_npages": 8,
        "cluster_max_npages": 64,  # one pageout cluster: blocks in page order
        "sequential_readahead": True,
    }
    base.update(config)
    vm, _ = small_vm(**base)
    obj = vm.allocate(npages * PAGE)
    for p in range(npages):
        obj.write(p * PAGE, page_bytes(p))
    vm.pageout()
    assert not obj.pages
    return vm, obj


def reads_of(vm: VM, obj: VMObject, pindices: list[int]) -> list[int]:
    """Read each page in turn; returns the size of every page-in it took."""
    sizes = []
    for p in pindices:
        before = vm.statistics()
        assert obj.read(p * PAGE, PAGE) == page_bytes(p)
        after = vm.statistics()
        if after.pageins != before.pageins:
            assert after.pageins == before.pageins + 1
            sizes.append(after.pagein_pages - before.pagein_pages)
    return sizes


def test_a_stream_reads_ahead_in_growing_windows() -> None:
    vm, obj = swapped(64)
    with vm:
        # The writes left the stream at the end: page 0 is a random fault, page 1
        # follows it; then 1 + 2, 1 + 4 and 1 + 8 pages per read.
        assert reads_of(vm, obj, list(range(40))) == [1, 3, 5, 9, 9, 9, 9]
        assert vm.statistics().readaround_hits == 40 - 7
        vm.check()


def test_random_faults_read_their_page_alone() -> None:
    vm, obj = swapped(64)
    with vm:
        assert reads_of(vm, obj, [30, 10, 50, 20, 40]) == [1, 1, 1, 1, 1]
        assert vm.statistics().readaround_pages == 0
        # A stream can start anywhere: 41 follows 40. Read-ahead stops at a
        # resident page (50), so 49 comes alone.
        assert reads_of(vm, obj, list(range(41, 50))) == [3, 5, 1]
        vm.check()


def test_the_window_collapses_on_a_jump_and_grows_again() -> None:
    vm, obj = swapped(64)
    with vm:
        assert reads_of(vm, obj, list(range(12))) == [1, 3, 5, 9]
        assert reads_of(vm, obj, [40]) == [1]
        assert reads_of(vm, obj, list(range(41, 50))) == [3, 5, 9]
        vm.check()


def test_the_reference_read_around_without_the_option() -> None:
    vm, obj = swapped(64, sequential_readahead=False)
    with vm:
        assert reads_of(vm, obj, [30]) == [5]  # two on each side
        vm.check()


def test_a_stream_at_full_speed_leaves_what_is_behind_it_to_the_daemon() -> None:
    vm, obj = swapped(64, readahead_max_npages=4)
    with vm:
        # Reads at 0, 1, 4, 9, 14, 19; from 4 on the window is full, and from 9
        # on the pages a window behind, as many as came in, go to the head.
        assert reads_of(vm, obj, list(range(24))) == [1, 3, 5, 5, 5, 5]
        inactive = list(vm.queues.inactive)
        head = [p.pindex for p in inactive[:15]]
        assert head == [*range(10, 15), *range(5, 10), *range(0, 5)]
        for page in inactive[:15]:
            assert page.queue == QUEUE_INACTIVE and not page.referenced
        # What the stream is on keeps its references.
        assert all(obj.pages[p].referenced for p in (15, 16, 20, 21))
        vm.check()


def test_a_cyclic_scan_larger_than_memory_keeps_part_of_it() -> None:
    """Most-recently-used first for a stream: the second pass finds pages resident."""
    vm, _ = small_vm(
        nframes=64,
        swap_nblocks=512,
        readaround_npages=2,
        readahead_max_npages=8,
        cluster_max_npages=8,
        sequential_readahead=True,
    )
    with vm:
        obj = vm.allocate(192 * PAGE)
        for p in range(192):
            obj.write(p * PAGE, page_bytes(p))
        before = vm.statistics()
        for p in range(192):
            assert obj.read(p * PAGE, 8) == page_bytes(p)[:8]
        after = vm.statistics()
        paged_in = after.pagein_pages - before.pagein_pages
        # Least-recently-used would page every one of the 192 pages in again.
        assert paged_in <= 192 - 32, paged_in
        vm.check()
