"""The memory budget is real, and a swap file is never trusted for data it was not given.

- Resident pages never exceed the frames of the budget, however large the
  objects, and the process does not keep swapped data anywhere else.
- Pages paged out through a real ``FileDevice`` are not left in the
  operating system's page cache (mincore on the swap file), with O_DIRECT
  and with the cached fallback that drops each run after I/O.
- A swap file full of old bytes (garbage, or another VM's pages) gives a new
  VM nothing: every page it never wrote reads as zeros.
"""

from __future__ import annotations

import mmap
import os
import random
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from vmpager.devices.file import FileDevice
from vmpager.testing.pagecache import cached_pages
from vmpager.vm.config import VMConfig
from vmpager.vm.system import VM

pytestmark = pytest.mark.timeout(120)

PAGE = 4096


def page_bytes(tag: int) -> bytes:
    return tag.to_bytes(4, "little") * (PAGE // 4)


# -- page cache ----------------------------------------------------------------------


@pytest.fixture
def probe(tmp_path: Path) -> Callable[[Path], int]:
    """The mincore probe, proven to see what a plain buffered write leaves in the cache."""
    canary = tmp_path / "canary"
    canary.write_bytes(os.urandom(16 * mmap.PAGESIZE))
    seen = cached_pages(canary)
    if seen is None or seen < 16:
        pytest.skip(f"mincore does not see page-cache pages here (saw {seen})")

    def pages(path: Path) -> int:
        count = cached_pages(path)
        assert count is not None
        return count

    return pages


def test_budget_and_swap_file_out_of_the_page_cache(
    tmp_path: Path, probe: Callable[[Path], int]
) -> None:
    swap = tmp_path / "swap0"
    with VM(memory="1M", swap=[f"{swap}:64M"]) as vm:
        obj = vm.allocate("16M")
        for p in range(0, 4096, 64):
            obj.write(p * PAGE, os.urandom(64 * PAGE))
        vm.pageout()
        vm.wait_idle()
        stats = vm.statistics()
        assert stats.nframes == (1 << 20) // PAGE
        assert stats.resident_npages <= stats.nframes
        assert stats.swap_used_blocks >= 4096 - stats.nframes
        assert stats.pageout_pages >= 3840
        # Everything written to the swap file went around the OS cache.
        assert probe(swap) <= 16, probe(swap)
        assert obj.read(100 * PAGE, 8) != bytes(8)
        vm.check()


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "cached"])
def test_swapped_pages_are_not_in_the_page_cache(
    tmp_path: Path, probe: Callable[[Path], int], direct: bool
) -> None:
    path = tmp_path / "swap"
    device = FileDevice(path, 1024, direct=direct)
    assert device.direct is direct
    config = VMConfig(daemon_thread=False)
    with VM(memory=32 * PAGE, swap=[device], config=config) as vm:
        obj = vm.allocate(256 * PAGE)
        for p in range(256):
            obj.write(p * PAGE, page_bytes(p))
        vm.pageout()
        stats = vm.statistics()
        assert stats.swap_used_blocks == 256
        assert stats.resident_npages == 0
        assert probe(path) == 0, "swapped pages sit in the page cache"
        # Page-ins (with read-around) leave nothing cached either.
        for p in random.Random(0).sample(range(256), 64):
            assert obj.read(p * PAGE, PAGE) == page_bytes(p)
        assert probe(path) == 0
        vm.check()
    device.close()


def test_resident_pages_never_exceed_the_budget(tmp_path: Path) -> None:
    budget_npages = 24
    config = VMConfig(cluster_max_npages=8, readaround_npages=4)
    with VM(
        memory=budget_npages * PAGE, swap=[str(tmp_path / "swap") + ":8M"], config=config
    ) as vm:
        assert vm.frames.nframes == budget_npages
        objs = [vm.allocate(300 * PAGE) for _ in range(2)]
        high = 0
        stop = threading.Event()

        def sample() -> None:
            nonlocal high
            while not stop.wait(0.0005):
                high = max(high, vm.statistics().resident_npages)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            rng = random.Random(1)
            for i, obj in enumerate(objs):
                for p in range(obj.npages):
                    obj.write(p * PAGE, page_bytes(1000 * i + p))
            for _ in range(600):
                i = rng.randrange(2)
                p = rng.randrange(300)
                assert objs[i].read(p * PAGE, PAGE) == page_bytes(1000 * i + p)
        finally:
            stop.set()
            sampler.join()
        assert 0 < high <= budget_npages
        stats = vm.statistics()
        assert stats.resident_npages + stats.free_nframes == budget_npages
        assert stats.swap_used_blocks >= 600 - budget_npages
        vm.check()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * mmap.PAGESIZE


