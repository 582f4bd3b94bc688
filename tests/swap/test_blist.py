"""Tests of the radix-tree bitmap allocator (vmpager.swap.blist).

The state machine drives a Blist and a plain model -- the set of free blocks
plus the cursor -- side by side. The model computes FreeBSD's placement
directly (address-ordered first fit from the cursor, retried once from block
0, extended up to maxcount), so every allocation's position is checked
exactly. Several tree geometries are run so that multi-level trees, runs that
span leaves and hint updates are all exercised with small block counts.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

from vmpager.errors import InvariantViolation
from vmpager.swap import blist as blist_module
from vmpager.swap.blist import Blist, BlistStatistics, GapHistogram


class FreeSetModel:
    """The blist's specification: a set of free blocks, a cursor and a size."""

    def __init__(self, nblocks: int) -> None:
        self.nblocks = nblocks
        self.free = set(range(nblocks))
        self.cursor = 0

    def runs(self) -> list[tuple[int, int]]:
        """Maximal free runs as (start, end) pairs, in address order."""
        runs: list[tuple[int, int]] = []
        for blk in sorted(self.free):
            if runs and runs[-1][1] == blk:
                runs[-1] = (runs[-1][0], blk + 1)
            else:
                runs.append((blk, blk + 1))
        return runs

    def first_fit(self, start: int, count: int) -> int | None:
        for run_start, run_end in self.runs():
            candidate = max(run_start, start)
            if run_end - candidate >= count:
                return candidate
        return None

    def run_length(self, blk: int, limit: int) -> int:
        length = 0
        while length < limit and blk + length in self.free:
            length += 1
        return length

    def alloc(self, count: int, maxcount: int | None) -> tuple[int, int] | None:
        maxcount = count if maxcount is None else maxcount
        blk = self.first_fit(self.cursor, count)
        if blk is None and self.cursor:
            blk = self.first_fit(0, count)
        if blk is None:
            return None
        taken = self.run_length(blk, maxcount)
        self.free -= set(range(blk, blk + taken))
        self.cursor = 0 if blk + taken == self.nblocks else blk + taken
        return blk, taken

    def allocated(self) -> list[int]:
        return sorted(set(range(self.nblocks)) - self.free)


def snapshot(bl: Blist) -> tuple[int, int, int, tuple[tuple[int, int], ...]]:
    return bl.nblocks, bl.avail(), bl.cursor, tuple(bl.free_runs())


