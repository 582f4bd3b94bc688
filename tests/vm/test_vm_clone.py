"""Copy-on-write clones, collapse, and swap reservation."""

from __future__ import annotations

import random

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from vmpager import SwapExhausted
from vmpager.testing.worlds import PAGE, small_vm
from vmpager.vm.object import VMObject


def fill(obj: VMObject, tag: int) -> bytes:
    data = bytes((tag + i) % 251 for i in range(obj.size))
    obj.write(0, data)
    return data


def test_clone_isolates_both_sides() -> None:
    vm, _ = small_vm(nframes=6, swap_nblocks=128)
    with vm:
        a = vm.allocate(12 * PAGE)
        base = fill(a, 1)
        b = a.clone()
        assert b.read(0, b.size) == base
        a.write(PAGE, b"A" * 10)
        b.write(2 * PAGE, b"B" * 10)
        expect_a = bytearray(base)
        expect_a[PAGE : PAGE + 10] = b"A" * 10
        expect_b = bytearray(base)
        expect_b[2 * PAGE : 2 * PAGE + 10] = b"B" * 10
        assert a.read(0, a.size) == bytes(expect_a)
        assert b.read(0, b.size) == bytes(expect_b)
        vm.check()
        assert vm.statistics().cow_copies >= 2


def test_closing_either_side_collapses_and_keeps_the_other() -> None:
    for close_original in (True, False):
        vm, _ = small_vm(nframes=6, swap_nblocks=128)
        with vm:
            a = vm.allocate(10 * PAGE)
            base = fill(a, 3)
            b = a.clone()
            b.write(0, b"b")
            a.write(PAGE, b"a")
            keep, gone = (b, a) if close_original else (a, b)
            expect = bytearray(base)
            if keep is b:
                expect[0:1] = b"b"
            else:
                expect[PAGE : PAGE + 1] = b"a"
            gone.close()
            vm.check()
            assert vm.statistics().collapses == 1
            assert keep.backing is None  # the chain collapsed
            assert keep.read(0, keep.size) == bytes(expect)
            keep.close()
            vm.check()
            stats = vm.statistics()
            assert stats.swap_used_blocks == 0
            assert stats.free_nframes == stats.nframes
            assert stats.objects == 0


def test_clone_of_clone_chains_stay_short() -> None:
    vm, _ = small_vm(nframes=6, swap_nblocks=256)
    with vm:
        a = vm.allocate(8 * PAGE)
        fill(a, 5)
        views = [a]
        for i in range(5):
            c = views[-1].clone()
            c.write(i * PAGE, bytes([i + 1]) * 7)
            views.append(c)
        expected = [v.read(0, v.size) for v in views]
        for v in views[1:-1]:
            v.close()
            vm.check()
        for v, want in zip((views[0], views[-1]), (expected[0], expected[-1]), strict=True):
            assert v.read(0, v.size) == want
        depth = 0
        level = views[-1].backing
        while level is not None:
            depth += 1
            level = level.backing
        assert depth <= 1


def test_reserve_all_or_nothing_and_pageout_cannot_fail() -> None:
    vm, _ = small_vm(nframes=4, swap_nblocks=16)
    with vm:
        a = vm.allocate(12 * PAGE)
        a.reserve()
        assert vm.statistics().swap_used_blocks == 12
        assert a.read(0, a.size) == bytes(a.size)  # reserved blocks read as zeros
        b = vm.allocate(8 * PAGE)
        with pytest.raises(SwapExhausted):
            b.reserve()
        assert vm.statistics().swap_used_blocks == 12  # nothing kept from the failure
        # b fills the rest of swap; a's pageouts still find their blocks.
        data = fill(a, 7)
        for _ in range(3):
            assert a.read(0, a.size) == data
            a.write(5 * PAGE, b"again")
            data = data[: 5 * PAGE] + b"again" + data[5 * PAGE + 5 :]
        vm.check()
        a.discard(0, a.size)
        assert vm.statistics().swap_used_blocks == 0
        vm.check()


