"""Files mapped shared through the vnode pager, on small worlds and tmp_path files.

The file on disk is always compared with plain reads of the file (never
through the VM), after ``flush`` or ``close``.
"""

from __future__ import annotations

import errno
import os
import random
import threading
from pathlib import Path

import pytest

from vmpager import DeviceError, ObjectClosed
from vmpager.pager.file_object import VnodeObject
from vmpager.pager.vnode import FileShrunkError
from vmpager.testing.worlds import PAGE, small_vm


def make_file(path: Path, nbytes: int, seed: int = 1) -> bytes:
    data = random.Random(seed).randbytes(nbytes)
    path.write_bytes(data)
    return data


def file_bytes(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_reads_equal_the_file_and_the_last_page_is_zero_past_eof(tmp_path: Path) -> None:
    path = tmp_path / "f"
    data = make_file(path, 5 * PAGE + 123)
    vm, _ = small_vm(nframes=8)
    with vm:
        obj = vm.map_file(str(path))
        assert isinstance(obj, VnodeObject)
        assert obj.kind == "vnode"
        assert obj.size == len(data) and obj.npages == 6
        assert obj.read(0, len(data)) == data
        assert obj.read(5 * PAGE, 123) == data[5 * PAGE :]
        last = obj.pages[5]
        # The frame holds the file's 123 bytes, then zeros (the check also asserts it).
        frame = bytes(vm.frames.frame_view(last.frame))
        assert frame == data[5 * PAGE :] + bytes(PAGE - 123)
        vm.check()
        with pytest.raises(ValueError, match="length"):
            obj.read(len(data) - 10, 11)


def test_flush_writes_the_model_and_nothing_past_eof(tmp_path: Path) -> None:
    path = tmp_path / "f"
    model = bytearray(make_file(path, 7 * PAGE + 1000))
    vm, _ = small_vm(nframes=8)
    with vm:
        obj = vm.map_file(path, "r+")
        rng = random.Random(7)
        for _ in range(40):
            off = rng.randrange(len(model) - 50)
            chunk = rng.randbytes(rng.randrange(1, 50))
            obj.write(off, chunk)
            model[off : off + len(chunk)] = chunk
        obj.write(len(model) - 3, b"END")
        model[-3:] = b"END"
        vm.check()
        assert file_bytes(path) != bytes(model)  # nothing written back yet
        obj.flush()
        assert file_bytes(path) == bytes(model)
        assert os.path.getsize(path) == len(model)
        assert vm.statistics().dirty_npages == 0
        obj.flush(durable=True)
        vm.check()


def test_close_flushes(tmp_path: Path) -> None:
    path = tmp_path / "f"
    model = bytearray(make_file(path, 3 * PAGE))
    vm, _ = small_vm(nframes=8)
    with vm:
        obj = vm.map_file(path, "r+")
        obj.write(PAGE + 5, b"closing")
        model[PAGE + 5 : PAGE + 12] = b"closing"
        obj.close()
        assert obj.closed
        assert file_bytes(path) == bytes(model)
        with pytest.raises(ObjectClosed):
            obj.read(0, 1)
        vm.check()
        assert vm.objects() == []


def test_vm_close_flushes_file_objects(tmp_path: Path) -> None:
    path = tmp_path / "f"
    model = bytearray(make_file(path, 2 * PAGE))
    vm, _ = small_vm(nframes=8)
    obj = vm.map_file(path, "r+")
    obj.write(10, b"at exit")
    model[10:17] = b"at exit"
    vm.close()
    assert file_bytes(path) == bytes(model)


def test_read_only_map_refuses_writes(tmp_path: Path) -> None:
    path = tmp_path / "f"
    data = make_file(path, 2 * PAGE)
    vm, _ = small_vm(nframes=8)
    with vm:
        obj = vm.map_file(path, "r")
        for action in (
            lambda: obj.write(0, b"x"),
            lambda: obj.truncate(10),
            lambda: obj.discard(0, 10),
        ):
            with pytest.raises(PermissionError, match="read-only"):
                action()
        assert obj.read(0, len(data)) == data
        assert file_bytes(path) == data
        vm.check()


def test_bad_arguments(tmp_path: Path) -> None:
    path = tmp_path / "f"
    make_file(path, PAGE)
    vm, _ = small_vm(nframes=8)
    with vm:
        with pytest.raises(ValueError, match="mode"):
            vm.map_file(path, "w")
        with pytest.raises(TypeError, match="path"):
            vm.map_file(42)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="regular file"):
            vm.map_file(tmp_path)
        with pytest.raises(FileNotFoundError):
            vm.map_file(tmp_path / "missing")
        obj = vm.map_file(path, "r+")
        with pytest.raises(ValueError, match="offset"):
            obj.write(-1, b"x")
        with pytest.raises(TypeError):
            obj.write(0, "text")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="size"):
            obj.truncate(-1)
        with pytest.raises(TypeError, match="cloned"):
            obj.clone()
        vm.check()


