"""Model-based test of SwapMeta against a dict {(oid, pindex): blk}.

The model also keeps the books of every block handed out: each one is at any
moment exactly one of assigned (in the model), held by the caller (popped),
or freed through the callback. A block freed twice, or freed while the model
says it is still assigned, fails at once. Every operation's frees are compared
with the frees the model predicts, and range operations must return runs of
consecutive blocks in single calls.
"""

from __future__ import annotations

import numpy as np
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
)

from vmpager.swap import meta as meta_module
from vmpager.swap.meta import SWAPBLK_NONE, SwapMeta

OIDS = st.sampled_from([0, 1, 7])
#: Mostly a few chunks' worth of pages, sometimes far away (other leaves).
PINDEXES = st.one_of(
    st.integers(0, 200),
    st.integers(2**40, 2**40 + 40),
    st.just(2**63 - 1),
)
STARTS = st.one_of(st.integers(0, 200), st.just(2**40))
LENGTHS = st.one_of(st.integers(0, 300), st.just(2**41))


class SwapMetaMachine(RuleBasedStateMachine):
    """Default thresholds: each run mixes the chunk loops and whole-object paths."""

    thresholds: dict[str, int] = {}  # noqa: RUF012 - overridden per subclass

    def __init__(self) -> None:
        super().__init__()
        self.saved = {name: getattr(meta_module, name) for name in self.thresholds}
        for name, value in self.thresholds.items():
            setattr(meta_module, name, value)
        self.meta = SwapMeta(self.on_free)
        self.model: dict[tuple[int, int], int] = {}
        self.freed: set[int] = set()
        self.held: set[int] = set()
        self.handed_out: set[int] = set()
        self.next_blk = 0
        self.calls: list[tuple[int, int]] = []

    def teardown(self) -> None:
        for name, value in self.saved.items():
            setattr(meta_module, name, value)

    # -- the allocator side -------------------------------------------------

    def on_free(self, blk: int, count: int) -> None:
        assert isinstance(blk, int) and isinstance(count, int), (blk, count)
        assert count >= 1, count
        for b in range(blk, blk + count):
            assert b in self.handed_out, f"freed block {b} was never handed out"
            assert b not in self.freed, f"block {b} freed twice"
            assert b not in self.held, f"block {b} freed while the caller holds it"
            self.freed.add(b)
        self.calls.append((blk, count))

    def fresh(self, n: int, far: bool) -> list[int]:
        if far:
            # Past 2**31: forces the 64-bit block storage.
            self.next_blk = max(self.next_blk, 2**31 + 5)
        blks = list(range(self.next_blk, self.next_blk + n))
        self.next_blk += n + 1  # a gap, so runs from different calls stay apart
        self.handed_out.update(blks)
        return blks

    def expect_freed(self, expected: list[int], *, coalesced: bool) -> None:
        got = sorted(b for blk, count in self.calls for b in range(blk, blk + count))
        assert got == sorted(expected), (got, sorted(expected))
        if coalesced:
            ends = {blk + count for blk, count in self.calls}
            for blk, _count in self.calls:
                assert blk not in ends, f"run starting at {blk} was not coalesced: {self.calls}"
        self.calls.clear()

    # -- rules ----------------------------------------------------------------

    @rule(oid=OIDS, pindex=PINDEXES, far=st.booleans(), reuse=st.booleans())
    def build(self, oid: int, pindex: int, far: bool, reuse: bool) -> None:
        if reuse and self.freed:
            blk = min(self.freed)
            self.freed.discard(blk)
        else:
            (blk,) = self.fresh(1, far)
        old = self.model.get((oid, pindex))
        self.meta.build(oid, pindex, blk)
        self.model[(oid, pindex)] = blk
        self.expect_freed([] if old is None else [old], coalesced=False)

    @rule(oid=OIDS, start=st.integers(0, 200), n=st.integers(1, 70), far=st.booleans())
    def build_run(self, oid: int, start: int, n: int, far: bool) -> None:
        olds = []
        for pindex, blk in zip(range(start, start + n), self.fresh(n, far), strict=True):
            old = self.model.get((oid, pindex))
            if old is not None:
                olds.append(old)
            self.meta.build(oid, pindex, blk)
            self.model[(oid, pindex)] = blk
        self.expect_freed(olds, coalesced=False)

    @rule(
        oid=OIDS,
        start=st.one_of(st.integers(0, 200), st.integers(2**40 - 20, 2**40 + 40)),
        n=st.integers(0, 70),
        far=st.booleans(),
    )
    def build_run_at_once(self, oid: int, start: int, n: int, far: bool) -> None:
        """``build_run``: the same end state and frees as ``build`` page by page, the
        old blocks given back in runs."""
        blks = self.fresh(n, far)
        olds = [self.model[(oid, p)] for p in range(start, start + n) if (oid, p) in self.model]
        self.meta.build_run(oid, start, blks[0] if blks else 0, n)
        for pindex, blk in zip(range(start, start + n), blks, strict=True):
            self.model[(oid, pindex)] = blk
        self.expect_freed(olds, coalesced=True)

    @precondition(lambda self: self.model)
    @rule(data=st.data(), before=st.integers(0, 20), after=st.integers(0, 20))
    def build_run_same_block_is_refused(self, data: st.DataObject, before: int, after: int) -> None:
        """A run that would give one page the block it has changes nothing."""
        (oid, pindex), blk = data.draw(st.sampled_from(sorted(self.model.items())))
        before = min(before, pindex, blk)
        after = min(after, 2**63 - 1 - pindex)
        try:
            self.meta.build_run(oid, pindex - before, blk - before, before + 1 + after)
        except ValueError as exc:
            assert "blk" in str(exc)
        else:
            raise AssertionError("building the block a page already has was accepted")
        self.expect_freed([], coalesced=False)

    @precondition(lambda self: self.held)
    @rule(oid=OIDS, pindex=PINDEXES)
    def build_held(self, oid: int, pindex: int) -> None:
        blk = min(self.held)
        self.held.discard(blk)
        old = self.model.get((oid, pindex))
        self.meta.build(oid, pindex, blk)
        self.model[(oid, pindex)] = blk
        self.expect_freed([] if old is None else [old], coalesced=False)

    @precondition(lambda self: self.held)
    @rule()
    def caller_frees_held(self) -> None:
        blk = min(self.held)
        self.held.discard(blk)
        self.freed.add(blk)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def build_same_block_is_refused(self, data: st.DataObject) -> None:
        (oid, pindex), blk = data.draw(st.sampled_from(sorted(self.model.items())))
        try:
            self.meta.build(oid, pindex, blk)
        except ValueError as exc:
            assert "blk" in str(exc)
        else:
            raise AssertionError("building the block a page already has was accepted")
        self.expect_freed([], coalesced=False)

    @rule(oid=OIDS, pindex=PINDEXES)
    def build_none(self, oid: int, pindex: int) -> None:
        old = self.model.pop((oid, pindex), None)
        self.meta.build(oid, pindex, SWAPBLK_NONE)
        self.expect_freed([] if old is None else [old], coalesced=False)

    @rule(oid=OIDS, pindex=PINDEXES)
    def lookup(self, oid: int, pindex: int) -> None:
        assert self.meta.lookup(oid, pindex) == self.model.get((oid, pindex), SWAPBLK_NONE)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def lookup_assigned(self, data: st.DataObject) -> None:
        (oid, pindex), blk = data.draw(st.sampled_from(sorted(self.model.items())))
        assert self.meta.lookup(oid, pindex) == blk

    @rule(oid=OIDS, pindex=PINDEXES)
    def pop(self, oid: int, pindex: int) -> None:
        expected = self.model.pop((oid, pindex), SWAPBLK_NONE)
        assert self.meta.pop(oid, pindex) == expected
        if expected != SWAPBLK_NONE:
            self.held.add(expected)
        self.expect_freed([], coalesced=False)

    @rule(oid=OIDS, pindex=PINDEXES)
    def free(self, oid: int, pindex: int) -> None:
        old = self.model.pop((oid, pindex), None)
        assert self.meta.free(oid, pindex) is (old is not None)
        self.expect_freed([] if old is None else [old], coalesced=False)

    @rule(oid=OIDS, start=STARTS, npages=LENGTHS)
    def free_range(self, oid: int, start: int, npages: int) -> None:
        gone = [key for key in self.model if key[0] == oid and start <= key[1] < start + npages]
        expected = [self.model.pop(key) for key in gone]
        assert self.meta.free_range(oid, start, npages) == len(expected)
        self.expect_freed(expected, coalesced=True)

    @rule(oid=OIDS)
    def free_all(self, oid: int) -> None:
        gone = [key for key in self.model if key[0] == oid]
        expected = [self.model.pop(key) for key in gone]
        assert self.meta.free_all(oid) == len(expected)
        self.expect_freed(expected, coalesced=True)

    @rule(
        src=OIDS,
        dst=OIDS,
        offset=st.integers(0, 60),
        dst_npages=st.one_of(st.integers(0, 250), st.just(2**62)),
        resident=st.frozensets(st.integers(0, 250), max_size=40),
    )
    def transfer(
        self, src: int, dst: int, offset: int, dst_npages: int, resident: frozenset[int]
    ) -> None:
        if src == dst:
            try:
                self.meta.transfer(src, dst, offset, dst_npages, resident.__contains__)
            except ValueError as exc:
                assert "dst_oid" in str(exc)
            else:
                raise AssertionError("transfer into the same object was accepted")
            return
        expected_freed = []
        expected_asked = set()
        moved = {}
        for (oid, p), blk in sorted(self.model.items()):
            if oid != src:
                continue
            d = p - offset
            if not 0 <= d < dst_npages or (dst, d) in self.model:
                expected_freed.append(blk)
                continue
            expected_asked.add(d)
            if d in resident:
                expected_freed.append(blk)
            else:
                moved[(dst, d)] = blk
        asked: list[int] = []

        def dst_resident(d: int) -> bool:
            asked.append(d)
            return d in resident

        self.meta.transfer(src, dst, offset, dst_npages, dst_resident)
        assert sorted(asked) == sorted(expected_asked)
        for key in [key for key in self.model if key[0] == src]:
            del self.model[key]
        self.model.update(moved)
        self.expect_freed(expected_freed, coalesced=True)
        assert self.meta.count(src) == 0

    @rule(oid=OIDS, start=STARTS, npages=st.integers(0, 300))
    def lookup_range(self, oid: int, start: int, npages: int) -> None:
        got = self.meta.lookup_range(oid, start, npages)
        assert got.dtype == np.int64 and got.shape == (npages,)
        expected = [self.model.get((oid, p), SWAPBLK_NONE) for p in range(start, start + npages)]
        assert got.tolist() == expected

    # -- invariants -------------------------------------------------------

    @invariant()
    def structure_is_consistent(self) -> None:
        self.meta.check()

    @invariant()
    def matches_model(self) -> None:
        assert self.meta.total() == len(self.model)
        oids = sorted({oid for oid, _ in self.model})
        assert list(self.meta.objects()) == oids
        for oid in (0, 1, 7):
            expected = sorted((p, blk) for (o, p), blk in self.model.items() if o == oid)
            assert list(self.meta.pages(oid)) == expected
            assert self.meta.count(oid) == len(expected)
        everything = sorted((o, p, blk) for (o, p), blk in self.model.items())
        assert list(self.meta.items()) == everything
        arrays = self.meta.owner_arrays()
        columns = [[row[i] for row in everything] for i in range(3)]
        assert [a.tolist() for a in arrays] == columns
        stats = self.meta.statistics()
        assert stats.pages == len(self.model) and stats.objects == len(oids)

    @invariant()
    def every_block_is_accounted_for(self) -> None:
        assigned = set(self.model.values())
        assert len(assigned) == len(self.model), "model assigned one block twice"
        assert not assigned & self.freed and not assigned & self.held
        assert not self.freed & self.held
        assert assigned | self.freed | self.held == self.handed_out


