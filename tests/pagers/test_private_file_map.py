"""Private (copy-on-write) file maps: an anonymous shadow over the shared file object.

Unmodified pages read through to the file object (and see its changes);
written pages are copied up, go to swap under pressure, and never reach
the file.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from vmpager.pager.file_object import PrivateFileObject, VnodeObject
from vmpager.testing.worlds import PAGE, small_vm


def make_file(path: Path, nbytes: int, seed: int = 2) -> bytes:
    data = random.Random(seed).randbytes(nbytes)
    path.write_bytes(data)
    return data


def test_private_writes_never_reach_the_file(tmp_path: Path) -> None:
    path = tmp_path / "f"
    data = make_file(path, 6 * PAGE + 10)
    vm, _ = small_vm(nframes=8)
    with vm:
        priv = vm.map_file(path, "r+", private=True)
        assert isinstance(priv, PrivateFileObject)
        assert priv.kind == "anonymous" and priv.size == len(data)
        vnode = priv.backing
        assert isinstance(vnode, VnodeObject)
        assert not vnode.writable  # the file itself is opened read-only
        assert vnode.shadows == [priv] and vnode.refcount == 1
        model = bytearray(data)
        assert priv.read(0, len(data)) == data
        priv.write(PAGE + 3, b"private")
        model[PAGE + 3 : PAGE + 10] = b"private"
        assert priv.read(0, len(model)) == bytes(model)
        assert vm.statistics().cow_copies == 1
        vm.pageout()
        vm.check()
        assert priv.read(0, len(model)) == bytes(model)
        priv.close()
        assert path.read_bytes() == data
        assert vnode.closed and vnode.fd == -1
        assert vm.objects() == []
        vm.check()


def test_modified_pages_go_to_swap_under_pressure(tmp_path: Path) -> None:
    npages = 40
    path = tmp_path / "f"
    data = make_file(path, npages * PAGE)
    vm, _ = small_vm(nframes=8, swap_nblocks=64)
    with vm:
        priv = vm.map_file(path, "r+", private=True)
        model = bytearray(data)
        rng = random.Random(4)
        for pindex in range(0, npages, 2):
            chunk = rng.randbytes(50)
            priv.write(pindex * PAGE + 9, chunk)
            model[pindex * PAGE + 9 : pindex * PAGE + 59] = chunk
            vm.check()
        stats = vm.statistics()
        assert stats.swap_used_blocks > 0
        assert vm.vnode_pager.statistics().pageouts == 0
        assert priv.read(0, priv.size) == bytes(model)
        vm.check()
    assert path.read_bytes() == data


def test_unmodified_pages_see_the_file_objects_changes(tmp_path: Path) -> None:
    path = tmp_path / "f"
    data = make_file(path, 3 * PAGE)
    vm, _ = small_vm(nframes=8)
    with vm:
        shared = vm.map_file(path, "r+")
        priv = vm.map_file(path, "r+", private=True)
        assert priv.backing is shared and shared.refcount == 2
        priv.write(0, b"mine")
        shared.write(0, b"SHARED-0")
        shared.write(PAGE, b"SHARED-1")
        assert priv.read(0, 8) == b"mine" + data[4:8]  # copied: its own
        assert priv.read(PAGE, 8) == b"SHARED-1"  # not copied: the file's
        vm.check()
        shared.close()  # the private map keeps the file object alive
        assert not shared.closed and shared.refcount == 1
        assert priv.read(PAGE, 8) == b"SHARED-1"
        priv.close()
        assert shared.closed
        vm.check()
    assert path.read_bytes()[:8] == b"SHARED-0"


def test_read_only_private_map_refuses_writes(tmp_path: Path) -> None:
    path = tmp_path / "f"
    data = make_file(path, PAGE)
    vm, _ = small_vm(nframes=8)
    with vm:
        priv = vm.map_file(path, "r", private=True)
        with pytest.raises(PermissionError, match="read-only"):
            priv.write(0, b"x")
        with pytest.raises(PermissionError):
            priv.discard(0, 1)
        assert priv.read(0, PAGE) == data
        vm.check()


def test_private_discard_and_fixed_size(tmp_path: Path) -> None:
    path = tmp_path / "f"
    data = make_file(path, 2 * PAGE + 5)
    vm, _ = small_vm(nframes=8)
    with vm:
        priv = vm.map_file(path, "r+", private=True)
        priv.discard(10, PAGE)
        model = bytearray(data)
        model[10 : 10 + PAGE] = bytes(PAGE)
        assert priv.read(0, priv.size) == bytes(model)
        with pytest.raises(ValueError):
            priv.write(priv.size - 2, b"past the end")  # a private map does not grow
        vm.check()
    assert path.read_bytes() == data


def test_pages_past_a_truncated_end_read_zeros_in_a_private_map(tmp_path: Path) -> None:
    path = tmp_path / "f"
    data = make_file(path, 4 * PAGE)
    vm, _ = small_vm(nframes=8)
    with vm:
        shared = vm.map_file(path, "r+")
        priv = vm.map_file(path, "r", private=True)
        shared.truncate(PAGE + 1)
        assert priv.size == 4 * PAGE
        assert priv.read(0, PAGE + 1) == data[: PAGE + 1]
        assert priv.read(PAGE + 1, 3 * PAGE - 1) == bytes(3 * PAGE - 1)
        vm.check()


def test_a_file_grown_again_shows_through_pages_read_past_its_end(tmp_path: Path) -> None:
    """Reading a private map past a shrunk file's end must not hide what the file gets later."""
    path = tmp_path / "f"
    make_file(path, 4 * PAGE)
    vm, _ = small_vm(nframes=8)
    with vm:
        shared = vm.map_file(path, "r+")
        priv = vm.map_file(path, "r", private=True)
        shared.truncate(0)
        assert priv.read(0, 3 * PAGE) == bytes(3 * PAGE)  # zero pages of the private map
        shared.write(PAGE + 5, b"grown")
        assert priv.read(PAGE + 5, 5) == b"grown"
        assert priv.read(0, PAGE) == bytes(PAGE)
        shared.truncate(3 * PAGE)
        assert priv.read(2 * PAGE, PAGE) == bytes(PAGE)
        vm.check()


