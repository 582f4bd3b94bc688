"""The VM's public behaviour on small worlds: every read returns the last write."""

from __future__ import annotations

import os

import pytest

from vmpager import InvariantViolation, ObjectClosed, SwapExhausted
from vmpager.testing.worlds import PAGE, small_vm


def page_bytes(tag: int) -> bytes:
    return tag.to_bytes(4, "little") * (PAGE // 4)


def test_zero_fill_and_round_trip_without_paging() -> None:
    vm, _ = small_vm(nframes=8)
    with vm:
        obj = vm.allocate(4 * PAGE)
        assert obj.size == 4 * PAGE
        assert obj.read(0, 100) == bytes(100)
        obj.write(10, b"hello")
        assert obj.read(8, 9) == b"\0\0hello\0\0"
        vm.check()
        stats = vm.statistics()
        assert stats.zero_fills >= 1
        assert stats.pageouts == 0


def test_object_larger_than_memory_pages_through_swap() -> None:
    vm, _ = small_vm(nframes=8, swap_nblocks=64)
    with vm:
        obj = vm.allocate(40 * PAGE)
        for p in range(40):
            obj.write(p * PAGE, page_bytes(p))
            vm.check()
        for p in reversed(range(40)):
            assert obj.read(p * PAGE, PAGE) == page_bytes(p), p
        vm.check()
        stats = vm.statistics()
        assert stats.pageout_pages >= 32
        assert stats.pagein_pages >= 1
        assert stats.resident_npages <= 8
        assert stats.swap_used_blocks > 0


def test_unaligned_reads_and_writes_across_pages() -> None:
    vm, _ = small_vm(nframes=6, swap_nblocks=64)
    model = bytearray(20 * PAGE)
    with vm:
        obj = vm.allocate(len(model))
        data = os.urandom(3 * PAGE + 123)
        for offset in (1, PAGE - 7, 5 * PAGE + 3000, 16 * PAGE + 1):
            obj.write(offset, data)
            model[offset : offset + len(data)] = data
        assert obj.read(0, len(model)) == bytes(model)
        buf = bytearray(PAGE + 10)
        obj.readinto(PAGE - 5, buf)
        assert bytes(buf) == bytes(model[PAGE - 5 : 2 * PAGE + 5])
        vm.check()


def test_redirty_frees_the_stale_swap_block() -> None:
    vm, _ = small_vm(nframes=4, swap_nblocks=64)
    with vm:
        obj = vm.allocate(16 * PAGE)
        for p in range(16):
            obj.write(p * PAGE, page_bytes(p))
        used = vm.statistics().swap_used_blocks
        assert obj.read(0, 4) == page_bytes(0)[:4]  # page 0 back in, clean, swap copy kept
        obj.write(0, b"x")  # now the swap copy is stale and must be freed
        assert vm.statistics().swap_used_blocks == used - 1
        vm.check()


def test_clean_page_is_dropped_without_a_write() -> None:
    vm, _ = small_vm(nframes=4, swap_nblocks=64, readaround_npages=0)
    with vm:
        obj = vm.allocate(8 * PAGE)
        for p in range(8):
            obj.write(p * PAGE, page_bytes(p))
        vm.pageout()  # everything on swap now
        out = vm.statistics().pageout_pages
        for p in range(8):
            assert obj.read(p * PAGE, PAGE) == page_bytes(p)
        # Reading everything back evicted clean pages only: no new writes.
        assert vm.statistics().pageout_pages == out
        vm.check()


def test_discard_gives_zeros_and_frees_swap() -> None:
    vm, _ = small_vm(nframes=4, swap_nblocks=64)
    with vm:
        obj = vm.allocate(16 * PAGE)
        for p in range(16):
            obj.write(p * PAGE, page_bytes(p + 1))
        obj.discard(2 * PAGE + 100, 10 * PAGE)
        assert obj.read(2 * PAGE, 100) == page_bytes(3)[:100]
        assert obj.read(2 * PAGE + 100, PAGE - 100) == bytes(PAGE - 100)
        for p in range(3, 12):
            assert obj.read(p * PAGE, PAGE) == bytes(PAGE), p
        assert obj.read(12 * PAGE, 100) == bytes(100)
        assert obj.read(12 * PAGE + 100, 10) == page_bytes(13)[100:110]
        vm.check()


def test_close_frees_frames_and_swap() -> None:
    vm, _ = small_vm(nframes=4, swap_nblocks=64)
    with vm:
        obj = vm.allocate(16 * PAGE)
        for p in range(16):
            obj.write(p * PAGE, page_bytes(p))
        obj.close()
        obj.close()  # idempotent
        stats = vm.statistics()
        assert stats.swap_used_blocks == 0
        assert stats.free_nframes == stats.nframes
        with pytest.raises(ObjectClosed):
            obj.read(0, 1)
        with pytest.raises(ObjectClosed):
            obj.write(0, b"x")
        vm.check()


def test_swap_exhausted_keeps_written_data() -> None:
    vm, _ = small_vm(nframes=8, swap_nblocks=8)
    with vm:
        obj = vm.allocate(64 * PAGE)
        written = 0
        with pytest.raises(SwapExhausted):
            for p in range(64):
                obj.write(p * PAGE, page_bytes(p))
                written = p + 1
        assert written >= 8
        for p in range(written):
            assert obj.read(p * PAGE, PAGE) == page_bytes(p), p
        vm.check()
        # Freeing space makes writes work again.
        obj.discard(0, 4 * PAGE)
        obj.write(written * PAGE, page_bytes(written))
        assert obj.read(written * PAGE, PAGE) == page_bytes(written)
        vm.check()


def test_bad_arguments_name_the_argument() -> None:
    vm, _ = small_vm()
    with vm:
        obj = vm.allocate(PAGE)
        with pytest.raises(ValueError, match="offset"):
            obj.read(-1, 1)
        with pytest.raises(ValueError, match="length"):
            obj.read(0, PAGE + 1)
        with pytest.raises(ValueError, match="offset"):
            obj.write(PAGE + 1, b"x")
        with pytest.raises(TypeError):
            obj.write(0, "text")  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            obj.read("0", 1)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="size"):
            vm.allocate(0)
        with pytest.raises(ValueError, match="unit"):
            vm.allocate("12Q")
        with pytest.raises(TypeError, match="writable"):
            obj.readinto(0, b"abc")
        vm.check()


