"""One swap device failing every write must not stop pageout while others have room.

A hard write error marks the failed transfer's blocks bad (NetBSD 1.48's
policy, the default); the page stays dirty and resident. The page daemon's
pass then laundered nothing, but swap has changed: the next pass allocates
other blocks, and once the failing device has no good blocks left every
pageout goes to the healthy one. The VM must keep paging (not raise
``SwapExhausted``) as long as the healthy devices and memory hold the data.
"""

from __future__ import annotations

import logging

import pytest

from vmpager.testing.worlds import PAGE, small_vm

NPAGES = 480  # more than memory, less than the healthy device (512) plus memory


@pytest.fixture(autouse=True)
def _quiet_swap_errors(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.CRITICAL, logger="vmpager")


@pytest.mark.parametrize("daemon_thread", [False, True])
@pytest.mark.parametrize(("nframes", "cluster"), [(64, 64), (32, 16)])
def test_pageout_moves_to_the_healthy_device(
    daemon_thread: bool, nframes: int, cluster: int
) -> None:
    vm, (sick, healthy) = small_vm(
        nframes=nframes,
        swap_nblocks=[512, 512],
        faulty=True,
        daemon_thread=daemon_thread,
        sequential_readahead=True,
        pageout_batching=True,
        cluster_max_npages=cluster,
        readaround_npages=8,
        swap_free_batch_nblocks=256,
    )
    sick.fail_writes(range(sick.nblocks))
    with vm:
        obj = vm.allocate(NPAGES * PAGE)
        for i in range(NPAGES):
            obj.write(i * PAGE, bytes([i % 251 + 1]) * PAGE)
        for i in range(NPAGES):
            assert obj.read(i * PAGE, PAGE) == bytes([i % 251 + 1]) * PAGE
        sick_info, healthy_info = vm.swapinfo()
        assert sick_info.used == 0 and sick_info.bad > 0
        assert healthy_info.used > 0 and healthy_info.bad == 0
        assert vm.statistics().write_errors > 0
        vm.check()
        assert healthy.statistics().write_errors == 0