class CloneModel(RuleBasedStateMachine):
    """Clones, writes, closes and pageouts against bytes models."""

    def __init__(self) -> None:
        super().__init__()
        self.vm, _ = small_vm(nframes=6, swap_nblocks=96)
        self.views: list[tuple[VMObject, bytearray]] = []
        obj = self.vm.allocate(6 * PAGE)
        self.views.append((obj, bytearray(obj.size)))

    def teardown(self) -> None:
        self.vm.close()

    @precondition(lambda self: self.views and len(self.views) < 5)
    @rule(i=st.integers(0, 10))
    def clone(self, i: int) -> None:
        obj, model = self.views[i % len(self.views)]
        self.views.append((obj.clone(), bytearray(model)))

    @precondition(lambda self: self.views)
    @rule(
        i=st.integers(0, 10), p=st.integers(0, 5), byte=st.integers(1, 255), n=st.integers(1, 9000)
    )
    def write(self, i: int, p: int, byte: int, n: int) -> None:
        obj, model = self.views[i % len(self.views)]
        off = p * PAGE
        n = min(n, obj.size - off)
        try:
            obj.write(off, bytes([byte]) * n)
        except SwapExhausted:
            return
        model[off : off + n] = bytes([byte]) * n

    @precondition(lambda self: self.views)
    @rule(i=st.integers(0, 10), p=st.integers(0, 5), n=st.integers(0, 3))
    def discard(self, i: int, p: int, n: int) -> None:
        obj, model = self.views[i % len(self.views)]
        n = min(n * PAGE, obj.size - p * PAGE)
        try:
            obj.discard(p * PAGE, n)
        except SwapExhausted:
            return
        model[p * PAGE : p * PAGE + n] = bytes(n)

    @precondition(lambda self: len(self.views) > 1)
    @rule(i=st.integers(0, 10))
    def close(self, i: int) -> None:
        obj, _ = self.views.pop(i % len(self.views))
        obj.close()

    @rule(n=st.integers(1, 6))
    def pageout(self, n: int) -> None:
        self.vm.pageout(n)

    @rule()
    def verify(self) -> None:
        for obj, model in self.views:
            try:
                assert obj.read(0, obj.size) == bytes(model)
            except SwapExhausted:
                pass

    @invariant()
    def consistent(self) -> None:
        self.vm.check()


CloneModel.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestCloneModel = CloneModel.TestCase


def test_random_clone_workload_seeded() -> None:
    rng = random.Random(7)
    vm, _ = small_vm(nframes=8, swap_nblocks=256)
    with vm:
        root = vm.allocate(16 * PAGE)
        views = [(root, bytearray(root.size))]
        for _ in range(600):
            op = rng.random()
            obj, model = rng.choice(views)
            if op < 0.1 and len(views) < 6:
                views.append((obj.clone(), bytearray(model)))
            elif op < 0.15 and len(views) > 1:
                views.remove((obj, model))
                obj.close()
            else:
                off = rng.randrange(obj.size)
                n = min(rng.randrange(1, 3 * PAGE), obj.size - off)
                b = bytes([rng.randrange(256)]) * n
                obj.write(off, b)
                model[off : off + n] = b
        for obj, model in views:
            assert obj.read(0, obj.size) == bytes(model)
        vm.check()


def test_collapse_shadow_swap_copy_beats_resident_backing_page() -> None:
    vm, _ = small_vm(nframes=6, swap_nblocks=64, readaround_npages=0)
    with vm:
        a = vm.allocate(4 * PAGE)
        base = fill(a, 9)
        b = a.clone()
        b.write(0, b"newer")
        vm.pageout()  # b's page 0 goes to swap; the frozen pages too
        assert 0 not in b.pages
        assert a.read(0, 5) == base[:5]  # the frozen page 0 is resident again
        a.close()  # collapse: b's swap copy must win over the resident frozen page
        assert b.read(0, 5) == b"newer"
        assert b.read(5, PAGE - 5) == base[5:PAGE]
        vm.check()


def test_allocate_with_reserve() -> None:
    vm, _ = small_vm(nframes=4, swap_nblocks=16)
    with vm:
        a = vm.allocate(10 * PAGE, reserve=True)
        assert vm.statistics().swap_used_blocks == 10
        with pytest.raises(SwapExhausted, match="reserve"):
            vm.allocate(10 * PAGE, reserve=True)
        assert vm.statistics().objects == 1
        assert vm.statistics().swap_used_blocks == 10
        a.close()
        assert vm.statistics().swap_used_blocks == 0
        vm.check()


def test_swapoff_moves_reserved_pages() -> None:
    vm, _ = small_vm(nframes=8, swap_nblocks=[16, 32])
    with vm:
        a = vm.allocate(12 * PAGE, reserve=True)
        data = fill(a, 11)
        vm.pageout()
        on_first = next(d for d in vm.swapinfo() if d.index == 0).used
        assert on_first > 0
        vm.swapoff(0)
        assert a.read(0, a.size) == data
        assert [d.index for d in vm.swapinfo()] == [1]
        vm.check()