class ChunkLoopMachine(SwapMetaMachine):
    """Range operations always walk chunk by chunk; coalescing in plain Python."""

    thresholds = {  # noqa: RUF012
        "_LOOP_MAX_CHUNKS": 10**12,
        "_LOOKUP_LOOP_MAX_CHUNKS": 10**12,
        "_BULK_FRACTION": 1,
        "_NUMPY_COALESCE_MIN": 10**12,
    }


class WholeObjectMachine(SwapMetaMachine):
    """Range operations always take the whole-object numpy paths."""

    thresholds = {  # noqa: RUF012
        "_LOOP_MAX_CHUNKS": 0,
        "_LOOKUP_LOOP_MAX_CHUNKS": 0,
        "_BULK_FRACTION": 10**12,
        "_NUMPY_COALESCE_MIN": 0,
    }


_SETTINGS = settings(
    max_examples=60, stateful_step_count=40, derandomize=True, database=None, deadline=None
)

TestSwapMeta = SwapMetaMachine.TestCase
TestSwapMeta.settings = _SETTINGS
TestSwapMetaChunkLoops = ChunkLoopMachine.TestCase
TestSwapMetaChunkLoops.settings = _SETTINGS
TestSwapMetaWholeObject = WholeObjectMachine.TestCase
TestSwapMetaWholeObject.settings = _SETTINGS
