"""The frame pool: single and bulk frees, double frees refused, reuse order, run views."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmpager.vm.frames import FramePool


def test_free_many_hands_frames_out_again_in_ascending_order() -> None:
    pool = FramePool(16, 4096)
    taken = [pool.alloc() for _ in range(16)]
    assert taken == list(range(16))
    pool.free_many([9, 3, 12, 4, 5])
    assert [pool.alloc() for _ in range(5)] == [3, 4, 5, 9, 12]
    assert pool.alloc() is None
    pool.check()


def test_free_many_refuses_a_double_free_and_frees_nothing() -> None:
    pool = FramePool(8, 4096)
    for _ in range(8):
        pool.alloc()
    pool.free(2)
    with pytest.raises(ValueError, match="frame 2 freed twice"):
        pool.free_many([5, 6, 2, 7])
    with pytest.raises(ValueError, match="frame 6 freed twice"):
        pool.free_many([5, 6, 6])
    assert pool.free_nframes == 1
    assert [pool.is_free(f) for f in range(8)] == [f == 2 for f in range(8)]
    pool.check()


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 31)), max_size=60))
def test_free_many_matches_free_one_by_one(ops: list[tuple[bool, int]]) -> None:
    """Against a model set of free frames: bulk frees free the same frames."""
    pool = FramePool(32, 4096)
    model = set(range(32))
    for bulk, n in ops:
        if bulk:
            held = sorted(set(range(32)) - model)[:n]
            pool.free_many(held[::-1])
            model.update(held)
        else:
            for _ in range(n):
                frame = pool.alloc()
                if frame is None:
                    assert not model
                    break
                assert frame in model
                model.discard(frame)
        assert pool.free_nframes == len(model)
        assert {f for f in range(32) if pool.is_free(f)} == model
        pool.check()


@given(st.lists(st.integers(0, 15), min_size=1, max_size=40))
def test_run_views_are_the_frames_in_order_one_view_per_run(frames: list[int]) -> None:
    """The views cover exactly the listed frames' bytes in order, one view per
    run of consecutive frame numbers, and write through to the arena."""
    pool = FramePool(16, 512)
    for f in range(16):
        pool.array[f].fill(f)
    views = pool.run_views(frames)
    breaks = sum(1 for a, b in itertools.pairwise(frames) if b != a + 1)
    assert len(views) == breaks + 1
    joined = b"".join(bytes(v) for v in views)
    assert joined == b"".join(bytes([f]) * 512 for f in frames)
    views[0][:1] = b"\xff"
    assert pool.array[frames[0]][0] == 0xFF
