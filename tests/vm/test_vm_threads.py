"""Many threads on one small VM: no deadlock, no lost write, invariants hold throughout.

Eight threads each own a private object and a disjoint range of a shared
object; they write, read back, discard and re-read at random while the page
daemon runs (its own thread, or each faulting thread in turn) and a checker
thread calls ``VM.check()``. Each thread verifies its own pages against its
own model, so any lost or misplaced write is caught by the thread that made
it. Every test has a timeout: a deadlock fails it instead of hanging.
"""

from __future__ import annotations

import errno
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from vmpager import SwapExhausted
from vmpager.devices.faulty import FaultyDevice
from vmpager.devices.file import FileDevice
from vmpager.testing.worlds import PAGE, small_vm
from vmpager.vm.config import VMConfig
from vmpager.vm.object import VMObject
from vmpager.vm.system import VM

pytestmark = pytest.mark.timeout(180)

NTHREADS = 8
PRIVATE_NPAGES = 24
SHARED_SLICE_NPAGES = 12


@dataclass
class Worker:
    """One thread's objects, its slice of the shared object and its models."""

    index: int
    private: VMObject
    shared: VMObject
    first: int  # first page of the slice in the shared object
    private_model: bytearray = field(default_factory=bytearray)
    shared_model: bytearray = field(default_factory=bytearray)
    ops: int = 0
    exhausted: int = 0


def stamp(worker: int, serial: int, length: int) -> bytes:
    """Bytes no other write produces: the writer and a serial number, repeated."""
    unit = bytes([worker + 1]) + serial.to_bytes(4, "little") + b"\xa5"
    return (unit * (length // len(unit) + 1))[:length]


def run_worker(w: Worker, nops: int, seed: int, errors: list[BaseException]) -> None:
    rng = random.Random(seed)
    serial = 0
    try:
        for _ in range(nops):
            shared = rng.random() < 0.5
            obj = w.shared if shared else w.private
            model = w.shared_model if shared else w.private_model
            base = w.first * PAGE if shared else 0
            npages = len(model) // PAGE
            start = rng.randrange(len(model))
            length = rng.randrange(1, min(2 * PAGE, len(model) - start) + 1)
            action = rng.random()
            w.ops += 1
            if action < 0.5:
                serial += 1
                data = stamp(w.index, serial, length)
                try:
                    obj.write(base + start, data)
                except SwapExhausted:
                    # A write that raised may have stored a prefix page by page;
                    # learn what is there now, under this thread's own range.
                    w.exhausted += 1
                    model[start : start + length] = obj.read(base + start, length)
                    continue
                model[start : start + length] = data
            elif action < 0.9:
                got = obj.read(base + start, length)
                assert got == bytes(model[start : start + length]), (
                    f"thread {w.index}: {'shared' if shared else 'private'} "
                    f"bytes {start}..{start + length} differ"
                )
            else:
                first = rng.randrange(npages)
                count = rng.randrange(1, npages - first + 1)
                obj.discard(base + first * PAGE, count * PAGE)
                model[first * PAGE : (first + count) * PAGE] = bytes(count * PAGE)
        # Final check of everything this thread owns.
        assert w.private.read(0, len(w.private_model)) == bytes(w.private_model)
        got = w.shared.read(w.first * PAGE, len(w.shared_model))
        assert got == bytes(w.shared_model), f"thread {w.index}: shared slice differs"
    except BaseException as exc:
        errors.append(exc)


def run_threads(vm: VM, nops: int, seed: int = 0) -> list[Worker]:
    shared = vm.allocate(NTHREADS * SHARED_SLICE_NPAGES * PAGE)
    workers = []
    for i in range(NTHREADS):
        w = Worker(i, vm.allocate(PRIVATE_NPAGES * PAGE), shared, i * SHARED_SLICE_NPAGES)
        w.private_model = bytearray(PRIVATE_NPAGES * PAGE)
        w.shared_model = bytearray(SHARED_SLICE_NPAGES * PAGE)
        workers.append(w)
    errors: list[BaseException] = []
    stop = threading.Event()
    checks = 0

    def checker() -> None:
        nonlocal checks
        try:
            while not stop.is_set():
                vm.check()
                checks += 1
                time.sleep(0.01)
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=run_worker, args=(w, nops, seed * 100 + w.index, errors))
        for w in workers
    ]
    check_thread = threading.Thread(target=checker)
    check_thread.start()
    for t in threads:
        t.start()
    deadline = time.monotonic() + 150
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    stop.set()
    check_thread.join(10)
    assert not any(t.is_alive() for t in threads), "deadlock: worker threads did not finish"
    if errors:
        raise errors[0]
    assert checks > 0
    vm.check()
    return workers


