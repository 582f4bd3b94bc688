"""``obj.map()`` on the VM's own objects: the object moves into the pager process,
and its calls and its mapping stay one object."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from vmpager import VM
from vmpager.errors import ObjectClosed
from vmpager.mapped.moved import MovedObject
from vmpager.testing.mapped import UNAVAILABLE, needs_uffd
from vmpager.vm.object import VMObject

PS = 4096
NPAGES = 40  # both budgets are 16 frames
N = NPAGES * PS // 8

_vm: list[VM] = []


@pytest.fixture(scope="module")
def one_vm() -> Iterator[VM]:
    if UNAVAILABLE is not None:
        pytest.skip(UNAVAILABLE)
    vm = VM("64K")
    _vm.append(vm)
    yield vm
    _vm.pop()
    vm.close()


index = st.integers(0, N - 1)
value = st.integers(-(2**40), 2**40)


class MovedModel(RuleBasedStateMachine):
    """An object of the VM used through calls, then mapped at some step; afterwards
    array accesses and calls interleave. Reference: a numpy array in plain memory."""

    @initialize()
    def make(self) -> None:
        self.vm = _vm[0]
        self.obj: VMObject = self.vm.allocate(NPAGES * PS)
        self.a: np.ndarray | None = None
        self.ref = np.zeros(N, np.int64)
        self.clones: list[tuple[VMObject, np.ndarray]] = []

    @precondition(lambda self: self.a is None)
    @rule()
    def map(self) -> None:
        self.a = np.frombuffer(self.obj.map(), np.int64)
        assert isinstance(self.obj, MovedObject)
        assert self.obj not in self.vm.objects()  # its pages are the pager's now

    @precondition(lambda self: self.a is not None)
    @rule(start=index, length=st.integers(1, 3 * PS // 8), step=st.integers(1, 5), v=value)
    def slice_assign(self, start: int, length: int, step: int, v: int) -> None:
        assert self.a is not None
        sl = slice(start, start + length * step, step)
        self.a[sl] = v
        self.ref[sl] = v

    @precondition(lambda self: self.a is not None)
    @rule(idx=st.lists(index, min_size=1, max_size=30), v=st.integers(-100, 100))
    def add_at(self, idx: list[int], v: int) -> None:
        assert self.a is not None
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
        expected = self.ref.view(np.uint8)[offset : offset + length].tobytes()
        assert self.obj.read(offset, length) == expected

    @rule(idx=st.lists(index, min_size=1, max_size=20), v=value)
    def words(self, idx: list[int], v: int) -> None:
        offsets = np.asarray(idx, np.int64) * 8
        self.obj.write_words(offsets, np.full(len(idx), v, np.int64).view(np.uint64))
        self.ref[idx] = v
        got = self.obj.read_words(offsets).view(np.int64)
        assert np.array_equal(got, self.ref[idx])

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
        self.vm.pageout()
        self.vm.mapped.pageout()

    @invariant()
    def same(self) -> None:
        if self.a is not None:
            assert np.array_equal(self.a, self.ref)
        else:
            assert self.obj.read(0, self.obj.size) == self.ref.tobytes()

    def teardown(self) -> None:
        self.vm.check()
        self.vm.mapped.check()
        for copy, _ in self.clones:
            copy.close()
        self.obj.close()
        self.a = None
        self.vm.check()
        self.vm.mapped.check()


@pytest.mark.usefixtures("one_vm")
class TestMovedModel(MovedModel.TestCase):  # type: ignore[misc,valid-type]
    settings = settings(
        max_examples=10,
        stateful_step_count=25,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )


@needs_uffd
def test_map_moves_the_contents_and_releases_the_vm_s_copy() -> None:
    with VM("256K") as vm:
        obj = vm.allocate("1M")  # 4x the budget: part of it is in swap
        data = np.random.default_rng(1).integers(0, 255, obj.size, dtype=np.uint8)
        obj.write(0, data.tobytes())
        before = obj.clone()  # a clone taken before the move keeps its contents
        assert vm.statistics().resident_npages > 0
        view = obj.map()
        assert obj.map() is view  # one mapping while it lives
        assert np.array_equal(np.frombuffer(view, np.uint8), data)
        np.frombuffer(view, np.uint8)[:PS] = 0
        assert obj.read(0, PS) == bytes(PS)
        assert before.read(0, PS) == data[:PS].tobytes()
        assert [o.oid for o in vm.objects()] == [before.oid]
        vm.check()
        vm.mapped.check()
        after = obj.clone()  # a clone of a moved object is a moved object
        assert isinstance(after, MovedObject)
        assert np.frombuffer(after.map(), np.uint8)[PS] == data[PS]
        obj.close()
        with pytest.raises(ObjectClosed):
            obj.read(0, 1)
        with pytest.raises(ObjectClosed):
            obj.map()
        assert after.read(PS, 1) == data[PS : PS + 1].tobytes()


@needs_uffd
def test_map_refuses_other_objects_and_bad_arguments(tmp_path: object) -> None:
    import pathlib

    path = pathlib.Path(str(tmp_path)) / "f"
    path.write_bytes(bytes(3 * PS))
    with VM("256K") as vm:
        fobj = vm.map_file(path, "r+")
        with pytest.raises(TypeError, match=r"vmpager\.memmap"):
            fobj.map()
        closed = vm.allocate("64K")
        closed.close()
        with pytest.raises(ObjectClosed):
            closed.map()
        obj = vm.allocate("64K")
        obj.map()
        with pytest.raises(ValueError, match="length must be"):
            obj.read(64 * 1024, 1)
        with pytest.raises(TypeError, match="str"):
            obj.write(0, "text")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="strategy"):
            obj.strategy_delete(0, PS)
    with pytest.raises(ObjectClosed):  # the VM (and its pager) closed under it
        obj.read(0, 1)
