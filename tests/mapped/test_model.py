"""A mapped array on a tiny budget against a numpy array in plain memory."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from vmpager.mapped.client import MappedObject, PagerProcess
from vmpager.testing.mapped import UNAVAILABLE

PS = 4096
NPAGES = 40  # the budget is 16 frames
N = NPAGES * PS // 8

_pager: list[PagerProcess] = []


@pytest.fixture(scope="module", autouse=True)
def _one_pager() -> Iterator[None]:
    if UNAVAILABLE is not None:
        pytest.skip(UNAVAILABLE)
    _pager.append(PagerProcess("64K"))
    yield
    _pager.pop().close()


index = st.integers(0, N - 1)
value = st.integers(-(2**40), 2**40)


class MappedModel(RuleBasedStateMachine):
    @initialize()
    def make(self) -> None:
        self.pager = _pager[0]
        self.a = self.pager.array(N, "int64")
        self.obj = self.pager.object_of(self.a)
        self.ref = np.zeros(N, np.int64)
        self.clones: list[tuple[MappedObject, np.ndarray]] = []

    @rule(start=index, length=st.integers(1, 3 * PS // 8), step=st.integers(1, 5), v=value)
    def slice_assign(self, start: int, length: int, step: int, v: int) -> None:
        sl = slice(start, start + length * step, step)
        self.a[sl] = v
        self.ref[sl] = v

    @rule(idx=st.lists(index, min_size=1, max_size=30), v=value)
    def fancy_assign(self, idx: list[int], v: int) -> None:
        self.a[idx] = v
        self.ref[idx] = v

    @rule(idx=st.lists(index, min_size=1, max_size=30), v=st.integers(-100, 100))
    def add_at(self, idx: list[int], v: int) -> None:
        np.add.at(self.a, idx, v)
        np.add.at(self.ref, idx, v)

    @rule(start=index, data=st.binary(min_size=1, max_size=2 * PS))
    def object_write(self, start: int, data: bytes) -> None:
        offset = min(start * 8, N * 8 - len(data))
        self.obj.write(offset, data)
        self.ref.view(np.uint8)[offset : offset + len(data)] = np.frombuffer(data, np.uint8)

    @rule(start=index, length=st.integers(1, 2 * PS))
    def object_read(self, start: int, length: int) -> None:
        offset = min(start * 8, N * 8 - length)
        assert (
            self.obj.read(offset, length)
            == self.ref.view(np.uint8)[offset : offset + length].tobytes()
        )

    @rule(start=st.integers(0, N * 8 - 1), length=st.integers(1, 6 * PS))
    def discard(self, start: int, length: int) -> None:
        length = min(length, N * 8 - start)
        self.obj.discard(start, length)
        self.ref.view(np.uint8)[start : start + length] = 0

    @precondition(lambda self: len(self.clones) < 2)
    @rule()
    def clone(self) -> None:
        self.clones.append((self.obj.clone(), self.ref.copy()))

    @precondition(lambda self: bool(self.clones))
    @rule(mapped=st.booleans())
    def read_clone(self, mapped: bool) -> None:
        copy, ref = self.clones[-1]
        if mapped:
            assert np.array_equal(np.frombuffer(copy.map(), np.int64), ref)
        else:
            assert copy.read(0, copy.size) == ref.tobytes()

    @rule()
    def page_out(self) -> None:
        self.pager.pageout()

    @rule(idx=st.lists(index, min_size=1, max_size=10))
    def gather(self, idx: list[int]) -> None:
        assert np.array_equal(self.a[idx], self.ref[idx])

    @invariant()
    def same(self) -> None:
        assert np.array_equal(self.a, self.ref)

    def teardown(self) -> None:
        self.pager.check()
        for copy, _ in self.clones:
            copy.close()
        self.obj.close()
        del self.a
        self.pager.check()


TestMappedModel = MappedModel.TestCase
TestMappedModel.settings = settings(
    max_examples=8,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