def test_two_maps_share_one_object(tmp_path: Path) -> None:
    path = tmp_path / "f"
    model = bytearray(make_file(path, 4 * PAGE))
    vm, _ = small_vm(nframes=8)
    with vm:
        a = vm.map_file(path, "r")
        b = vm.map_file(str(path), "r+")  # upgrades the shared object to read-write
        assert a is b and a.refcount == 2
        (tmp_path / "link").symlink_to(path)
        c = vm.map_file(tmp_path / "link", "r")
        assert c is a and a.refcount == 3
        b.write(0, b"shared")
        model[:6] = b"shared"
        assert a.read(0, 6) == b"shared"
        assert vm.vnode_pager.statistics().objects == 1
        a.close()
        c.close()
        assert not b.closed and b.refcount == 1
        assert file_bytes(path) == bytes(model)  # every close flushes
        vm.check()
        b.close()
        assert b.closed
        d = vm.map_file(path)
        assert d is not b and d.read(0, 6) == b"shared"
        vm.check()


def test_extending_writes_and_truncate(tmp_path: Path) -> None:
    path = tmp_path / "f"
    model = bytearray(make_file(path, PAGE + 100))
    vm, _ = small_vm(nframes=8)
    with vm:
        obj = vm.map_file(path, "r+")
        # A write past the end extends the file; the gap reads as zeros.
        obj.write(3 * PAGE + 10, b"tail")
        model += bytes(3 * PAGE + 10 - len(model)) + b"tail"
        assert obj.size == len(model) and obj.npages == 4
        assert os.path.getsize(path) == len(model)  # extended at once, sparse
        assert obj.read(0, obj.size) == bytes(model)
        vm.check()
        # Dirty data past the new end disappears with the cut.
        obj.write(2 * PAGE, b"z" * PAGE)
        obj.truncate(PAGE + 7)
        del model[PAGE + 7 :]
        assert obj.size == PAGE + 7 and obj.npages == 2
        vm.check()  # the new last page's tail was zeroed
        obj.truncate(3 * PAGE)
        model += bytes(3 * PAGE - len(model))
        assert obj.read(0, obj.size) == bytes(model)
        obj.flush()
        assert file_bytes(path) == bytes(model)
        obj.truncate(0)
        assert obj.size == 0 and obj.read(0, 0) == b""
        obj.write(0, b"again")
        obj.flush()
        assert file_bytes(path) == b"again"
        vm.check()


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty"
    path.write_bytes(b"")
    vm, _ = small_vm(nframes=8)
    with vm:
        obj = vm.map_file(path, "r+")
        assert obj.size == 0 and obj.npages == 0
        assert obj.read(0, 0) == b""
        with pytest.raises(ValueError):
            obj.read(0, 1)
        obj.write(0, b"grown")
        obj.close()
        assert file_bytes(path) == b"grown"
        vm.check()


def test_discard_writes_zeros_to_the_file(tmp_path: Path) -> None:
    path = tmp_path / "f"
    model = bytearray(make_file(path, 4 * PAGE))
    vm, _ = small_vm(nframes=8)
    with vm:
        obj = vm.map_file(path, "r+")
        obj.discard(100, 2 * PAGE)
        model[100 : 100 + 2 * PAGE] = bytes(2 * PAGE)
        assert obj.read(0, obj.size) == bytes(model)
        obj.flush()
        assert file_bytes(path) == bytes(model)
        vm.check()


