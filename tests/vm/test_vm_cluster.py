"""Pageout clustering and read-around against the reference sources' rules.

Pageout (NetBSD uvm_mk_pcluster): from the dirty center page, grow backward,
then forward, over pages that are resident, dirty and idle, inside the
pager's window; stop at the first page that does not qualify. A window wider
than the caller's cluster array means the center alone.

Read-around (FreeBSD swap_pager_getpages / haspage): the pages before and
after the faulting one that are contiguous on swap, inside one stripe (or
device), not resident and inside the object, up to the window on each side.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from vmpager.io.engine import HeldEngine
from vmpager.testing.worlds import PAGE, small_vm
from vmpager.vm.cluster import make_put_cluster
from vmpager.vm.object import VMObject
from vmpager.vm.page import QUEUE_INACTIVE, Page
from vmpager.vm.pagerops import PagerResult
from vmpager.vm.put import pager_put
from vmpager.vm.system import VM

pytestmark = pytest.mark.timeout(120)

# -- make_put_cluster against the rule, state by state -------------------------

STATES = ["absent", "clean", "dirty", "busy", "writing"]


def make_pages(states: list[str]) -> tuple[Any, dict[int, Page]]:
    # A stand-in object: its kernel only counts dirty pages (Page.dirty).
    obj: Any = SimpleNamespace(oid=1, pages={}, _kernel=SimpleNamespace(ndirty=0))
    for pindex, state in enumerate(states):
        if state == "absent":
            continue
        page = Page(obj, pindex, pindex)
        page.busy = state == "busy"
        page.writing = state == "writing"
        page.dirty = state in ("dirty", "busy", "writing")
        obj.pages[pindex] = page
    return obj, obj.pages


def expected_cluster(states: list[str], center: int, lo: int, hi: int, max_npages: int) -> list:
    if hi - lo > max_npages:
        return [center]
    first = center
    while first - 1 >= lo and states[first - 1] == "dirty":
        first -= 1
    last = center
    while last + 1 < hi and states[last + 1] == "dirty":
        last += 1
    return list(range(first, last + 1))


@settings(max_examples=200, deadline=None)
@given(
    data=st.data(),
    states=st.lists(st.sampled_from(STATES), min_size=1, max_size=24),
    max_npages=st.integers(1, 16),
)
def test_put_cluster_follows_the_reference_rule(
    data: st.DataObject, states: list[str], max_npages: int
) -> None:
    center = data.draw(st.integers(0, len(states) - 1))
    states[center] = "dirty"
    lo = data.draw(st.integers(0, center))
    hi = data.draw(st.integers(center + 1, len(states)))
    obj, pages = make_pages(states)
    before = {i: (p.busy, p.writing, p.dirty) for i, p in pages.items()}
    cluster = make_put_cluster(obj, pages[center], lo, hi, max_npages)
    want = expected_cluster(states, center, lo, hi, max_npages)
    assert [p.pindex for p in cluster] == want
    assert len(cluster) <= max(max_npages, 1)
    for i, page in pages.items():
        busy, writing, dirty = before[i]
        assert page.dirty == dirty and page.busy == busy
        # Exactly the cluster's pages became writing; no other page changed.
        assert page.writing == (writing or i in want), (i, states)


def test_put_cluster_window_wider_than_the_array_takes_the_center_alone() -> None:
    obj, pages = make_pages(["dirty"] * 8)
    cluster = make_put_cluster(obj, pages[3], 0, 8, 4)
    assert [p.pindex for p in cluster] == [3]
    assert [p.pindex for p in pages.values() if p.writing] == [3]


# -- clustering through the VM ------------------------------------------------------


def page_bytes(tag: int) -> bytes:
    return tag.to_bytes(4, "little") * (PAGE // 4)


def blocks(vm: VM, obj: VMObject) -> dict[int, int]:
    return dict(vm.swap_pager.meta.pages(obj.oid))


def histogram_delta(before: tuple, after: tuple) -> dict[int, int]:
    b, a = dict(before), dict(after)
    return {k: a[k] - b.get(k, 0) for k in a if a[k] - b.get(k, 0)}


def test_pageout_clusters_are_aligned_windows_written_contiguously() -> None:
    vm, _ = small_vm(reference=True, nframes=32, swap_nblocks=64, cluster_max_npages=4)
    with vm:
        obj = vm.allocate(10 * PAGE)
        for p in range(10):
            obj.write(p * PAGE, page_bytes(p))
        vm.pageout()
        # Windows [0,4) [4,8) [8,10): never one cluster across a window edge.
        assert dict(vm.statistics().cluster_histogram) == {4: 2, 2: 1}
        where = blocks(vm, obj)
        for first, n in ((0, 4), (4, 4), (8, 2)):
            run = [where[p] for p in range(first, first + n)]
            assert run == list(range(run[0], run[0] + n)), run
        for p in range(10):
            assert obj.read(p * PAGE, PAGE) == page_bytes(p)
        vm.check()


def test_pageout_cluster_stops_at_clean_and_absent_pages() -> None:
    vm, _ = small_vm(
        reference=True, nframes=32, swap_nblocks=64, cluster_max_npages=8, readaround_npages=0
    )
    with vm:
        obj = vm.allocate(8 * PAGE)
        for p in range(8):
            obj.write(p * PAGE, page_bytes(p))
        vm.pageout()
        # Page 2 clean and resident, page 5 on swap only, the rest dirty again.
        assert obj.read(2 * PAGE, PAGE) == page_bytes(2)
        for p in (0, 1, 3, 4, 6, 7):
            obj.write(p * PAGE, page_bytes(100 + p))
        before = vm.statistics().cluster_histogram
        vm.pageout()
        # Clusters: [0,1] (stops at clean 2), [3,4] (stops at 2 and absent 5), [6,7].
        assert histogram_delta(before, vm.statistics().cluster_histogram) == {2: 3}
        where = blocks(vm, obj)
        for a, b in ((0, 1), (3, 4), (6, 7)):
            assert where[b] == where[a] + 1
        for p in range(8):
            want = page_bytes(p) if p in (2, 5) else page_bytes(100 + p)
            assert obj.read(p * PAGE, PAGE) == want
        vm.check()


def test_pageout_cluster_skips_pages_being_written() -> None:
    engine = HeldEngine()
    vm, _ = small_vm(
        reference=True, nframes=32, swap_nblocks=64, cluster_max_npages=8, engine=engine
    )
    with vm:
        obj = vm.allocate(8 * PAGE)
        for p in range(4):
            obj.write(p * PAGE, page_bytes(p))
        vm.pageout(asynchronous=True)
        assert [[p.pindex for p in r.pages] for r in engine.pending] == [[0, 1, 2, 3]]
        for p in range(4, 8):
            obj.write(p * PAGE, page_bytes(p))
        # Pages 0..3 are still being written: a cluster around 5 starts at 4.
        with vm.kernel.cond:
            outcome = pager_put(vm.swap_pager, obj, obj.pages[5], sync=True, max_npages=8)
        assert outcome.result is PagerResult.OK
        assert outcome.cluster_npages == 4
        assert all(obj.pages[p].writing for p in range(4))
        assert not any(obj.pages[p].dirty for p in range(4, 8))
        engine.complete_all()
        vm.pageout()
        for p in range(8):
            assert obj.read(p * PAGE, PAGE) == page_bytes(p)
        vm.check()


# -- read-around ----------------------------------------------------------------------


def swapped_world(npages: int = 48, window: int = 8, **kw: Any) -> tuple[VM, VMObject]:
    """Every page on swap, page p at block p (sequential clusters), nothing resident."""
    vm, _ = small_vm(
        reference=True, nframes=64, readaround_npages=window, cluster_max_npages=4, **kw
    )
    obj = vm.allocate(npages * PAGE)
    for p in range(npages):
        obj.write(p * PAGE, page_bytes(p))
    vm.pageout()
    assert not obj.pages
    return vm, obj


def fault(vm: VM, obj: VMObject, pindex: int) -> set[int]:
    """Read one page; returns the pages the page-in brought in."""
    before = set(obj.pages)
    ins = vm.statistics().pageins
    assert obj.read(pindex * PAGE, PAGE) == page_bytes(pindex)
    assert vm.statistics().pageins == ins + 1
    return set(obj.pages) - before


def test_readaround_takes_the_window_on_each_side() -> None:
    vm, obj = swapped_world(swap_nblocks=64)
    with vm:
        got = fault(vm, obj, 20)
        assert got == set(range(12, 29))
        stats = vm.statistics()
        assert stats.readaround_pages == 16
        # Read-around pages are clean, unbusied and inactive; the faulted one active.
        for p in got - {20}:
            page = obj.pages[p]
            assert not page.dirty and not page.busy and page.queue == QUEUE_INACTIVE
            assert page.prefetched
        assert not obj.pages[20].prefetched
        # Using a prefetched page counts a hit and costs no I/O.
        assert obj.read(21 * PAGE, 4) == page_bytes(21)[:4]
        assert vm.statistics().readaround_hits == 1
        assert vm.statistics().pageins == stats.pageins
        vm.check()


def test_readaround_stays_inside_the_object() -> None:
    vm, obj = swapped_world(npages=12, swap_nblocks=64)
    with vm:
        assert fault(vm, obj, 1) == set(range(0, 10))
        vm.pageout()
        assert fault(vm, obj, 11) == set(range(3, 12))
        vm.check()


def test_readaround_stops_at_resident_pages() -> None:
    vm, obj = swapped_world(swap_nblocks=64, window=4)
    with vm:
        assert fault(vm, obj, 18) == set(range(14, 23))
        # Keep 18 and 23 resident; drop the rest (clean: their swap copies stay).
        assert fault(vm, obj, 27) == set(range(23, 32))
        with vm.kernel.cond:
            for p in list(obj.pages):
                if p not in (18, 23):
                    vm.kernel.free_page(obj.pages[p])
        assert set(obj.pages) == {18, 23}
        # Window 16..24 around 20: stops after 18 going back, before 23 going on.
        assert fault(vm, obj, 20) == {19, 20, 21, 22}
        vm.check()


def test_readaround_stops_where_swap_is_not_contiguous() -> None:
    vm, obj = swapped_world(swap_nblocks=64)
    with vm:
        # Rewrite pages 17 and 23: their new blocks lie past the others.
        obj.write(17 * PAGE, page_bytes(17))
        obj.write(23 * PAGE, page_bytes(23))
        vm.pageout()
        where = blocks(vm, obj)
        assert where[17] != where[16] + 1 and where[23] != where[22] + 1
        assert fault(vm, obj, 20) == set(range(18, 23))
        vm.check()


def test_readaround_never_crosses_a_stripe() -> None:
    # Two devices striped by 32 blocks: global blocks 0..31 are on ram0, 32..63 on ram1.
    vm, obj = swapped_world(swap_nblocks=[64, 64], layout="stripe")
    with vm:
        where = blocks(vm, obj)
        assert [where[p] for p in (28, 31, 32, 35)] == [28, 31, 32, 35]
        assert vm.space.locate(31)[0] is not vm.space.locate(32)[0]
        assert fault(vm, obj, 30) == set(range(22, 32))
        assert fault(vm, obj, 33) == set(range(32, 42))
        vm.check()


def test_readaround_never_crosses_devices_in_the_per_device_layout() -> None:
    vm, _ = small_vm(
        reference=True, nframes=64, swap_nblocks=[8, 64], readaround_npages=8, cluster_max_npages=4
    )
    with vm:
        obj = vm.allocate(16 * PAGE)
        for p in range(16):
            obj.write(p * PAGE, page_bytes(p))
        vm.pageout()
        where = blocks(vm, obj)
        devices = {p: vm.space.locate(b)[0].name for p, b in where.items()}
        # Round-robin placement: each cluster on one device, neighbours on the other.
        for p in range(16):
            got = fault(vm, obj, p) | {p}
            assert len({devices[q] for q in got}) == 1, (p, got)
            vm.pageout()
        vm.check()


def test_no_readaround_when_frames_are_short() -> None:
    vm, _ = small_vm(
        reference=True, nframes=16, swap_nblocks=64, readaround_npages=8, cluster_max_npages=4
    )
    with vm:
        obj = vm.allocate(16 * PAGE)
        for p in range(16):
            obj.write(p * PAGE, page_bytes(p))
        vm.pageout()
        other = vm.allocate(16 * PAGE)
        # Fill memory down to the daemon's minimum: read-around may not dig below it.
        p = 0
        while vm.statistics().free_nframes > vm.free_min_nframes:
            other.write(p * PAGE, b"x")
            p += 1
        got = fault(vm, obj, 8)
        assert got == {8}
        vm.check()
