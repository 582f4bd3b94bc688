"""Failed swap writes under each write-error policy, synchronous and asynchronous.

- NETBSD_1_48: EAGAIN is transient (the cluster is dropped, its blocks go back to the
  pool, the one page asked for is retried alone); any other errno marks the
  blocks bad, and the pages stay dirty and resident.
- NETBSD: ENOMEM is transient; everything else marks bad.
- FREEBSD: blocks are never marked bad; EAGAIN is retried like NETBSD_1_48, any other
  error frees the blocks and leaves the pages dirty for a later try.

Every path must lose nothing, keep the counters right, never hand a bad block
out again, and put the page elsewhere on its next pageout.
"""

from __future__ import annotations

import errno
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

import pytest

from vmpager import DeviceError, SwapExhausted
from vmpager.io.engine import HeldEngine
from vmpager.swap.meta import SWAPBLK_NONE
from vmpager.testing.worlds import PAGE, small_vm
from vmpager.vm.config import WriteErrorPolicy
from vmpager.vm.object import VMObject
from vmpager.vm.page import QUEUE_ACTIVE
from vmpager.vm.system import VM

pytestmark = pytest.mark.timeout(60)

T = TypeVar("T")

NETBSD_1_48 = WriteErrorPolicy.NETBSD_1_48
NETBSD, FREEBSD = WriteErrorPolicy.NETBSD, WriteErrorPolicy.FREEBSD


@dataclass(frozen=True)
class Expect:
    policy: WriteErrorPolicy
    err: int
    transient: bool
    marks_bad: bool

    @property
    def id(self) -> str:
        return f"{self.policy.value}-{errno.errorcode[self.err]}"


CASES = [
    Expect(NETBSD_1_48, errno.EAGAIN, transient=True, marks_bad=False),
    Expect(NETBSD_1_48, errno.ENOMEM, transient=False, marks_bad=True),
    Expect(NETBSD_1_48, errno.EIO, transient=False, marks_bad=True),
    Expect(NETBSD_1_48, errno.ENOSPC, transient=False, marks_bad=True),
    Expect(NETBSD, errno.ENOMEM, transient=True, marks_bad=False),
    Expect(NETBSD, errno.EAGAIN, transient=False, marks_bad=True),
    Expect(NETBSD, errno.EIO, transient=False, marks_bad=True),
    Expect(FREEBSD, errno.EAGAIN, transient=True, marks_bad=False),
    Expect(FREEBSD, errno.ENOMEM, transient=False, marks_bad=False),
    Expect(FREEBSD, errno.EIO, transient=False, marks_bad=False),
]