def test_clone_of_a_private_map(tmp_path: Path) -> None:
    path = tmp_path / "f"
    data = make_file(path, 4 * PAGE)
    vm, _ = small_vm(nframes=8)
    with vm:
        priv = vm.map_file(path, "r+", private=True)
        priv.write(0, b"before")
        copy = priv.clone()
        priv.write(0, b"after!")
        copy.write(PAGE, b"copy")
        vm.check()
        assert priv.read(0, 6) == b"after!" and copy.read(0, 6) == b"before"
        assert priv.read(PAGE, 4) == data[PAGE : PAGE + 4] and copy.read(PAGE, 4) == b"copy"
        assert copy.read(2 * PAGE, PAGE) == data[2 * PAGE : 3 * PAGE]
        priv.close()
        vm.check()
        assert copy.read(0, 6) == b"before"
        assert copy.read(3 * PAGE, PAGE) == data[3 * PAGE :]
        copy.close()
        vm.check()
        assert vm.objects() == []
    assert path.read_bytes() == data


class PrivateModel(RuleBasedStateMachine):
    """A shared map and a private map of one file against a page-level model.

    A private page not yet written reads as the shared model's page; its
    first write copies that page (zeros past the file's end) and applies.
    """

    NPAGES = 6

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="private-model-")
        self.path = os.path.join(self.dir, "f")
        self.shared_model = bytearray(os.urandom(self.NPAGES * PAGE - 100))
        with open(self.path, "wb") as f:
            f.write(self.shared_model)
        self.vm, _ = small_vm(nframes=5, swap_nblocks=32, cluster_max_npages=4)
        self.shared = self.vm.map_file(self.path, "r+")
        self.priv = self.vm.map_file(self.path, "r+", private=True)
        self.priv_size = len(self.shared_model)
        self.copied: dict[int, bytearray] = {}

    def teardown(self) -> None:
        self.vm.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _shared_page(self, pindex: int) -> bytearray:
        page = bytearray(self.shared_model[pindex * PAGE : (pindex + 1) * PAGE])
        return page + bytes(PAGE - len(page))

    def _private_view(self) -> bytes:
        pages = [self.copied.get(p) or self._shared_page(p) for p in range(self.NPAGES)]
        return b"".join(pages)[: self.priv_size]

    @rule(data=st.data(), byte=st.integers(0, 255))
    def write_private(self, data: st.DataObject, byte: int) -> None:
        offset = data.draw(st.integers(0, self.priv_size - 1))
        length = data.draw(st.integers(1, min(PAGE + 10, self.priv_size - offset)))
        self.priv.write(offset, bytes([byte]) * length)
        for pos in range(offset, offset + length):
            pindex = pos // PAGE
            if pindex not in self.copied:
                self.copied[pindex] = self._shared_page(pindex)
            self.copied[pindex][pos % PAGE] = byte

    @rule(data=st.data(), byte=st.integers(0, 255))
    def write_shared(self, data: st.DataObject, byte: int) -> None:
        offset = data.draw(st.integers(0, self.NPAGES * PAGE - 1))
        length = data.draw(st.integers(1, min(PAGE + 10, self.NPAGES * PAGE - offset)))
        self.shared.write(offset, bytes([byte]) * length)
        if offset > len(self.shared_model):
            self.shared_model += bytes(offset - len(self.shared_model))
        self.shared_model[offset : offset + length] = bytes([byte]) * length

    @rule(size=st.integers(0, 6 * PAGE))
    def truncate_shared(self, size: int) -> None:
        self.shared.truncate(size)
        if size < len(self.shared_model):
            del self.shared_model[size:]
        else:
            self.shared_model += bytes(size - len(self.shared_model))

    @rule(data=st.data())
    def read_private(self, data: st.DataObject) -> None:
        offset = data.draw(st.integers(0, self.priv_size))
        length = data.draw(st.integers(0, min(2 * PAGE, self.priv_size - offset)))
        expected = self._private_view()[offset : offset + length]
        assert self.priv.read(offset, length) == expected

    @rule()
    def read_shared(self) -> None:
        assert self.shared.read(0, self.shared.size) == bytes(self.shared_model)

    @rule()
    def flush(self) -> None:
        self.shared.flush()
        with open(self.path, "rb") as f:
            assert f.read() == bytes(self.shared_model)

    @rule(npages=st.integers(1, 5))
    def pageout(self, npages: int) -> None:
        self.vm.pageout(npages)

    @invariant()
    def consistent(self) -> None:
        self.vm.check()


PrivateModel.TestCase.settings = settings(
    max_examples=50,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestPrivateModel = PrivateModel.TestCase