class BlistMachine(RuleBasedStateMachine):
    """Blist against FreeSetModel; subclasses choose the geometry and sizes."""

    leaf_bits = 4
    fanout = 2
    max_nblocks = 160
    max_count = 24

    def __init__(self) -> None:
        super().__init__()
        self.blist = Blist(1, leaf_bits=self.leaf_bits, fanout=self.fanout)
        self.model = FreeSetModel(1)

    @initialize(data=st.data())
    def create(self, data: st.DataObject) -> None:
        nblocks = data.draw(st.integers(1, self.max_nblocks), label="nblocks")
        self.blist = Blist(nblocks, leaf_bits=self.leaf_bits, fanout=self.fanout)
        self.model = FreeSetModel(nblocks)

    def draw_count(self, data: st.DataObject) -> int:
        small = st.integers(1, self.max_count)
        large = st.integers(1, self.model.nblocks + 2)
        return data.draw(st.one_of(small, small, large), label="count")

    @rule(data=st.data())
    def alloc(self, data: st.DataObject) -> None:
        count = self.draw_count(data)
        maxcount = data.draw(
            st.one_of(st.none(), st.just(count), st.integers(count, count + 3 * self.leaf_bits)),
            label="maxcount",
        )
        expected = self.model.alloc(count, maxcount)
        assert self.blist.alloc(count, maxcount) == expected

    @rule(data=st.data())
    def alloc_many(self, data: st.DataObject) -> None:
        """Several small allocations, to reach full and fragmented states quickly."""
        for _ in range(data.draw(st.integers(1, 8), label="nallocs")):
            count = data.draw(st.integers(1, 6), label="count")
            assert self.blist.alloc(count) == self.model.alloc(count, None)

    @rule(data=st.data())
    def free_allocated(self, data: st.DataObject) -> None:
        allocated = self.model.allocated()
        if not allocated:
            return
        blk = allocated[data.draw(st.integers(0, len(allocated) - 1), label="index")]
        length = 1
        while blk + length < self.model.nblocks and blk + length not in self.model.free:
            length += 1
        count = data.draw(st.integers(1, length), label="count")
        self.blist.free(blk, count)
        self.model.free |= set(range(blk, blk + count))

    @rule(data=st.data())
    def free_invalid(self, data: st.DataObject) -> None:
        """A double free or a range outside the space is refused and changes nothing."""
        nblocks = self.model.nblocks
        before = snapshot(self.blist)
        if self.model.free and data.draw(st.booleans(), label="double"):
            blk = data.draw(st.sampled_from(sorted(self.model.free)), label="free block")
            start = data.draw(st.integers(0, blk), label="start")
            count = data.draw(st.integers(blk - start + 1, nblocks - start), label="count")
        else:
            start = data.draw(st.integers(-2, nblocks + 2), label="start")
            if 0 <= start < nblocks:
                count = data.draw(
                    st.one_of(st.integers(-2, 0), st.integers(nblocks - start + 1, nblocks + 5)),
                    label="count",
                )
            else:
                count = data.draw(st.integers(1, 4), label="count")
        with pytest.raises(ValueError):
            self.blist.free(start, count)
        assert snapshot(self.blist) == before

    @rule(data=st.data())
    def fill(self, data: st.DataObject) -> None:
        nblocks = self.model.nblocks
        blk = data.draw(st.integers(0, nblocks - 1), label="blk")
        count = data.draw(st.integers(1, min(nblocks - blk, 3 * self.leaf_bits)), label="count")
        blocks = set(range(blk, blk + count))
        expected = len(blocks & self.model.free)
        self.model.free -= blocks
        assert self.blist.fill(blk, count) == expected

    @rule(data=st.data())
    def fill_invalid(self, data: st.DataObject) -> None:
        nblocks = self.model.nblocks
        before = snapshot(self.blist)
        blk = data.draw(st.integers(0, nblocks - 1), label="blk")
        count = data.draw(st.integers(nblocks - blk + 1, nblocks + 3), label="count")
        with pytest.raises(ValueError):
            self.blist.fill(blk, count)
        assert snapshot(self.blist) == before

    @rule(data=st.data())
    def resize(self, data: st.DataObject) -> None:
        old = self.model.nblocks
        nblocks = data.draw(st.integers(1, self.max_nblocks), label="nblocks")
        free_new = data.draw(st.booleans(), label="free_new")
        if nblocks < old and any(b not in self.model.free for b in range(nblocks, old)):
            before = snapshot(self.blist)
            with pytest.raises(ValueError):
                self.blist.resize(nblocks, free_new)
            assert snapshot(self.blist) == before
            return
        self.blist.resize(nblocks, free_new)
        if nblocks < old:
            self.model.free -= set(range(nblocks, old))
        elif free_new:
            self.model.free |= set(range(old, nblocks))
        self.model.nblocks = nblocks
        self.model.cursor = 0

    @rule()
    def histogram(self) -> None:
        hist = self.blist.gap_histogram()
        lengths = [end - start for start, end in self.model.runs()]
        assert hist.nruns == len(lengths)
        assert hist.free_blocks == sum(lengths)
        assert hist.longest == max(lengths, default=0)
        assert sum(n for _, _, n in hist.buckets) == len(lengths)
        for lo, hi, n in hist.buckets:
            assert n == sum(1 for length in lengths if lo <= length <= hi)

    @invariant()
    def agrees_with_model(self) -> None:
        self.blist.check()
        assert self.blist.nblocks == self.model.nblocks
        assert self.blist.avail() == len(self.model.free)
        assert self.blist.cursor == self.model.cursor
        assert list(self.blist.free_runs()) == [(s, e - s) for s, e in self.model.runs()]


_SETTINGS = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


class TinyLeaves(BlistMachine):
    """4-block leaves, fan-out 2: deep trees from a few dozen blocks."""


