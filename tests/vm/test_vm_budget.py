"""The memory budget holds: frames never exceed it, and swapped pages are not in the OS cache."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import pytest

from vmpager import VM
from vmpager.testing.pagecache import cached_pages

PAGE = 4096


def test_budget_and_swap_file_out_of_the_page_cache(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    canary.write_bytes(os.urandom(16 * mmap.PAGESIZE))
    seen = cached_pages(canary)
    if seen is None or seen < 16:
        pytest.skip(f"mincore does not see page-cache pages here (saw {seen})")
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
        assert cached_pages(swap) <= 16, cached_pages(swap)
        assert obj.read(100 * PAGE, 8) != bytes(8)
        vm.check()