def test_process_memory_does_not_grow_with_the_data(tmp_path: Path) -> None:
    """128 MiB written through a 4 MiB budget: the process grows by far less."""
    budget = 4 << 20
    data_bytes = 128 << 20
    chunk = np.arange(256 * PAGE // 8, dtype=np.uint64).view(np.uint8)
    config = VMConfig(cluster_max_npages=32)
    with VM(memory=budget, swap=[str(tmp_path / "swap") + ":160M"], config=config) as vm:
        obj = vm.allocate(data_bytes)
        before = _rss_bytes()
        for offset in range(0, data_bytes, len(chunk)):
            obj.write(offset, chunk)
        vm.pageout()
        grown = _rss_bytes() - before
        assert grown < 24 << 20, f"process grew by {grown >> 20} MiB for 128 MiB of data"
        assert obj.read(data_bytes - len(chunk), len(chunk)) == chunk.tobytes()
        vm.check()


# -- a reused swap file ----------------------------------------------------------------


def _garbage_file(path: Path, nblocks: int) -> None:
    rng = random.Random(7)
    with path.open("wb") as handle:
        for _ in range(nblocks):
            handle.write(rng.randbytes(PAGE))


@pytest.mark.parametrize("how", ["constructor", "swapon"])
def test_a_garbage_swap_file_gives_a_new_vm_nothing(tmp_path: Path, how: str) -> None:
    path = tmp_path / "old.swap"
    _garbage_file(path, 128)
    config = VMConfig(daemon_thread=False, readaround_npages=4)
    swap = [str(path)] if how == "constructor" else []
    with VM(memory=16 * PAGE, swap=swap, config=config) as vm:
        if how == "swapon":
            vm.swapon(str(path))
        assert vm.statistics().swap_total_blocks == 128
        obj = vm.allocate(96 * PAGE)
        # Never written: zeros, resident or not.
        assert obj.read(0, obj.size) == bytes(obj.size)
        # Every other page written (partial pages too), then everything paged out.
        model = bytearray(obj.size)
        for p in range(0, 96, 2):
            data = page_bytes(p + 1)[: PAGE - 7 * (p % 3)]
            obj.write(p * PAGE + 3, data[: PAGE - 3])
            model[p * PAGE + 3 : p * PAGE + 3 + len(data[: PAGE - 3])] = data[: PAGE - 3]
        vm.pageout()
        assert vm.statistics().resident_npages == 0
        # Read-around over the file must not pull garbage into the untouched pages.
        for p in range(96):
            assert obj.read(p * PAGE, PAGE) == bytes(model[p * PAGE : (p + 1) * PAGE]), p
        obj.discard(0, 48 * PAGE)
        model[: 48 * PAGE] = bytes(48 * PAGE)
        assert obj.read(0, obj.size) == bytes(model)
        vm.check()


def test_another_vms_pages_are_not_seen_by_the_next_vm(tmp_path: Path) -> None:
    path = tmp_path / "shared.swap"
    config = VMConfig(daemon_thread=False)
    with VM(memory=8 * PAGE, swap=[f"{path}:1M"], config=config) as first:
        obj = first.allocate(128 * PAGE)
        for p in range(128):
            obj.write(p * PAGE, page_bytes(p + 1))
        first.pageout()
        assert first.statistics().swap_used_blocks == 128
    assert path.exists() and path.stat().st_size == 1 << 20
    with VM(memory=8 * PAGE, swap=[str(path)], config=config) as second:
        obj = second.allocate(128 * PAGE)
        for p in range(128):
            assert obj.read(p * PAGE, PAGE) == bytes(PAGE), p
        obj.write(5 * PAGE + 1, b"x")
        second.pageout()
        assert obj.read(5 * PAGE, 3) == b"\0x\0"
        assert obj.read(6 * PAGE, PAGE) == bytes(PAGE)
        second.check()
