"""The whole VM against plain bytes, with faults, held I/O and devices coming and going.

``World`` drives one tiny VM (8 frames, two small fault-injecting RAM swap
devices, no daemon thread, a ``HeldEngine`` so every asynchronous write and
every chained strategy request stays pending until the driver completes
it) and keeps a ``bytearray`` per object. Every operation runs in a worker
thread; whenever that thread waits on the VM's condition the driver
completes one pending request of its choice, in any order, maybe failing
it. After every step ``VM.check()`` runs and the data the step touched is
compared with the model:

- a write or discard that raised (``SwapExhausted``, or ``DeviceError``
  from reading a partial page) stored a prefix of its pages (writes) or
  zeroed some pages (discard), never anything else;
- a read returns the model's bytes, or ``DeviceError`` when a read fault
  was armed, and then the right bytes once the fault is gone; reads never
  raise ``SwapExhausted``.

Two drivers share ``World``: a Hypothesis state machine, and a seeded random
walk of 100,000 steps (``slow``).
"""

from __future__ import annotations

import errno
import queue
import random
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from vmpager import DeviceError, SwapExhausted
from vmpager.io.engine import HeldEngine
from vmpager.testing.worlds import PAGE, small_vm
from vmpager.vm.config import WriteErrorPolicy
from vmpager.vm.object import VMObject

T = TypeVar("T")

#: How the driver finishes a pending request: (index into pending, error or None).
Chooser = Callable[[int], tuple[int, int | None]]

MAX_NPAGES = 10
MAX_OBJECTS = 6
WRITE_ERRNOS = [errno.EAGAIN, errno.EIO, errno.ENOMEM]


class Runner:
    """Runs operations in one worker thread, completing held I/O while it waits."""

    def __init__(self, world: World) -> None:
        self._world = world
        self._todo: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            item = self._todo.get()
            if item is None:
                return
            action, box, done = item
            try:
                box.append((True, action()))
            except BaseException as exc:
                box.append((False, exc))
            done.set()

    def call(self, action: Callable[[], T]) -> T:
        box: list[tuple[bool, Any]] = []
        done = threading.Event()
        self._todo.put((action, box, done))
        world = self._world
        cond = world.vm.kernel.cond
        idle_polls = 0
        while not done.wait(0.0002):
            # The worker waits on the VM condition only for I/O (no other thread
            # uses this VM): finish one request, as chosen by the driver.
            if cond._waiters and world.engine.pending:  # type: ignore[attr-defined]
                world.complete_one()
                idle_polls = 0
            else:
                idle_polls += 1
                assert idle_polls < 100_000, "operation stuck with no I/O to complete"
        ok, value = box[0]
        if ok:
            return value  # type: ignore[no-any-return]
        raise value

    def close(self) -> None:
        self._todo.put(None)
        self._thread.join(10)


