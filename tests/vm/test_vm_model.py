"""The whole VM against a plain bytes model: every read returns the last write.

A Hypothesis state machine on a tiny world (a few frames, a tiny RAM swap
behind a fault-injecting wrapper) allocates, writes, reads, discards and
closes objects, runs the page daemon, and injects transient and hard write
errors and read errors; ``check()`` runs after every step.
"""

from __future__ import annotations

import errno
from collections.abc import Callable

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    precondition,
    rule,
)

from vmpager import DeviceError, SwapExhausted
from vmpager.testing.worlds import PAGE, small_vm
from vmpager.vm.config import WriteErrorPolicy
from vmpager.vm.object import VMObject

NPAGES_MAX = 12


class VMModel(RuleBasedStateMachine):
    objects = Bundle("objects")

    def __init__(self) -> None:
        super().__init__()
        self.vm, self.devices = small_vm(
            nframes=6, swap_nblocks=[24, 16], faulty=True, cluster_max_npages=4
        )
        self.model: dict[int, bytearray] = {}
        self.live: dict[int, VMObject] = {}
        self.read_errors_armed = 0

    def teardown(self) -> None:
        self.vm.close()

    @rule(target=objects, npages=st.integers(1, NPAGES_MAX))
    def allocate(self, npages: int) -> VMObject:
        obj = self.vm.allocate(npages * PAGE)
        self.model[obj.oid] = bytearray(npages * PAGE)
        self.live[obj.oid] = obj
        return obj

    @rule(obj=objects, data=st.data())
    def write(self, obj: VMObject, data: st.DataObject) -> None:
        if obj.closed:
            return
        pindex = data.draw(st.integers(0, obj.npages - 1))
        off = data.draw(st.sampled_from([0, 1, 100, PAGE - 8]))
        length = data.draw(st.integers(1, PAGE - off))
        byte = data.draw(st.integers(1, 255))
        payload = bytes([byte]) * length
        offset = pindex * PAGE + off
        try:
            self._retry_after_read_error(lambda: obj.write(offset, payload))
        except SwapExhausted:
            return  # a single-page write that raised stored nothing
        self.model[obj.oid][offset : offset + length] = payload

    def _retry_after_read_error(self, action: Callable[[], object]) -> None:
        """Run ``action``; an injected read error (old contents unreadable) fails
        it without effect, and it succeeds once the fault is gone."""
        try:
            action()
        except DeviceError:
            assert self.read_errors_armed, "read error with none injected"
            self.read_errors_armed = 0
            self._clear_read_faults()
            action()

    @rule(obj=objects, data=st.data())
    def read(self, obj: VMObject, data: st.DataObject) -> None:
        if obj.closed:
            return
        start = data.draw(st.integers(0, obj.size - 1))
        length = data.draw(st.integers(1, min(3 * PAGE, obj.size - start)))
        try:
            got = obj.read(start, length)
        except DeviceError:
            assert self.read_errors_armed, "read error with none injected"
            self.read_errors_armed = 0
            self._clear_read_faults()
            got = obj.read(start, length)  # the data is still on swap
        except SwapExhausted:
            return
        assert got == bytes(self.model[obj.oid][start : start + length])

    @rule(obj=objects, data=st.data())
    def discard(self, obj: VMObject, data: st.DataObject) -> None:
        if obj.closed:
            return
        start = data.draw(st.integers(0, obj.size - 1))
        length = data.draw(st.integers(0, obj.size - start))
        try:
            self._retry_after_read_error(lambda: obj.discard(start, length))
        except SwapExhausted:
            return  # zeroing a partial page needed a frame; nothing else was done
        self.model[obj.oid][start : start + length] = bytes(length)

    @rule(obj=consumes(objects))
    def close(self, obj: VMObject) -> None:
        obj.close()
        self.live.pop(obj.oid, None)
        self.model.pop(obj.oid, None)

    @rule(npages=st.integers(1, 6))
    def pageout(self, npages: int) -> None:
        self.vm.pageout(npages)

    @rule(which=st.integers(0, 1), kind=st.sampled_from([errno.EAGAIN, errno.EIO]))
    def fail_next_write(self, which: int, kind: int) -> None:
        dev = self.devices[which]
        dev.fail_writes(range(dev.nblocks), errno=kind, times=1)

    @precondition(lambda self: not self.read_errors_armed)
    @rule(which=st.integers(0, 1))
    def fail_next_read(self, which: int) -> None:
        dev = self.devices[which]
        dev.fail_reads(range(dev.nblocks), errno=errno.EIO, times=1)
        self.read_errors_armed = 1

    def _clear_read_faults(self) -> None:
        for dev in self.devices:
            dev._read_rules.clear()

    @rule()
    def read_everything(self) -> None:
        self.read_errors_armed = 0
        self._clear_read_faults()
        for oid, obj in self.live.items():
            try:
                got = obj.read(0, obj.size)
            except SwapExhausted:
                continue
            assert got == bytes(self.model[oid]), f"object {oid} differs from the model"

    @invariant()
    def consistent(self) -> None:
        self.vm.check()


VMModel.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestVMModel = VMModel.TestCase


class VMModelFreeBSDPolicy(VMModel):
    def __init__(self) -> None:
        super().__init__()
        self.vm.close()
        self.vm, self.devices = small_vm(
            nframes=6,
            swap_nblocks=[24, 16],
            faulty=True,
            cluster_max_npages=4,
            write_error_policy=WriteErrorPolicy.FREEBSD,
        )


VMModelFreeBSDPolicy.TestCase.settings = settings(
    max_examples=25,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestVMModelFreeBSDPolicy = VMModelFreeBSDPolicy.TestCase