def test_write_back_under_memory_pressure_never_uses_swap(tmp_path: Path) -> None:
    npages = 64
    path = tmp_path / "big"
    model = bytearray(make_file(path, npages * PAGE - 17))
    vm, _ = small_vm(nframes=8, swap_nblocks=16)
    with vm:
        obj = vm.map_file(path, "r+")
        rng = random.Random(3)
        for pindex in rng.sample(range(npages), npages):  # writes everywhere
            off = pindex * PAGE + rng.randrange(PAGE // 2)
            chunk = rng.randbytes(100)
            n = obj.write(off, chunk[: max(0, min(100, len(model) - off))])
            model[off : off + n] = chunk[:n]
            assert vm.statistics().swap_used_blocks == 0
        vm.check()
        stats = vm.statistics()
        assert stats.resident_npages <= 8
        assert vm.vnode_pager.statistics().pageout_pages > 0  # the daemon wrote to the file
        assert obj.read(0, obj.size) == bytes(model)
        obj.flush()
        assert file_bytes(path) == bytes(model)
        assert vm.statistics().swap_used_blocks == 0
        vm.check()


def test_sequential_faults_read_ahead_and_random_ones_do_not(tmp_path: Path) -> None:
    path = tmp_path / "f"
    data = make_file(path, 64 * PAGE)
    vm, _ = small_vm(nframes=64, readaround_npages=4)
    with vm:
        vm.vnode_pager.readahead_max_npages = 16
        obj = vm.map_file(path)
        for pindex in range(40):
            assert obj.read(pindex * PAGE, 8) == data[pindex * PAGE : pindex * PAGE + 8]
        seq = vm.vnode_pager.statistics()
        # The window doubles from 4 up to 16: pages 0-4, 5-13, 14-30, 31-47.
        assert (seq.pageins, seq.pagein_pages) == (4, 48)
        assert vm.statistics().readaround_hits == 40 - 4
        before = vm.vnode_pager.statistics()
        for pindex in (60, 50, 62, 52, 54):
            assert obj.read(pindex * PAGE, 8) == data[pindex * PAGE : pindex * PAGE + 8]
        after = vm.vnode_pager.statistics()
        assert after.pageins - before.pageins == 5
        assert after.pagein_pages - before.pagein_pages == 5
        # Sequential again (after 54): the window starts over from 4, pages 55-59.
        assert obj.read(55 * PAGE, 8) == data[55 * PAGE : 55 * PAGE + 8]
        assert vm.vnode_pager.statistics().pagein_pages - after.pagein_pages == 5
        vm.check()


def test_file_shrunk_by_someone_else(tmp_path: Path) -> None:
    path = tmp_path / "f"
    data = make_file(path, 8 * PAGE)
    vm, _ = small_vm(nframes=8, readaround_npages=0)
    with vm:
        obj = vm.map_file(path, "r+")
        assert obj.read(0, 10) == data[:10]
        os.truncate(path, 3 * PAGE + 100)
        # Inside the new size: still the file's data.
        assert obj.read(2 * PAGE, PAGE) == data[2 * PAGE : 3 * PAGE]
        # Past it: a typed error naming the file, neither zeros nor a crash.
        with pytest.raises(FileShrunkError) as info:
            obj.read(5 * PAGE, 10)
        err = info.value
        assert isinstance(err, DeviceError) and str(path) in str(err)
        assert err.file_size == 3 * PAGE + 100 and err.block == 5
        with pytest.raises(FileShrunkError):
            obj.read(3 * PAGE, 10)  # the partial page lost its tail
        vm.check()
        # A page written over whole needs no read; its write-back must not
        # extend the file again.
        obj.write(6 * PAGE, b"w" * PAGE)
        with pytest.raises(FileShrunkError):
            obj.flush()
        assert os.path.getsize(path) == 3 * PAGE + 100
        vm.check()
        # Adopting the new size forgets the pages past it.
        obj.truncate(3 * PAGE + 100)
        obj.flush()
        assert file_bytes(path) == data[: 3 * PAGE + 100]
        vm.check()


def test_hard_write_error_keeps_pages_dirty_until_a_later_flush(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "f"
    model = bytearray(make_file(path, 8 * PAGE))
    vm, _ = small_vm(reference=True, nframes=16)
    with vm:
        obj = vm.map_file(path, "r+")
        for pindex in range(8):
            obj.write(pindex * PAGE + 1, b"dirty")
            model[pindex * PAGE + 1 : pindex * PAGE + 6] = b"dirty"
        real = os.pwritev
        calls = {"n": 0}

        def failing(fd: int, buffers: list[memoryview], offset: int) -> int:
            calls["n"] += 1
            raise OSError(errno.EIO, "injected")

        monkeypatch.setattr(os, "pwritev", failing)
        with pytest.raises(DeviceError) as info:
            obj.flush()
        assert str(path) in str(info.value) and info.value.errno == errno.EIO
        assert calls["n"] == 2  # two clusters of four pages, no retry after a hard error
        assert vm.statistics().dirty_npages == 8
        vm.check()
        monkeypatch.setattr(os, "pwritev", real)
        obj.flush()
        assert file_bytes(path) == bytes(model)
        assert vm.vnode_pager.statistics().write_errors == 2
        vm.check()


def test_transient_write_error_is_retried_by_pager_put(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "f"
    model = bytearray(make_file(path, 4 * PAGE))
    vm, _ = small_vm(nframes=16)
    with vm:
        obj = vm.map_file(path, "r+")
        for pindex in range(4):
            obj.write(pindex * PAGE, b"again")
            model[pindex * PAGE : pindex * PAGE + 5] = b"again"
        real = os.pwritev
        sizes: list[int] = []

        def once(fd: int, buffers: list[memoryview], offset: int) -> int:
            sizes.append(len(buffers))
            if len(sizes) == 1:
                raise OSError(errno.EAGAIN, "injected")
            return real(fd, buffers, offset)

        monkeypatch.setattr(os, "pwritev", once)
        obj.flush()  # the cluster fails, its center page is retried alone
        monkeypatch.setattr(os, "pwritev", real)
        assert sizes[:2] == [4, 1]
        assert file_bytes(path) == bytes(model)
        vm.check()


def test_read_error_names_the_file_and_leaves_no_page(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "f"
    data = make_file(path, 4 * PAGE)
    vm, _ = small_vm(nframes=8)
    with vm:
        obj = vm.map_file(path)

        def failing(fd: int, buffers: list[memoryview], offset: int) -> int:
            raise OSError(errno.EIO, "injected")

        monkeypatch.setattr(os, "preadv", failing)
        with pytest.raises(DeviceError) as info:
            obj.read(PAGE, 10)
        assert str(path) in str(info.value)
        assert not obj.pages
        vm.check()
        monkeypatch.undo()
        assert obj.read(PAGE, 10) == data[PAGE : PAGE + 10]
        vm.check()


def test_asynchronous_read_ahead_keeps_windows_in_flight(tmp_path: Path) -> None:
    path = tmp_path / "f"
    data = make_file(path, 200 * PAGE + 5)
    vm, _ = small_vm(nframes=96, readaround_npages=4, free_target_nframes=40)
    with vm:
        vm.vnode_pager.readahead_max_npages = 16
        vm.vnode_pager.async_readahead_windows = 2
        obj = vm.map_file(path)
        for pindex in range(201):
            n = min(PAGE, len(data) - pindex * PAGE)
            assert obj.read(pindex * PAGE, n) == data[pindex * PAGE : pindex * PAGE + n]
            vm.check()
        stats = vm.vnode_pager.statistics()
        # Most pages came in asynchronously, ahead of the reader.
        assert stats.async_pageins > 0 and stats.async_pagein_pages > stats.pagein_pages // 2
        # On the VM's fan-out helpers: the pager starts no threads of its own.
        assert vm.fanout.calls_submitted >= stats.async_pageins
        assert vm.fanout.calls_failed == 0
        assert not [t for t in threading.enumerate() if "vnode" in t.name]
        # Closing with windows in flight waits for them.
        obj.close()
        obj = vm.map_file(path)
        assert obj.read(0, 10) == data[:10]
        assert obj.read(PAGE, 10) == data[PAGE : PAGE + 10]
        obj.close()
        assert vm.statistics().resident_npages == 0
        vm.check()


def test_read_ahead_after_the_fan_out_closed_drops_the_window(tmp_path: Path) -> None:
    path = tmp_path / "f"
    data = make_file(path, 64 * PAGE)
    vm, _ = small_vm(nframes=96, readaround_npages=4, free_target_nframes=40)
    with vm:
        vm.vnode_pager.async_readahead_windows = 2
        obj = vm.map_file(path)
        vm.fanout.close()  # as during VM.close: no helper takes new calls
        for pindex in range(64):
            assert obj.read(pindex * PAGE, PAGE) == data[pindex * PAGE : (pindex + 1) * PAGE]
            vm.check()
        assert vm.fanout.calls_submitted == 0
        obj.close()
