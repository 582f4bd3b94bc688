"""A file object against a bytes model (Hypothesis state machine).

Rules write (extending the file when past the end), read, flush (then the
file read with plain reads must equal the model), truncate, page out, map a
second time (the same object) and close it, and close and reopen the file.
``vm.check()`` runs after every step.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from vmpager.pager.file_object import VnodeObject
from vmpager.testing.worlds import PAGE, small_vm
from vmpager.vm.system import VM

MAX_BYTES = 10 * PAGE
OFFSETS = st.one_of(
    st.integers(0, MAX_BYTES),
    st.sampled_from([0, PAGE - 1, PAGE, 2 * PAGE + 17, 5 * PAGE, MAX_BYTES - 1]),
)


class FileModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="vnode-model-")
        self.path = os.path.join(self.dir, "f")
        self.model = bytearray(os.urandom(3 * PAGE + 99))
        with open(self.path, "wb") as f:
            f.write(self.model)
        self.vm = self.make_vm()
        self.obj = self._map()
        self.extra_maps = 0

    def make_vm(self) -> VM:
        vm, _ = small_vm(nframes=5, swap_nblocks=8, cluster_max_npages=4)
        return vm

    def _map(self) -> VnodeObject:
        obj = self.vm.map_file(self.path, "r+")
        assert isinstance(obj, VnodeObject)
        return obj

    def teardown(self) -> None:
        self.vm.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @rule(offset=OFFSETS, length=st.integers(1, 2 * PAGE + 3), byte=st.integers(0, 255))
    def write(self, offset: int, length: int, byte: int) -> None:
        offset = min(offset, MAX_BYTES - 1)
        length = min(length, MAX_BYTES - offset)
        data = bytes([byte]) * length
        self.obj.write(offset, data)
        if offset > len(self.model):
            self.model += bytes(offset - len(self.model))
        self.model[offset : offset + length] = data
        assert self.obj.size == len(self.model)

    @rule(data=st.data())
    def read(self, data: st.DataObject) -> None:
        size = len(self.model)
        offset = data.draw(st.integers(0, size))
        length = data.draw(st.integers(0, min(3 * PAGE, size - offset)))
        assert self.obj.read(offset, length) == bytes(self.model[offset : offset + length])

    @rule()
    def flush(self) -> None:
        self.obj.flush()
        with open(self.path, "rb") as f:
            assert f.read() == bytes(self.model)

    @rule(size=st.one_of(st.integers(0, MAX_BYTES), st.sampled_from([0, PAGE, 2 * PAGE + 1])))
    def truncate(self, size: int) -> None:
        self.obj.truncate(size)
        if size < len(self.model):
            del self.model[size:]
        else:
            self.model += bytes(size - len(self.model))
        assert self.obj.size == size

    @rule(npages=st.integers(1, 5))
    def pageout(self, npages: int) -> None:
        self.vm.pageout(npages)

    @rule()
    def map_again(self) -> None:
        other = self._map()
        assert other is self.obj
        self.extra_maps += 1
        assert self.obj.refcount == 1 + self.extra_maps

    @precondition(lambda self: self.extra_maps > 0)
    @rule()
    def close_extra_map(self) -> None:
        self.obj.close()  # flushes, drops one map
        self.extra_maps -= 1
        assert not self.obj.closed
        with open(self.path, "rb") as f:
            assert f.read() == bytes(self.model)

    @rule()
    def reopen(self) -> None:
        for _ in range(self.extra_maps + 1):
            self.obj.close()
        assert self.obj.closed
        self.extra_maps = 0
        with open(self.path, "rb") as f:
            assert f.read() == bytes(self.model)
        self.obj = self._map()
        assert self.obj.size == len(self.model)

    @invariant()
    def consistent(self) -> None:
        self.vm.check()


FileModel.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestFileModel = FileModel.TestCase


class FileModelAsyncReadAhead(FileModel):
    """The same with asynchronous read-ahead on: windows complete in worker threads."""

    def make_vm(self) -> VM:
        vm, _ = small_vm(nframes=16, swap_nblocks=8, cluster_max_npages=4, readaround_npages=1)
        vm.vnode_pager.async_readahead_windows = 2
        vm.vnode_pager.readahead_max_npages = 2
        return vm

    @rule()
    def scan(self) -> None:
        size = len(self.model)
        for offset in range(0, size, PAGE):
            n = min(PAGE, size - offset)
            assert self.obj.read(offset, n) == bytes(self.model[offset : offset + n])


FileModelAsyncReadAhead.TestCase.settings = settings(
    max_examples=30,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestFileModelAsyncReadAhead = FileModelAsyncReadAhead.TestCase