def page_bytes(tag: int) -> bytes:
    return tag.to_bytes(4, "little") * (PAGE // 4)


def blocks_of(vm: VM, obj: VMObject) -> dict[int, int]:
    return dict(vm.swap_pager.meta.pages(obj.oid))


def verify(obj: VMObject, first_tag: int = 1) -> None:
    for p in range(obj.npages):
        assert obj.read(p * PAGE, PAGE) == page_bytes(first_tag + p), f"page {p} lost"


def fill(obj: VMObject, first_tag: int = 1) -> None:
    for p in range(obj.npages):
        obj.write(p * PAGE, page_bytes(first_tag + p))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_sync_pageout_write_error(case: Expect) -> None:
    vm, devices = small_vm(
        reference=True, nframes=16, swap_nblocks=32, faulty=True, write_error_policy=case.policy
    )
    dev = devices[0]
    with vm:
        obj = vm.allocate(8 * PAGE)
        fill(obj)
        # The next write request fails, wherever it goes.
        dev.fail_writes(range(dev.nblocks), case.err, times=1)
        vm.pageout(4)
        stats = vm.statistics()
        assert stats.write_errors == 1
        assert dev.statistics().injected_write_errors == 1
        first = obj.pages.get(0)
        # The oldest inactive page was the center of the failed cluster 0..3.
        if case.transient:
            # Dropped cluster; the center page was retried alone and written.
            assert stats.bad_blocks_marked == 0 and stats.swap_bad_blocks == 0
            assert blocks_of(vm, obj).get(0, SWAPBLK_NONE) != SWAPBLK_NONE
            assert first is None or not first.dirty
            assert (1, 1) in stats.cluster_histogram  # the single-page retry
            for p in (1, 2, 3):
                page = obj.pages[p]  # reactivated, maybe deactivated again by the scan
                assert page.dirty and not page.writing, page
                assert p not in blocks_of(vm, obj)
        else:
            assert stats.bad_blocks_marked == (4 if case.marks_bad else 0)
            assert stats.swap_bad_blocks == (4 if case.marks_bad else 0)
            assert (1, 1) not in stats.cluster_histogram, "no retry after a hard error"
            for p in (0, 1, 2, 3):
                page = obj.pages[p]  # never dropped: the only copy is in memory
                assert page.dirty and not page.writing, page
                assert p not in blocks_of(vm, obj)
        vm.check()
        # Nothing is lost, and the failed pages go out on the next pageout.
        verify(obj)
        vm.pageout()
        assert not obj.pages
        bad = set(range(4)) if case.marks_bad else set()
        assert not bad & set(blocks_of(vm, obj).values())
        verify(obj)
        vm.check()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_faulting_thread_pageout_write_error(case: Expect) -> None:
    """The write that needs a frame runs the scan itself; its write fails."""
    vm, devices = small_vm(
        reference=True, nframes=8, swap_nblocks=32, faulty=True, write_error_policy=case.policy
    )
    dev = devices[0]
    with vm:
        obj = vm.allocate(16 * PAGE)
        dev.fail_writes(range(dev.nblocks), case.err, times=1)
        fill(obj)  # 16 pages through 8 frames: the faulting thread pages out
        stats = vm.statistics()
        assert stats.write_errors == 1
        assert stats.frame_waits > 0
        assert stats.swap_bad_blocks == (4 if case.marks_bad else 0)
        assert stats.bad_blocks_marked == stats.swap_bad_blocks
        vm.check()
        verify(obj)
        vm.pageout()
        verify(obj)
        vm.check()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
@pytest.mark.parametrize("order", ["fail_first", "fail_last"])
def test_async_pageout_write_error(case: Expect, order: str) -> None:
    engine = HeldEngine()
    vm, _ = small_vm(
        reference=True, nframes=16, swap_nblocks=32, engine=engine, write_error_policy=case.policy
    )
    with vm:
        obj = vm.allocate(8 * PAGE)
        fill(obj)
        vm.pageout(asynchronous=True)
        assert len(engine.pending) == 2
        failed = engine.pending[0]
        failed_pages = [p.pindex for p in failed.pages]
        failed_blocks = set(range(failed.blk, failed.blk + failed.npages))
        error = DeviceError(case.err, "ram0", failed.blk, "test")
        if order == "fail_first":
            engine.complete(0, error=error)
            vm.check()
            engine.complete(0)
        else:
            engine.complete(1)
            vm.check()
            engine.complete(0, error=error)
        stats = vm.statistics()
        assert stats.write_errors == 1
        assert stats.async_writes_in_flight == 0
        assert stats.bad_blocks_marked == (len(failed_pages) if case.marks_bad else 0)
        assert stats.swap_bad_blocks == stats.bad_blocks_marked
        # No retry from a completion: every page of the failed request is dirty
        # again, active, and owns no block; the other request's pages are clean.
        owned = blocks_of(vm, obj)
        for p in range(8):
            page = obj.pages[p]
            if p in failed_pages:
                assert page.dirty and not page.writing and page.queue == QUEUE_ACTIVE, page
                assert p not in owned
            else:
                assert not page.dirty and not page.writing, page
                assert owned[p] not in failed_blocks
        assert stats.swap_used_blocks == 4
        assert stats.swap_total_blocks == 32
        vm.check()
        verify(obj)
        # The next pageout writes them again, elsewhere when the blocks are bad.
        vm.pageout(asynchronous=True)
        engine.complete_all()
        vm.pageout()
        assert not obj.pages
        if case.marks_bad:
            assert not failed_blocks & set(blocks_of(vm, obj).values())
        verify(obj)
        vm.check()


@pytest.mark.parametrize("policy", [NETBSD_1_48, NETBSD])
def test_bad_blocks_are_never_handed_out_again(policy: WriteErrorPolicy) -> None:
    vm, devices = small_vm(
        reference=True, nframes=8, swap_nblocks=24, faulty=True, write_error_policy=policy
    )
    dev = devices[0]
    with vm:
        # Blocks 4..7 fail every write, for good.
        dev.fail_writes(range(4, 8), errno.EIO)
        a = vm.allocate(4 * PAGE)
        fill(a, 1)
        vm.pageout()  # lands on blocks 0..3
        b = vm.allocate(4 * PAGE)
        fill(b, 101)
        vm.pageout()  # blocks 4..7 fail and are marked bad
        stats = vm.statistics()
        assert stats.swap_bad_blocks == 4 and stats.bad_blocks_marked == 4
        errors = dev.statistics().injected_write_errors
        assert errors == 1
        # Fill swap completely: the bad blocks stay out of use.
        c = vm.allocate(40 * PAGE)
        written = 0
        with pytest.raises(SwapExhausted):
            for p in range(40):
                c.write(p * PAGE, page_bytes(1001 + p))
                written += 1
        vm.pageout()
        assert dev.statistics().injected_write_errors == errors, "a bad block was reused"
        used = {blk for _, _, blk in vm.swap_pager.meta.items()}
        assert not used & {4, 5, 6, 7}
        assert vm.statistics().swap_used_blocks == 24 - 4
        verify(a, 1)
        verify(b, 101)
        for p in range(written):
            assert c.read(p * PAGE, PAGE) == page_bytes(1001 + p)
        vm.check()


def test_freebsd_policy_retries_the_same_blocks_later() -> None:
    """Never marked bad: once the fault clears, the blocks serve again."""
    vm, devices = small_vm(
        reference=True, nframes=8, swap_nblocks=8, faulty=True, write_error_policy=FREEBSD
    )
    dev = devices[0]
    with vm:
        dev.fail_writes(range(8), errno.EIO, times=3)
        obj = vm.allocate(8 * PAGE)
        fill(obj)
        for _ in range(3):
            vm.pageout()
        assert vm.statistics().write_errors == 3
        assert vm.statistics().swap_bad_blocks == 0
        vm.pageout()
        assert not obj.pages
        assert vm.statistics().swap_used_blocks == 8
        verify(obj)
        vm.check()


def test_retried_page_after_transient_error_survives_repeated_failures() -> None:
    """A transient error on the cluster and on the single-page retry: nothing lost."""
    vm, devices = small_vm(reference=True, nframes=16, swap_nblocks=32, faulty=True)
    dev = devices[0]
    with vm:
        obj = vm.allocate(8 * PAGE)
        fill(obj)
        dev.fail_writes(range(dev.nblocks), errno.EAGAIN, times=2)
        vm.pageout(4)
        stats = vm.statistics()
        assert stats.write_errors == 2 and stats.swap_bad_blocks == 0
        assert obj.pages[0].dirty
        vm.check()
        vm.pageout()
        verify(obj)
        vm.check()


def call_completing(
    engine: HeldEngine, rng: random.Random, action: Callable[[], T], error_rate: float = 0.3
) -> T:
    """Run ``action`` in a thread; while it waits for held writes, complete them in
    random order, failing some. Returns its result or raises its exception."""
    box: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            box.append(action())
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while True:
        thread.join(0.02)
        if not thread.is_alive():
            break
        assert time.monotonic() < deadline, "operation stuck with no held write to complete"
        if engine.pending:
            complete_one(engine, rng, error_rate)
    if failure:
        raise failure[0]
    return box[0]


def complete_one(engine: HeldEngine, rng: random.Random, error_rate: float) -> None:
    index = rng.randrange(len(engine.pending))
    if rng.random() < error_rate:
        request = engine.pending[index]
        err = rng.choice([errno.EAGAIN, errno.EIO])
        engine.complete(index, error=DeviceError(err, "ram", request.blk, "test"))
    else:
        engine.complete(index)


@pytest.mark.parametrize("seed", range(3))
def test_random_write_errors_lose_nothing(seed: int) -> None:
    """Mixed transient and hard errors at random, sync and async, against a model."""
    rng = random.Random(seed)
    engine = HeldEngine()
    vm, devices = small_vm(
        reference=True,
        nframes=8,
        swap_nblocks=[48, 48],
        faulty=True,
        engine=engine,
        layout="stripe",
    )
    model: dict[int, bytearray] = {}
    with vm:
        objs = [vm.allocate(10 * PAGE) for _ in range(3)]
        for obj in objs:
            model[obj.oid] = bytearray(obj.size)
        for step in range(200):
            obj = rng.choice(objs)
            action = rng.random()
            if action < 0.45:
                p = rng.randrange(obj.npages)
                data = bytes([rng.randrange(1, 256)]) * rng.randrange(1, PAGE)
                try:
                    call_completing(engine, rng, partial(obj.write, p * PAGE, data))
                except SwapExhausted:
                    continue
                model[obj.oid][p * PAGE : p * PAGE + len(data)] = data
            elif action < 0.55:
                dev = rng.choice(devices)
                err = rng.choice([errno.EAGAIN, errno.EIO, errno.ENOMEM])
                dev.fail_writes(range(dev.nblocks), err, times=1)
            elif action < 0.65:
                npages = rng.randrange(1, 6)
                asynchronous = rng.random() < 0.5
                call_completing(engine, rng, partial(vm.pageout, npages, asynchronous=asynchronous))
            elif action < 0.8:
                if engine.pending:
                    complete_one(engine, rng, 0.3)
            else:
                p = rng.randrange(obj.npages)
                got = call_completing(engine, rng, partial(obj.read, p * PAGE, PAGE))
                assert got == bytes(model[obj.oid][p * PAGE : (p + 1) * PAGE]), (step, p)
            vm.check()
        engine.complete_all()
        for obj in objs:
            assert obj.read(0, obj.size) == bytes(model[obj.oid])
        stats = vm.statistics()
        assert stats.write_errors > 0
        assert stats.swap_bad_blocks == stats.bad_blocks_marked
        vm.check()


def test_the_former_name_and_value_still_select_netbsd_1_48() -> None:
    assert WriteErrorPolicy.SEED is WriteErrorPolicy.NETBSD_1_48
    assert WriteErrorPolicy("seed") is WriteErrorPolicy.NETBSD_1_48
    assert WriteErrorPolicy("netbsd-1.48") is WriteErrorPolicy.NETBSD_1_48
    with pytest.raises(ValueError):
        WriteErrorPolicy("openbsd")