class SmallLeaves(BlistMachine):
    leaf_bits = 8
    fanout = 4
    max_nblocks = 300


class WideLeaves(BlistMachine):
    leaf_bits = 64
    fanout = 4
    max_nblocks = 1200
    max_count = 80


class DefaultGeometry(BlistMachine):
    leaf_bits = blist_module.DEFAULT_LEAF_BITS
    fanout = blist_module.DEFAULT_FANOUT
    max_nblocks = 2600
    max_count = 40


TestTinyLeaves = TinyLeaves.TestCase
TestTinyLeaves.settings = _SETTINGS
TestSmallLeaves = SmallLeaves.TestCase
TestSmallLeaves.settings = _SETTINGS
TestWideLeaves = WideLeaves.TestCase
TestWideLeaves.settings = _SETTINGS
TestDefaultGeometry = DefaultGeometry.TestCase
TestDefaultGeometry.settings = settings(_SETTINGS, max_examples=30)


# ----------------------------------------------------------------------
# unit tests


def test_new_blist_is_all_free() -> None:
    for nblocks in (1, 5, 1023, 1024, 1025, 70_000):
        bl = Blist(nblocks)
        bl.check()
        assert bl.nblocks == nblocks
        assert bl.avail() == nblocks
        assert list(bl.free_runs()) == [(0, nblocks)]


@pytest.mark.parametrize("nblocks", [0, -1, blist_module.MAX_NBLOCKS + 1])
def test_bad_sizes_are_refused(nblocks: int) -> None:
    with pytest.raises(ValueError, match="nblocks"):
        Blist(nblocks)


@pytest.mark.parametrize("value", [1.0, "8", True, None])
def test_non_int_sizes_are_refused(value: object) -> None:
    with pytest.raises(TypeError, match="nblocks"):
        Blist(value)  # type: ignore[arg-type]


@pytest.mark.parametrize(("leaf_bits", "fanout"), [(3, 2), (8, 3), (1, 2), (8, 1)])
def test_bad_geometry_is_refused(leaf_bits: int, fanout: int) -> None:
    with pytest.raises(ValueError):
        Blist(100, leaf_bits=leaf_bits, fanout=fanout)


def test_allocations_follow_the_cursor_and_wrap() -> None:
    bl = Blist(10)
    assert bl.alloc(3) == (0, 3)
    assert bl.alloc(3) == (3, 3)
    bl.free(0, 3)
    # First fit from the cursor (6), not from block 0.
    assert bl.alloc(2) == (6, 2)
    # The run ends at the end of the space: the cursor goes back to 0.
    assert bl.alloc(2) == (8, 2)
    assert bl.cursor == 0
    assert bl.alloc(1) == (0, 1)
    bl.check()


def test_search_retries_once_from_block_zero() -> None:
    bl = Blist(20)
    assert bl.alloc(12) == (0, 12)
    assert bl.alloc(6) == (12, 6)
    bl.free(0, 5)
    # From the cursor (18) only 2 blocks are free; the retry finds block 0.
    assert bl.alloc(4) == (0, 4)
    assert bl.statistics().alloc_retries == 1
    assert bl.alloc(3) is None
    assert bl.statistics().alloc_failures == 1
    bl.check()


def test_alloc_returns_none_only_without_a_long_enough_run() -> None:
    bl = Blist(100, leaf_bits=8, fanout=2)
    for blk in range(0, 100, 10):
        bl.fill(blk, 1)
    assert bl.alloc(10) is None
    assert bl.alloc(101) is None
    assert bl.alloc(9) == (1, 9)
    bl.check()


def test_maxcount_takes_what_is_free_at_the_found_place() -> None:
    bl = Blist(64, leaf_bits=8, fanout=2)
    bl.fill(5, 1)
    bl.fill(30, 1)
    # Needs 3; the first fit is block 0, where 5 blocks are free.
    assert bl.alloc(3, 50) == (0, 5)
    # From the cursor (5 is taken) the run at 6 spans leaves up to block 29.
    assert bl.alloc(1, 100) == (6, 24)
    # maxcount caps the run.
    assert bl.alloc(2, 7) == (31, 7)
    assert bl.cursor == 38
    bl.check()


