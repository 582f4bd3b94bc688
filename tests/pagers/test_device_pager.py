"""Fixed memory as VM objects through the device pager.

Reads and writes go straight to the caller's memory; its pages never enter
the frame pool and the page daemon never touches them.
"""

from __future__ import annotations

import mmap
import random
import threading
from pathlib import Path

import numpy as np
import pytest

from vmpager import ObjectClosed
from vmpager.pager.device import DeviceObject
from vmpager.testing.worlds import PAGE, small_vm
from vmpager.vm.fault import hold_page


def test_bytearray_reads_and_writes_go_straight_to_the_memory() -> None:
    memory = bytearray(random.Random(1).randbytes(4 * PAGE))
    vm, _ = small_vm(nframes=8)
    with vm:
        obj = vm.map_device(memory)
        assert isinstance(obj, DeviceObject)
        assert obj.kind == "device" and obj.size == 4 * PAGE and obj.npages == 4
        assert obj.read(0, obj.size) == bytes(memory)
        obj.write(PAGE - 2, b"straight")
        assert memory[PAGE - 2 : PAGE + 6] == b"straight"  # no copy in between
        memory[3 * PAGE : 3 * PAGE + 4] = b"back"
        assert obj.read(3 * PAGE, 4) == b"back"
        buf = bytearray(10)
        assert obj.readinto(PAGE - 2, buf) == 10
        assert bytes(buf[:8]) == b"straight"
        stats = vm.statistics()
        assert stats.resident_npages == 0 and stats.faults == 0
        assert stats.free_nframes == stats.nframes
        dstats = vm.device_pager.statistics()
        assert dstats.objects == 1 and dstats.size_bytes == 4 * PAGE
        assert dstats.writes == 1 and dstats.reads == 3
        vm.check()


def test_numpy_array_and_partial_last_page() -> None:
    array = np.zeros((5, 250), dtype=np.float64)  # 10,000 bytes: 3 pages, the last partial
    vm, _ = small_vm(nframes=8)
    with vm:
        obj = vm.map_device(array)
        assert obj.size == array.nbytes == 10_000 and obj.npages == 3
        obj.write(8 * 251, np.array([2.5], dtype=np.float64).tobytes())
        assert array[1, 1] == 2.5
        array[4, 249] = -1.0
        assert obj.read(obj.size - 8, 8) == np.float64(-1.0).tobytes()
        with pytest.raises(ValueError, match="length"):
            obj.read(obj.size - 8, 9)
        with pytest.raises(ValueError):
            obj.write(obj.size - 1, b"ab")  # device memory does not grow
        vm.check()


def test_mmap_and_flush_to_its_file(tmp_path: Path) -> None:
    path = tmp_path / "backing"
    path.write_bytes(bytes(2 * PAGE))
    with open(path, "r+b") as f:
        mem = mmap.mmap(f.fileno(), 2 * PAGE)
    vm, _ = small_vm(nframes=8)
    with vm:
        obj = vm.map_device(mem)
        obj.write(PAGE, b"mmap'd")
        assert mem[PAGE : PAGE + 6] == b"mmap'd"
        obj.flush()
        assert path.read_bytes()[PAGE : PAGE + 6] == b"mmap'd"
        with pytest.raises(BufferError):
            mem.close()  # pinned while mapped
        obj.close()
        mem.close()
        vm.check()


def test_read_only_memory_and_bad_buffers() -> None:
    vm, _ = small_vm(nframes=8)
    with vm:
        ro = vm.map_device(b"constant" * 600)
        assert not ro.writable and ro.read(0, 8) == b"constant"
        with pytest.raises(PermissionError, match="read-only"):
            ro.write(0, b"x")
        with pytest.raises(TypeError, match="C-contiguous"):
            vm.map_device(np.zeros((4, 4096), dtype=np.uint8)[:, ::2])
        with pytest.raises(TypeError, match="buffer protocol"):
            vm.map_device([1, 2, 3])
        with pytest.raises(ValueError, match="at least 1 byte"):
            vm.map_device(bytearray())
        obj = vm.map_device(bytearray(PAGE))
        with pytest.raises(ValueError, match="offset"):
            obj.read(-1, 1)
        with pytest.raises(TypeError):
            obj.write(0, "text")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="cloned"):
            obj.clone()
        obj.discard(10, 20)
        vm.check()


def test_memory_is_pinned_until_closed() -> None:
    memory = bytearray(PAGE)
    vm, _ = small_vm(nframes=8)
    with vm:
        obj = vm.map_device(memory)
        with pytest.raises(BufferError):
            memory.extend(b"more")
        obj.close()
        memory.extend(b"more")  # released
        with pytest.raises(ObjectClosed):
            obj.read(0, 1)
        assert vm.device_pager.statistics().objects == 0
        vm.check()


def test_device_pages_are_never_paged_out() -> None:
    memory = bytearray(random.Random(2).randbytes(16 * PAGE))
    original = bytes(memory)
    vm, _ = small_vm(nframes=8, swap_nblocks=64)
    with vm:
        dev = vm.map_device(memory)
        anon = vm.allocate(40 * PAGE)
        for pindex in range(40):
            anon.write(pindex * PAGE, bytes([pindex + 1]) * 64)
            assert dev.read(pindex % 16 * PAGE, 64) == original[pindex % 16 * PAGE :][:64]
        vm.pageout()
        stats = vm.statistics()
        assert stats.pageout_pages > 0
        assert not dev.pages  # never resident, never counted
        assert dev.read(0, dev.size) == original
        assert anon.read(39 * PAGE, 64) == bytes([40]) * 64
        vm.check()


def test_frame_copies_from_generic_paths_are_dropped_by_direct_writes() -> None:
    memory = bytearray(b"a" * (2 * PAGE))
    vm, _ = small_vm(nframes=8, readaround_npages=0)
    with vm:
        dev = vm.map_device(memory)
        with vm.kernel.cond:
            page = hold_page(
                vm.kernel, dev, 1, write=False, overwrite=False
            )  # what a shadow chain walk does
            assert bytes(vm.frames.frame_view(page.frame)) == b"a" * PAGE
        vm.check()  # the copy equals the memory
        dev.write(PAGE + 5, b"new")
        assert 1 not in dev.pages
        assert vm.device_pager.statistics().invalidated_pages == 1
        vm.check()


def test_concurrent_readers_and_writers_with_close_waiting() -> None:
    memory = bytearray(64 * PAGE)
    vm, _ = small_vm(nframes=8)
    failures: list[BaseException] = []
    with vm:
        dev = vm.map_device(memory)

        def worker(slot: int) -> None:
            try:
                mark = bytes([slot + 1]) * PAGE
                for i in range(200):
                    pindex = slot * 16 + i % 16
                    dev.write(pindex * PAGE, mark)
                    assert dev.read(pindex * PAGE, PAGE) == mark
            except BaseException as exc:
                failures.append(exc)

        threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
            assert not t.is_alive(), "a thread did not finish within 60 s"
        assert not failures, failures
        for slot in range(4):
            assert memory[slot * 16 * PAGE : (slot + 1) * 16 * PAGE] == bytes([slot + 1]) * (
                16 * PAGE
            )
        vm.check()