def test_threads_with_the_daemon_thread() -> None:
    vm, _ = small_vm(nframes=24, swap_nblocks=512, daemon_thread=True)
    with vm:
        workers = run_threads(vm, nops=600)
        stats = vm.statistics()
        assert stats.pageout_pages > 100, "the budget is small: paging must happen"
        assert stats.pagein_pages > 50
        assert stats.resident_npages <= stats.nframes
        assert sum(w.exhausted for w in workers) == 0


def test_threads_each_running_the_scan_themselves() -> None:
    """No daemon thread: every faulting thread pages out synchronously, concurrently."""
    vm, _ = small_vm(nframes=24, swap_nblocks=512, daemon_thread=False)
    with vm:
        workers = run_threads(vm, nops=400, seed=1)
        assert vm.statistics().pageout_pages > 100
        assert sum(w.exhausted for w in workers) == 0


def test_threads_on_a_real_vm_with_a_swap_file(tmp_path: Path) -> None:
    config = VMConfig(cluster_max_npages=8, readaround_npages=4)
    with VM(memory=32 * PAGE, swap=[str(tmp_path / "swap") + ":4M"], config=config) as vm:
        run_threads(vm, nops=400, seed=2)
        assert vm.statistics().pageout_pages > 100
    assert (tmp_path / "swap").exists()


def test_threads_with_slow_failing_devices_and_a_daemon() -> None:
    """Transient and hard write errors plus latency on two devices while 8 threads work."""
    vm, devices = small_vm(
        nframes=24, swap_nblocks=[384, 384], faulty=True, daemon_thread=True, swap_async_max=2
    )
    for dev in devices:
        dev.write_error_rate = 0.05  # EIO: hard
        dev.latency_s = 0.0005
    devices[1].fail_writes(range(devices[1].nblocks), errno.EAGAIN, times=20)
    with vm:
        run_threads(vm, nops=300, seed=3)
        stats = vm.statistics()
        assert stats.write_errors > 0
        assert stats.swap_bad_blocks == stats.bad_blocks_marked
        for dev in devices:
            dev.clear_faults()
        vm.check()


def test_threads_until_swap_is_full() -> None:
    """Swap smaller than the data: writes raise SwapExhausted, nothing written is lost."""
    vm, _ = small_vm(nframes=24, swap_nblocks=96, daemon_thread=True)
    with vm:
        workers = run_threads(vm, nops=400, seed=4)
        assert sum(w.exhausted for w in workers) > 0
        assert vm.statistics().swap_exhausted > 0


def test_objects_created_and_closed_while_others_page() -> None:
    vm, _ = small_vm(nframes=16, swap_nblocks=256, daemon_thread=True)
    errors: list[BaseException] = []

    def churn(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(60):
                obj = vm.allocate(rng.randrange(1, 12) * PAGE)
                data = bytes([seed + 1]) * obj.size
                obj.write(0, data)
                if rng.random() < 0.5:
                    assert obj.read(0, obj.size) == data
                obj.close()
        except BaseException as exc:
            errors.append(exc)

    with vm:
        keeper = vm.allocate(32 * PAGE)
        keeper_data = bytes(range(256)) * (32 * PAGE // 256)
        keeper.write(0, keeper_data)
        threads = [threading.Thread(target=churn, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads), "deadlock"
        assert not errors, errors
        assert keeper.read(0, keeper.size) == keeper_data
        stats = vm.statistics()
        assert stats.objects == 1
        assert stats.swap_used_blocks <= 32
        vm.check()


def test_faulty_wrapper_over_a_file_device_under_threads(tmp_path: Path) -> None:
    device = FaultyDevice(FileDevice(tmp_path / "swap", 512), seed=7, latency_s=0.0002)
    config = VMConfig(cluster_max_npages=4, readaround_npages=2)
    with VM(memory=24 * PAGE, swap=[device], config=config) as vm:
        run_threads(vm, nops=250, seed=5)
    device.close()