def test_alloc_spanning_leaves_in_the_default_geometry() -> None:
    bl = Blist(5000)
    bl.fill(0, 1020)
    assert bl.alloc(10) == (1020, 10)
    bl.fill(2040, 8)
    assert bl.alloc(3000) is None
    assert bl.alloc(2900) == (2048, 2900)
    bl.check()


@pytest.mark.parametrize(("count", "maxcount"), [(0, None), (-1, None), (2, 1), (1, 0)])
def test_bad_alloc_arguments_are_refused(count: int, maxcount: int | None) -> None:
    bl = Blist(10)
    with pytest.raises(ValueError):
        bl.alloc(count, maxcount)
    assert bl.avail() == 10


def test_alloc_type_errors() -> None:
    bl = Blist(10)
    with pytest.raises(TypeError):
        bl.alloc(1.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        bl.alloc(1, 2.0)  # type: ignore[arg-type]
    assert bl.avail() == 10


def test_double_free_and_bad_ranges_change_nothing() -> None:
    bl = Blist(3000)
    assert bl.alloc(2500) == (0, 2500)
    bl.free(1500, 10)
    before = snapshot(bl)
    for blk, count in [(1490, 20), (1505, 1), (2400, 200), (-1, 1), (2999, 2), (0, 0), (3000, 1)]:
        with pytest.raises(ValueError):
            bl.free(blk, count)
        assert snapshot(bl) == before
    with pytest.raises(ValueError, match="double free: block 1500"):
        bl.free(1000, 600)
    bl.check()


def test_fill_counts_newly_taken_blocks() -> None:
    bl = Blist(300, leaf_bits=8, fanout=4)
    assert bl.alloc(10) == (0, 10)
    assert bl.fill(5, 20) == 15
    assert bl.fill(5, 20) == 0
    assert bl.avail() == 300 - 25
    assert bl.cursor == 10  # fill does not move the cursor
    bl.free(5, 20)
    assert bl.avail() == 300 - 5
    bl.check()


def test_resize_grows_and_shrinks() -> None:
    bl = Blist(1000)
    assert bl.alloc(10) == (0, 10)
    bl.resize(5000)
    assert (bl.nblocks, bl.avail(), bl.cursor) == (5000, 4990, 0)
    bl.check()
    bl.resize(7000, free_new=False)
    assert bl.avail() == 4990
    assert not bl.is_free(6999)
    bl.check()
    with pytest.raises(ValueError, match="block 5000"):
        bl.resize(4000)
    assert bl.nblocks == 7000
    bl.free(5000, 2000)
    bl.resize(11)
    assert (bl.nblocks, bl.avail()) == (11, 1)
    assert bl.alloc(1) == (10, 1)
    assert bl.alloc(1) is None
    bl.check()


def test_gap_histogram_uses_fibonacci_size_classes() -> None:
    bl = Blist(200, leaf_bits=8, fanout=2)
    bl.fill(0, 200)
    # Free runs of 1, 2, 4, 4, 7 and 40 blocks.
    for start, length in [(1, 1), (5, 2), (10, 4), (20, 4), (30, 7), (100, 40)]:
        bl.free(start, length)
    hist = bl.gap_histogram()
    assert isinstance(hist, GapHistogram)
    assert (hist.nruns, hist.free_blocks, hist.longest) == (6, 58, 40)
    assert hist.average == 58 // 6
    assert hist.buckets == ((1, 1, 1), (2, 2, 1), (3, 4, 2), (5, 7, 1), (34, 40, 1))
    text = hist.format()
    assert "largest free range: 40" in text
    assert "3 to 4" in text
    with pytest.raises(dataclasses.FrozenInstanceError):
        hist.nruns = 0  # type: ignore[misc]


def test_statistics_count_calls_and_blocks() -> None:
    bl = Blist(100)
    bl.alloc(10)
    bl.alloc(5, 8)
    bl.free(0, 4)
    bl.fill(50, 10)
    stats = bl.statistics()
    assert isinstance(stats, BlistStatistics)
    assert stats.alloc_calls == 2
    assert stats.free_calls == 1
    assert (stats.fill_calls, stats.blocks_filled) == (1, 10)
    assert stats.free_blocks == bl.avail() == 100 - 18 + 4 - 10
    assert stats.used_blocks == 100 - stats.free_blocks
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.nblocks = 1  # type: ignore[misc]


def test_failed_searches_lower_hints_and_frees_raise_them() -> None:
    bl = Blist(64 * 64, leaf_bits=64, fanout=4)
    # Every 8th block taken: no run longer than 7 anywhere.
    for blk in range(7, bl.nblocks, 8):
        bl.fill(blk, 1)
    assert bl.alloc(8) is None
    hints = bl._hints
    assert all(h == 7 for h in hints[-1])  # the root remembers the failure
    bl.check()
    bl.free(7, 1)
    assert hints[-1][0] > 8
    assert bl.alloc(8) == (0, 8)
    bl.check()


def test_check_reports_corruption() -> None:
    def corrupted(how: str) -> Blist:
        bl = Blist(3000, leaf_bits=64, fanout=4)
        bl.alloc(100)
        bl.fill(500, 2)
        if how == "avail":
            bl._avail += 1
        elif how == "past end":
            bl._leaves[-1] |= 1 << 63
        elif how == "bitmap":
            bl._nonempty[1][0] ^= 1
        elif how == "hint":
            # A bounded hint below a free run that starts in the leaf.
            bl._hints[0][3] = 5
        elif how == "cursor":
            bl._cursor = 3000
        return bl

    for how in ("avail", "past end", "bitmap", "hint", "cursor"):
        with pytest.raises(InvariantViolation):
            corrupted(how).check()


def test_sparse_blist_of_2_to_the_32_blocks() -> None:
    nblocks = 1 << 32
    bl = Blist(nblocks)
    assert bl.avail() == nblocks
    assert bl.alloc(10) == (0, 10)
    assert bl.alloc(5, 100) == (10, 100)
    # Reserve the last blocks, then allocate so the cursor reaches the top.
    end = nblocks - 5000
    assert bl.fill(end, 5000) == 5000
    assert bl.fill(110, end - 110 - 64) == end - 110 - 64
    assert bl.alloc(64) == (end - 64, 64)
    assert bl.cursor == end
    # Nothing is free above the cursor: the search restarts from block 0.
    bl.free(3, 4)
    assert bl.alloc(4) == (3, 4)
    assert bl.alloc(1) is None
    bl.free(1 << 31, 1 << 20)
    assert bl.alloc(1 << 20) == (1 << 31, 1 << 20)
    bl.free(nblocks - 100, 100)
    assert bl.alloc(100) == (nblocks - 100, 100)
    assert bl.cursor == 0
    assert bl.avail() == 0
    bl.free(nblocks - 3000, 3000)
    hist = bl.gap_histogram()
    assert (hist.nruns, hist.longest) == (1, 3000)
    with pytest.raises(ValueError):
        bl.resize(nblocks - 4000)
    bl.resize(nblocks - 3000)
    assert bl.avail() == 0
    bl.check()


def test_random_traffic_matches_the_model_in_a_deep_tree() -> None:
    """A longer fixed-seed run than the state machine takes, on a 5-level tree."""
    rng = random.Random(7)
    bl = Blist(2000, leaf_bits=8, fanout=4)
    model = FreeSetModel(2000)
    live: list[tuple[int, int]] = []
    for step in range(3000):
        if rng.random() < 0.55:
            count = rng.randint(1, 40)
            maxcount = rng.choice([None, count + rng.randint(0, 30)])
            got = bl.alloc(count, maxcount)
            assert got == model.alloc(count, maxcount), step
            if got is not None:
                live.append(got)
        elif live:
            blk, count = live.pop(rng.randrange(len(live)))
            bl.free(blk, count)
            model.free |= set(range(blk, blk + count))
        if step % 100 == 0:
            bl.check()
            assert list(bl.free_runs()) == [(s, e - s) for s, e in model.runs()]
    bl.check()
