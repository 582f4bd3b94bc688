"""The page daemon's scan: it must not give up while aging can still free memory."""

from __future__ import annotations

import errno
import threading

import pytest

from vmpager import SwapExhausted
from vmpager.testing.worlds import PAGE, small_vm
from vmpager.vm.config import WriteErrorPolicy

pytestmark = pytest.mark.timeout(60)


def page_bytes(tag: int) -> bytes:
    return tag.to_bytes(4, "little") * (PAGE // 4)


@pytest.mark.parametrize("rounds", [1, 5, 30])
def test_hot_pages_filling_memory_do_not_mean_swap_exhausted(rounds: int) -> None:
    """Every resident page was just used: aging takes several passes, swap is empty.

    A scan that only lowers activity counts frees nothing yet; taking that
    for "no progress" raised SwapExhausted with all of swap free.
    """
    vm, _ = small_vm(nframes=8, swap_nblocks=64)
    with vm:
        obj = vm.allocate(16 * PAGE)
        writable = vm.frames.nframes - vm.kernel.read_reserve
        for p in range(writable):
            obj.write(p * PAGE, page_bytes(p))
        for _ in range(rounds):  # every page referenced again between scans
            for p in range(writable):
                obj.read(p * PAGE, 8)
            with vm.kernel.cond:
                vm.daemon.scan(vm.frames.nframes, asynchronous=False)
        for p in range(writable):
            obj.read(p * PAGE, 8)
        obj.write(writable * PAGE, page_bytes(writable))
        for p in range(writable + 1):
            assert obj.read(p * PAGE, PAGE) == page_bytes(p)
        assert vm.statistics().swap_exhausted == 0
        vm.check()


def test_pageout_frees_what_was_asked_even_from_hot_pages() -> None:
    vm, _ = small_vm(nframes=16, swap_nblocks=64)
    with vm:
        obj = vm.allocate(8 * PAGE)
        for p in range(8):
            obj.write(p * PAGE, page_bytes(p))
        for _ in range(3):
            for p in range(8):
                obj.read(p * PAGE, 8)
            vm.pageout(0)
        before = vm.statistics().free_nframes
        freed = vm.pageout(4)
        assert freed >= 4
        assert vm.statistics().free_nframes == before + freed
        freed = vm.pageout()
        assert vm.statistics().resident_npages == 0
        for p in range(8):
            assert obj.read(p * PAGE, PAGE) == page_bytes(p)
        vm.check()


@pytest.mark.parametrize(
    ("policy", "err"),
    [
        (WriteErrorPolicy.NETBSD_1_48, errno.EAGAIN),
        (WriteErrorPolicy.NETBSD_1_48, errno.EIO),
        (WriteErrorPolicy.FREEBSD, errno.EIO),
    ],
)
def test_a_pass_whose_writes_all_failed_is_retried(policy: WriteErrorPolicy, err: int) -> None:
    """Failed writes are not exhaustion: the pages get another pass (elsewhere when
    their blocks went bad) before a write is refused."""
    vm, devices = small_vm(nframes=8, swap_nblocks=64, faulty=True, write_error_policy=policy)
    dev = devices[0]
    with vm:
        obj = vm.allocate(16 * PAGE)
        writable = vm.frames.nframes - vm.kernel.read_reserve
        for p in range(writable):
            obj.write(p * PAGE, page_bytes(p))
        dev.fail_writes(range(dev.nblocks), err, times=3)  # every write of one pass
        for p in range(writable, 16):
            obj.write(p * PAGE, page_bytes(p))
        assert dev.statistics().injected_write_errors == 3
        assert vm.statistics().write_errors == 3
        assert vm.statistics().swap_exhausted == 0
        for p in range(16):
            assert obj.read(p * PAGE, PAGE) == page_bytes(p)
        vm.check()


def test_a_device_that_fails_every_write_ends_in_swap_exhausted() -> None:
    """Retrying failed writes is bounded: the writer gets SwapExhausted, not a hang,
    and everything already written stays readable."""
    vm, devices = small_vm(
        nframes=8, swap_nblocks=64, faulty=True, write_error_policy=WriteErrorPolicy.FREEBSD
    )
    dev = devices[0]
    with vm:
        obj = vm.allocate(16 * PAGE)
        dev.fail_writes(range(dev.nblocks), errno.EIO)
        written = 0
        with pytest.raises(SwapExhausted):
            for p in range(16):
                obj.write(p * PAGE, page_bytes(p))
                written += 1
        assert written == vm.frames.nframes - vm.kernel.read_reserve
        assert vm.statistics().write_errors >= 2
        dev.clear_faults()
        for p in range(16):
            obj.write(p * PAGE, page_bytes(p))
        for p in range(16):
            assert obj.read(p * PAGE, PAGE) == page_bytes(p)
        vm.check()


def test_a_fault_after_an_asynchronous_pageout_does_not_spin_on_writes_in_flight() -> None:
    """No daemon thread, writes in flight on the threaded engine, a write needs a frame.

    The faulting thread's synchronous scan counted the writes in flight as
    frames about to be free, returned at once, and the fault retried with
    the VM lock held: the completions, which need the lock, never ran.
    """
    vm, _ = small_vm(nframes=16, swap_nblocks=128)
    obj = vm.allocate(64 * PAGE)
    for p in range(12):
        obj.write(p * PAGE, page_bytes(p))
    vm.pageout(asynchronous=True)
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            for p in range(12, 64):
                obj.write(p * PAGE, page_bytes(p))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    thread.join(20)
    assert not thread.is_alive(), "the faulting thread spins holding the VM lock"
    assert not errors, errors
    with vm:
        for p in range(64):
            assert obj.read(p * PAGE, PAGE) == page_bytes(p)
        vm.check()
