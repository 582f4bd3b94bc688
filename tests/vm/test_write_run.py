"""A write of whole new pages takes its run at once (``fault.hold_new_run``,
``Kernel.fault_stream_run``) against the page-by-page path: the same program on
two VMs, one with runs switched off (``kernel.RUN_MAX_NPAGES = 1``), must read
the same data, raise the same errors and end in the same state."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmpager.errors import SwapExhausted
from vmpager.testing.worlds import PAGE, small_vm
from vmpager.vm import kernel as kernel_module
from vmpager.vm.page import QUEUE_INACTIVE

pytestmark = pytest.mark.timeout(300)

NPAGES = 24


def _data(seed: int, nbytes: int) -> bytes:
    word = (seed * 2654435761 + 1) & 0xFFFFFFFF
    return (word.to_bytes(4, "little") * (nbytes // 4 + 1))[:nbytes]


OPS = st.lists(
    st.tuples(
        st.sampled_from(["write", "write", "write", "edge", "read", "discard", "clone", "reserve"]),
        st.integers(0, NPAGES - 1),
        st.integers(1, 12),
        st.integers(0, 1 << 16),
    ),
    min_size=1,
    max_size=25,
)


def _run(program: list[tuple[str, int, int, int]], run_max: int, **config: Any) -> list[Any]:
    """Run ``program`` with ``RUN_MAX_NPAGES = run_max``; what it observed, in order."""
    saved = kernel_module.RUN_MAX_NPAGES
    kernel_module.RUN_MAX_NPAGES = run_max
    try:
        vm, _ = small_vm(nframes=8, swap_nblocks=40, **config)
        seen: list[Any] = []
        with vm:
            # The last page ends inside the object: its write is not "whole".
            obj = vm.allocate(NPAGES * PAGE - 100)
            objs = [obj]
            for op, pindex, npages, seed in program:
                target = objs[seed % len(objs)]
                end = min(pindex + npages, NPAGES)
                try:
                    if op == "write":
                        offset = pindex * PAGE
                        length = min((end - pindex) * PAGE, target.size - offset)
                        target.write(offset, _data(seed, length))
                    elif op == "edge":  # starts inside a page, ends inside another
                        offset = pindex * PAGE + 1 + seed % (PAGE - 1)
                        length = min(npages * PAGE, target.size - offset)
                        target.write(offset, _data(seed, length))
                    elif op == "read":
                        seen.append(target.read(pindex * PAGE, (end - pindex) * PAGE - 100))
                    elif op == "discard":
                        target.discard(pindex * PAGE, (end - pindex) * PAGE - 100)
                    elif op == "clone" and len(objs) < 3:
                        objs.append(target.clone())
                    elif op == "reserve" and target is obj:
                        target.reserve(pindex * PAGE, (end - pindex) * PAGE - 100)
                    seen.append("ok")
                except SwapExhausted:
                    seen.append("exhausted")
                vm.check()
            kernel = vm.kernel
            for o in objs:
                seen.append(sorted((p.pindex, p.dirty, p.queue, p.frame) for p in o.pages.values()))
                seen.append((o.readahead_next, o.readahead_npages))
            stats = vm.statistics()
            seen.append((kernel.ndirty, stats.faults, stats.zero_fills, stats.pageouts))
            for o in objs:
                seen.append(o.read(0, o.size))
        return seen
    finally:
        kernel_module.RUN_MAX_NPAGES = saved


@settings(max_examples=60, deadline=None)
@given(OPS)
def test_runs_match_page_by_page(program: list[tuple[str, int, int, int]]) -> None:
    assert _run(program, 256) == _run(program, 1)


@settings(max_examples=40, deadline=None)
@given(OPS)
def test_runs_match_page_by_page_with_streams_leaving_pages_behind(
    program: list[tuple[str, int, int, int]],
) -> None:
    # A small window: streams reach full speed and leave pages behind, which the
    # run hands to the inactive queue in one order (ascending) and the per-page
    # path in another, so the pageouts may differ: compare the data alone.
    def data(seen: list[Any]) -> list[Any]:
        return [x for x in seen if isinstance(x, (bytes, str))]

    config = {"readaround_npages": 1, "readahead_max_npages": 2}
    assert data(_run(program, 256, **config)) == data(_run(program, 1, **config))


def test_stream_run_leaves_behind_the_same_pages() -> None:
    """``fault_stream_run`` against ``fault_stream`` + ``fault_done`` page by page,
    over streams that continue from one run to the next and streams that jump."""
    segments = [(0, 3), (3, 17), (20, 1), (21, 9), (35, 20), (55, 9)]
    for ramp, maximum in [(1, 4), (8, 4), (2, 8), (0, 0), (1, 1), (8, 128)]:
        outcomes = []
        for run in (False, True):
            vm, _ = small_vm(nframes=80, readaround_npages=ramp, readahead_max_npages=maximum)
            with vm:
                obj = vm.allocate(64 * PAGE)
                obj.write(0, bytes(64 * PAGE))  # every page resident
                kernel = vm.kernel
                with kernel.cond:
                    for page in obj.pages.values():
                        kernel.queues.activate(page)
                    obj.readahead_next = obj.readahead_npages = 0
                    for start, count in segments:
                        if run:
                            kernel.fault_stream_run(obj, start, count)
                        else:
                            for pindex in range(start, start + count):
                                kernel.fault_stream(obj, pindex)
                                kernel.fault_done(obj, pindex, 1)
                        behind = sorted(
                            p.pindex for p in obj.pages.values() if p.queue == QUEUE_INACTIVE
                        )
                        outcomes.append((behind, obj.readahead_next, obj.readahead_npages))
        half = len(outcomes) // 2
        assert outcomes[:half] == outcomes[half:], (ramp, maximum)
        assert any(behind for behind, _, _ in outcomes) == (0 < maximum < 64)


def test_no_frame_mid_run_keeps_the_pages_written_before() -> None:
    """A run that outgrows memory and swap raises SwapExhausted with what it wrote
    before still readable (the run took the free frames, the next page waited)."""
    vm, _ = small_vm(nframes=8, swap_nblocks=8)
    with vm:
        obj = vm.allocate(32 * PAGE)
        data = _data(7, 32 * PAGE)
        with pytest.raises(SwapExhausted):
            obj.write(0, data)
        written = [p for p in range(32) if p in obj.pages or vm.data_map(obj, p, 1)[0]]
        assert written == list(range(len(written))) and len(written) >= 8
        for p in written:
            assert obj.read(p * PAGE, PAGE) == data[p * PAGE : (p + 1) * PAGE], p
        vm.check()