def test_check_reports_a_broken_invariant_precisely() -> None:
    vm, _ = small_vm()
    with vm:
        obj = vm.allocate(4 * PAGE)
        obj.write(0, b"x")
        page = obj.pages[0]
        vm.frames.free(page.frame)  # corrupt: a resident page's frame on the free list
        with pytest.raises(InvariantViolation) as info:
            vm.check()
        assert any("free list" in p for p in info.value.problems)
        vm.frames._free.remove(page.frame)
        vm.frames._is_free[page.frame] = 0


def test_vm_argument_errors() -> None:
    from vmpager.vm.system import VM

    with pytest.raises(ValueError, match="page_size"):
        VM(memory="1M", swap=[], page_size=5000)
    with pytest.raises(ValueError, match="memory"):
        VM(memory=100, swap=[])
    with pytest.raises(ValueError, match="layout"):
        VM(memory="1M", swap=[], layout="zigzag")
    with pytest.raises(TypeError, match="swap"):
        VM(memory="1M", swap="/tmp/x:1M")  # type: ignore[arg-type]


def test_no_swap_means_memory_only() -> None:
    from dataclasses import replace

    from vmpager.vm.config import VMConfig
    from vmpager.vm.system import VM

    with VM(memory=8 * PAGE, swap=[], config=replace(VMConfig(), daemon_thread=False)) as vm:
        obj = vm.allocate(32 * PAGE)
        with pytest.raises(SwapExhausted):
            for p in range(32):
                obj.write(p * PAGE, page_bytes(p))
        assert obj.read(0, PAGE) == page_bytes(0)
        vm.check()