class World:
    """A tiny VM, its devices and the bytes model; every method checks what it did."""

    def __init__(
        self,
        choose: Chooser,
        *,
        layout: str = "per_device",
        policy: WriteErrorPolicy = WriteErrorPolicy.NETBSD_1_48,
    ) -> None:
        self.engine = HeldEngine()
        self.vm, self.devices = small_vm(
            nframes=8,
            swap_nblocks=[24, 16],
            faulty=True,
            engine=self.engine,
            layout=layout,
            swap_async_max=16,
            write_error_policy=policy,
        )
        self.choose = choose
        self.runner = Runner(self)
        self.objs: dict[int, VMObject] = {}
        self.model: dict[int, bytearray] = {}
        self.off: list[Any] = []  # devices swapped off
        self.read_fault_armed = False
        self.counts: dict[str, int] = {}

    def note(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    def close(self) -> None:
        self.engine.complete_all()
        self.runner.close()
        self.vm.close()

    # -- I/O completions ------------------------------------------------------

    def complete_one(self) -> None:
        index, err = self.choose(len(self.engine.pending))
        request = self.engine.pending[index]
        if err is None:
            self.engine.complete(index)
            self.note("completed")
        else:
            self.engine.complete(index, error=DeviceError(err, "held", request.blk, "injected"))
            self.note(f"completed with errno {err}")

    def _clear_read_faults(self) -> None:
        for dev in self.devices:
            dev._read_rules.clear()
        self.read_fault_armed = False

    def _device_error(self, exc: DeviceError) -> None:
        """A DeviceError reached the caller: only an armed read fault may cause it."""
        assert self.read_fault_armed, f"DeviceError with no read fault armed: {exc}"
        self._clear_read_faults()
        self.note("read error seen")

    # -- objects -----------------------------------------------------------------

    def allocate(self, npages: int) -> None:
        if len(self.objs) >= MAX_OBJECTS:
            return
        obj = self.runner.call(lambda: self.vm.allocate(npages * PAGE))
        self.objs[obj.oid] = obj
        self.model[obj.oid] = bytearray(obj.size)

    def clone(self, oid: int) -> None:
        if len(self.objs) >= MAX_OBJECTS or not hasattr(VMObject, "clone"):
            return
        obj = self.objs[oid]
        try:
            copy = self.runner.call(obj.clone)
        except SwapExhausted:
            self.note("clone refused")
            return
        self.objs[copy.oid] = copy
        self.model[copy.oid] = bytearray(self.model[oid])
        self.note("clone")

    def close_object(self, oid: int) -> None:
        obj = self.objs.pop(oid)
        del self.model[oid]
        self.runner.call(obj.close)

    def _read_back(self, obj: VMObject, offset: int, length: int) -> bytes:
        try:
            return self.runner.call(lambda: obj.read(offset, length))
        except DeviceError as exc:
            self._device_error(exc)
            return self.runner.call(lambda: obj.read(offset, length))

    def write(self, oid: int, offset: int, data: bytes) -> None:
        obj, model = self.objs[oid], self.model[oid]
        end = offset + len(data)
        old = bytes(model[offset:end])
        try:
            self.runner.call(lambda: obj.write(offset, data))
        except (SwapExhausted, DeviceError) as exc:
            if isinstance(exc, DeviceError):
                self._device_error(exc)
            else:
                self.note("write refused")
            got = self._read_back(obj, offset, len(data))
            self._check_prefix(offset, old, data, got)
            model[offset:end] = got
            return
        model[offset:end] = data
        self.note("write")

    @staticmethod
    def _segments(offset: int, length: int) -> list[tuple[int, int]]:
        """(start, end) of each page's part of [offset, offset + length), relative."""
        out = []
        pos = 0
        while pos < length:
            n = min(PAGE - (offset + pos) % PAGE, length - pos)
            out.append((pos, pos + n))
            pos += n
        return out

    def _check_prefix(self, offset: int, old: bytes, new: bytes, got: bytes) -> None:
        """A failed write stored whole pages in order, then nothing."""
        stored = True
        for a, b in self._segments(offset, len(new)):
            if stored and got[a:b] == new[a:b]:
                continue
            stored = False
            assert got[a:b] == old[a:b], f"a failed write left bytes {a}..{b} mangled"

    def read(self, oid: int, offset: int, length: int) -> None:
        obj = self.objs[oid]
        try:
            got = self.runner.call(lambda: obj.read(offset, length))
        except DeviceError as exc:
            self._device_error(exc)
            got = self.runner.call(lambda: obj.read(offset, length))
        want = bytes(self.model[oid][offset : offset + length])
        assert got == want, f"object {oid} bytes {offset}..{offset + length} differ"
        self.note("read")

    def discard(self, oid: int, offset: int, length: int) -> None:
        obj, model = self.objs[oid], self.model[oid]
        old = bytes(model[offset : offset + length])
        try:
            self.runner.call(lambda: obj.discard(offset, length))
        except (SwapExhausted, DeviceError) as exc:
            if isinstance(exc, DeviceError):
                self._device_error(exc)
            got = self._read_back(obj, offset, length)
            for a, b in self._segments(offset, length):
                assert got[a:b] in (old[a:b], bytes(b - a)), "a failed discard mangled data"
            model[offset : offset + length] = got
            self.note("discard refused")
            return
        model[offset : offset + length] = bytes(length)
        self.note("discard")

    def reserve(self, oid: int, offset: int, length: int) -> None:
        obj = self.objs[oid]
        if not hasattr(obj, "reserve"):
            return
        try:
            self.runner.call(lambda: obj.reserve(offset, length))
            self.note("reserve")
        except SwapExhausted:
            self.note("reserve refused")

    # -- paging and devices ----------------------------------------------------------

    def pageout(self, npages: int, asynchronous: bool) -> None:
        self.runner.call(lambda: self.vm.pageout(npages, asynchronous=asynchronous))
        self.note("pageout async" if asynchronous else "pageout sync")

    def set_async_max(self, value: int) -> None:
        assert self.vm.set_swap_async_max(value) == min(max(value, 1), 16)

    def fail_next_write(self, which: int, err: int, times: int) -> None:
        dev = self.devices[which]
        dev.fail_writes(range(dev.nblocks), err, times=times)

    def fail_next_read(self, which: int) -> None:
        dev = self.devices[which]
        dev.fail_reads(range(dev.nblocks), errno.EIO, times=1)
        self.read_fault_armed = True

    def swapoff(self, which: int, force: bool) -> None:
        dev = self.devices[which]
        if dev in self.off:
            return
        try:
            self.runner.call(lambda: self.vm.swapoff(dev.name, force=force))
        except SwapExhausted:
            self.note("swapoff refused")
            return
        except DeviceError as exc:
            self._device_error(exc)
            return
        self.off.append(dev)
        self.note("swapoff")

    def swapon(self, which: int) -> None:
        dev = self.devices[which]
        if dev not in self.off:
            return
        self.runner.call(lambda: self.vm.swapon(dev))
        self.off.remove(dev)
        self.note("swapon")

    def read_everything(self) -> None:
        while self.engine.pending:
            self.complete_one()
        self._clear_read_faults()
        for oid in list(self.objs):
            self.read(oid, 0, self.objs[oid].size)

    def check(self) -> None:
        self.vm.check()
        assert self.vm.statistics().swap_bad_blocks == sum(d.bad for d in self.vm.swapinfo())


# -- the Hypothesis state machine -------------------------------------------------------


class VMLongModel(RuleBasedStateMachine):
    layout = "per_device"
    policy = WriteErrorPolicy.NETBSD_1_48

    def __init__(self) -> None:
        super().__init__()
        self._data: st.DataObject | None = None
        self.world = World(self._choose, layout=self.layout, policy=self.policy)

    def _choose(self, npending: int) -> tuple[int, int | None]:
        assert self._data is not None
        index = self._data.draw(st.integers(0, npending - 1), label="complete")
        err = self._data.draw(
            st.sampled_from([None, None, None, errno.EAGAIN, errno.EIO]), label="error"
        )
        return index, err

    def teardown(self) -> None:
        self.world.close()

    def _oid(self, data: st.DataObject) -> int | None:
        if not self.world.objs:
            return None
        return data.draw(st.sampled_from(sorted(self.world.objs)), label="object")

    def _range(self, data: st.DataObject, oid: int, max_pages: int = 2) -> tuple[int, int]:
        size = self.world.objs[oid].size
        start = data.draw(
            st.one_of(
                st.integers(0, size - 1),
                st.integers(0, size // PAGE - 1).map(lambda p: p * PAGE),
            ),
            label="offset",
        )
        length = data.draw(st.integers(1, min(max_pages * PAGE, size - start)), label="length")
        return start, length

    @rule(npages=st.integers(1, MAX_NPAGES))
    def allocate(self, npages: int) -> None:
        self.world.allocate(npages)

    @rule(data=st.data())
    def write(self, data: st.DataObject) -> None:
        self._data = data
        oid = self._oid(data)
        if oid is None:
            return
        start, length = self._range(data, oid)
        byte = data.draw(st.integers(1, 255), label="byte")
        self.world.write(oid, start, bytes([byte]) * length)

    @rule(data=st.data())
    def read(self, data: st.DataObject) -> None:
        self._data = data
        oid = self._oid(data)
        if oid is not None:
            self.world.read(oid, *self._range(data, oid, max_pages=3))

    @rule(data=st.data())
    def discard(self, data: st.DataObject) -> None:
        self._data = data
        oid = self._oid(data)
        if oid is not None:
            self.world.discard(oid, *self._range(data, oid, max_pages=4))

    @rule(data=st.data())
    def clone(self, data: st.DataObject) -> None:
        self._data = data
        oid = self._oid(data)
        if oid is not None:
            self.world.clone(oid)

    @rule(data=st.data())
    def close(self, data: st.DataObject) -> None:
        self._data = data
        oid = self._oid(data)
        if oid is not None:
            self.world.close_object(oid)

    @rule(data=st.data())
    def reserve(self, data: st.DataObject) -> None:
        self._data = data
        oid = self._oid(data)
        if oid is not None:
            self.world.reserve(oid, *self._range(data, oid, max_pages=4))

    @rule(data=st.data(), npages=st.integers(1, 8), asynchronous=st.booleans())
    def pageout(self, data: st.DataObject, npages: int, asynchronous: bool) -> None:
        self._data = data
        self.world.pageout(npages, asynchronous)

    @precondition(lambda self: self.world.engine.pending)
    @rule(data=st.data())
    def complete(self, data: st.DataObject) -> None:
        self._data = data
        self.world.complete_one()

    @rule(value=st.integers(0, 20))
    def set_async_max(self, value: int) -> None:
        self.world.set_async_max(value)

    @rule(which=st.integers(0, 1), err=st.sampled_from(WRITE_ERRNOS), times=st.integers(1, 2))
    def fail_next_write(self, which: int, err: int, times: int) -> None:
        self.world.fail_next_write(which, err, times)

    @precondition(lambda self: not self.world.read_fault_armed)
    @rule(which=st.integers(0, 1))
    def fail_next_read(self, which: int) -> None:
        self.world.fail_next_read(which)

    @rule(data=st.data(), which=st.integers(0, 1), force=st.booleans())
    def swapoff(self, data: st.DataObject, which: int, force: bool) -> None:
        self._data = data
        self.world.swapoff(which, force)

    @rule(which=st.integers(0, 1))
    def swapon(self, which: int) -> None:
        self.world.swapon(which)

    @rule(data=st.data())
    def read_everything(self, data: st.DataObject) -> None:
        self._data = data
        self.world.read_everything()

    @invariant()
    def consistent(self) -> None:
        self.world.check()


_SETTINGS = settings(
    max_examples=40,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

VMLongModel.TestCase.settings = _SETTINGS
TestVMLongModel = VMLongModel.TestCase


class VMLongModelStripeNetBSD(VMLongModel):
    layout = "stripe"
    policy = WriteErrorPolicy.NETBSD


VMLongModelStripeNetBSD.TestCase.settings = settings(_SETTINGS, max_examples=20)
TestVMLongModelStripeNetBSD = VMLongModelStripeNetBSD.TestCase


class VMLongModelFreeBSD(VMLongModel):
    policy = WriteErrorPolicy.FREEBSD


VMLongModelFreeBSD.TestCase.settings = settings(_SETTINGS, max_examples=20)
TestVMLongModelFreeBSD = VMLongModelFreeBSD.TestCase


# -- the seeded long walk ---------------------------------------------------------------


def random_walk(seed: int, nsteps: int, *, layout: str, policy: WriteErrorPolicy) -> World:
    """``nsteps`` random operations on a World, ``check()`` after each; returns the World."""
    rng = random.Random(seed)

    def choose(npending: int) -> tuple[int, int | None]:
        err = rng.choice([errno.EAGAIN, errno.EIO]) if rng.random() < 0.15 else None
        return rng.randrange(npending), err

    world = World(choose, layout=layout, policy=policy)
    try:
        for _step in range(nsteps):
            r = rng.random()
            objs = sorted(world.objs)
            if not objs or r < 0.03:
                world.allocate(rng.randint(1, MAX_NPAGES))
            else:
                oid = rng.choice(objs)
                size = world.objs[oid].size
                start = (
                    rng.randrange(size)
                    if rng.random() < 0.6
                    else rng.randrange(size // PAGE) * PAGE
                )
                length = rng.randint(1, min(2 * PAGE, size - start))
                if r < 0.40:
                    world.write(oid, start, bytes([rng.randint(1, 255)]) * length)
                elif r < 0.65:
                    world.read(oid, start, length)
                elif r < 0.69:
                    world.discard(oid, start, length)
                elif r < 0.71:
                    world.clone(oid)
                elif r < 0.725:
                    world.close_object(oid)
                elif r < 0.735:
                    world.reserve(oid, start, length)
                elif r < 0.80:
                    world.pageout(rng.randint(1, 8), rng.random() < 0.5)
                elif r < 0.88:
                    if world.engine.pending:
                        world.complete_one()
                elif r < 0.90:
                    world.set_async_max(rng.randint(1, 8))
                elif r < 0.93:
                    world.fail_next_write(
                        rng.randrange(2), rng.choice(WRITE_ERRNOS), rng.randint(1, 2)
                    )
                elif r < 0.945:
                    if not world.read_fault_armed:
                        world.fail_next_read(rng.randrange(2))
                elif r < 0.955:
                    world.swapoff(rng.randrange(2), rng.random() < 0.3)
                elif r < 0.97:
                    world.swapon(rng.randrange(2))
                elif r < 0.972:
                    world.read_everything()
            world.check()
        world.read_everything()
        world.check()
    except BaseException:
        world.close()
        raise
    return world


def test_random_walk_short() -> None:
    world = random_walk(1, 3000, layout="per_device", policy=WriteErrorPolicy.NETBSD_1_48)
    counts = world.counts
    world.close()
    for what in ("write", "read", "pageout async", "completed", "clone", "swapoff"):
        assert counts.get(what, 0) > 0, (what, counts)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    ("seed", "layout", "policy"),
    [
        (100, "per_device", WriteErrorPolicy.NETBSD_1_48),
        (200, "stripe", WriteErrorPolicy.NETBSD),
        (300, "per_device", WriteErrorPolicy.FREEBSD),
    ],
)
def test_random_walk_long(seed: int, layout: str, policy: WriteErrorPolicy) -> None:
    """100,000 steps: faults, held I/O in any order, swapoff/swapon, swap full, clones."""
    world = random_walk(seed, 100_000, layout=layout, policy=policy)
    counts = world.counts
    stats = world.vm.statistics()
    world.close()
    for what in (
        "write",
        "write refused",
        "read",
        "read error seen",
        "discard",
        "clone",
        "pageout sync",
        "pageout async",
        "completed",
        "swapoff",
        "swapon",
    ):
        assert counts.get(what, 0) > 0, (what, counts)
    assert stats.write_errors > 0
