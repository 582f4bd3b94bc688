"""The whole VM with swap tiers against a plain bytes model, with corruption injected.

A Hypothesis state machine writes, reads, discards and closes objects on a
tiny VM whose swap devices rot (a byte flipped in a stored block) and whose
reads are damaged on the way (a byte flipped in transit). The property: no
read ever returns a wrong byte. A read either returns exactly the model's
bytes, or raises ``CorruptPage`` naming a page whose swap block was damaged
at rest; damage on the way is absorbed by the tier's second read. Reads go
through the per-access path and the batched one (``read_words``: the
devices' ``read_many``).
``check()`` runs after every step.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from typing import Any

import hypothesis.strategies as st
import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    precondition,
    rule,
)

from vmpager import VM, SwapExhausted
from vmpager.devices.faulty import FaultyDevice
from vmpager.devices.memory import MemoryDevice
from vmpager.errors import CorruptPage
from vmpager.vm.config import VMConfig
from vmpager.vm.object import VMObject

PAGE = 4096
NPAGES_MAX = 10
MAX_ROT = 5


class TieredVMModel(RuleBasedStateMachine):
    objects = Bundle("objects")
    tiers: dict[str, Any] = {}  # noqa: RUF012 (per subclass)

    def __init__(self) -> None:
        super().__init__()
        self.devices = [
            FaultyDevice(MemoryDevice(n, PAGE, name=f"ram{i}"), seed=i)
            for i, n in enumerate((32, 24))
        ]
        config = replace(
            VMConfig(),
            daemon_thread=False,
            cluster_max_npages=4,
            readaround_npages=2,
            sequential_readahead=False,
            pageout_batching=False,
            swap_free_batch_nblocks=1,
        )
        memory = 6 * PAGE + self.tiers.get("compress_pool", 0)  # 6 frames, and the pool
        self.vm = VM(memory=memory, swap=self.devices, config=config, **self.tiers)
        self.model: dict[int, bytearray] = {}
        self.live: dict[int, VMObject] = {}
        #: Pages whose swap block was damaged at rest: reads may fail, never lie.
        self.poisoned: set[tuple[int, int]] = set()
        self.rotted = 0

    def teardown(self) -> None:
        self.vm.close()

    def _range_poisoned(self, obj: VMObject, start: int, length: int) -> bool:
        first, last = start // PAGE, (start + length - 1) // PAGE
        return any((obj.oid, p) in self.poisoned for p in range(first, last + 1))

    def _failed(self, err: CorruptPage, obj: VMObject, start: int, length: int) -> None:
        assert self._range_poisoned(obj, start, length), f"corrupt page never damaged: {err}"
        assert err.object_id is not None and err.offset is not None
        assert (err.object_id, err.offset // PAGE) in self.poisoned, str(err)

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
        fill = data.draw(st.sampled_from(["byte", "mixed"]))
        if fill == "byte":
            payload = bytes([data.draw(st.integers(0, 255))]) * length
        else:  # compresses, but is not same-filled
            payload = (bytes(range(256)) * (length // 256 + 1))[:length]
        offset = pindex * PAGE + off
        try:
            obj.write(offset, payload)
        except SwapExhausted:
            return
        except CorruptPage as err:
            self._failed(err, obj, offset, length)
            return
        self.model[obj.oid][offset : offset + length] = payload
        self.poisoned.discard((obj.oid, pindex))  # dirty in memory: the bad copy is gone

    @rule(obj=objects, data=st.data())
    def read(self, obj: VMObject, data: st.DataObject) -> None:
        if obj.closed:
            return
        start = data.draw(st.integers(0, obj.size - 1))
        length = data.draw(st.integers(1, min(3 * PAGE, obj.size - start)))
        try:
            got = obj.read(start, length)
        except SwapExhausted:
            return
        except CorruptPage as err:
            self._failed(err, obj, start, length)
            return
        assert got == bytes(self.model[obj.oid][start : start + length])

    @rule(obj=objects, data=st.data())
    def discard_pages(self, obj: VMObject, data: st.DataObject) -> None:
        if obj.closed:
            return
        first = data.draw(st.integers(0, obj.npages - 1))
        count = data.draw(st.integers(1, obj.npages - first))
        obj.discard(first * PAGE, count * PAGE)
        self.model[obj.oid][first * PAGE : (first + count) * PAGE] = bytes(count * PAGE)
        for p in range(first, first + count):
            self.poisoned.discard((obj.oid, p))

    @rule(obj=consumes(objects))
    def close(self, obj: VMObject) -> None:
        obj.close()
        self.live.pop(obj.oid, None)
        self.model.pop(obj.oid, None)
        self.poisoned = {(o, p) for o, p in self.poisoned if o != obj.oid}

    @rule(npages=st.integers(1, 6))
    def pageout(self, npages: int) -> None:
        self.vm.pageout(npages)

    @precondition(lambda self: self.rotted < MAX_ROT)
    @rule(data=st.data())
    def rot_a_stored_block(self, data: st.DataObject) -> None:
        """Flip a byte of a swap block that holds a page (it may be in the pool)."""
        oids, pindexes, blks = self.vm.swap_pager.meta.owner_arrays()
        if not len(blks):
            return
        k = data.draw(st.integers(0, len(blks) - 1))
        device, dblk = self.vm.space.locate(int(blks[k]))
        assert isinstance(device, FaultyDevice)
        device.corrupt_stored([dblk], offset=data.draw(st.integers(0, PAGE - 1)))
        self.poisoned.add((int(oids[k]), int(pindexes[k])))
        self.rotted += 1

    @rule(which=st.integers(0, 1))
    def damage_the_next_read(self, which: int) -> None:
        device = self.devices[which]
        device.corrupt_reads(range(device.nblocks), times=1)

    @rule(obj=objects, data=st.data())
    def read_words(self, obj: VMObject, data: st.DataObject) -> None:
        """Batched page-ins: several pages at once, through the devices' read_many."""
        if obj.closed:
            return
        pages = data.draw(st.lists(st.integers(0, obj.npages - 1), min_size=1, max_size=6))
        offsets = [p * PAGE + 8 * data.draw(st.integers(0, PAGE // 8 - 1)) for p in pages]
        try:
            got = obj.read_words(np.array(offsets, dtype=np.int64))
        except SwapExhausted:
            return
        except CorruptPage as err:
            assert err.object_id == obj.oid and err.offset is not None
            assert (err.object_id, err.offset // PAGE) in self.poisoned, str(err)
            return
        model = self.model[obj.oid]
        for off, word in zip(offsets, got.tolist(), strict=True):
            assert word == int.from_bytes(model[off : off + 8], sys.byteorder), off

    @rule()
    def scrub(self) -> None:
        for err in self.vm.scrub().corrupt:
            assert (err.object_id, (err.offset or 0) // PAGE) in self.poisoned, str(err)

    @rule()
    def read_everything(self) -> None:
        for oid, obj in self.live.items():
            for p in range(obj.npages):
                try:
                    got = obj.read(p * PAGE, PAGE)
                except SwapExhausted:
                    continue
                except CorruptPage as err:
                    self._failed(err, obj, p * PAGE, PAGE)
                    continue
                assert got == bytes(self.model[oid][p * PAGE : (p + 1) * PAGE]), (oid, p)

    @invariant()
    def consistent(self) -> None:
        self.vm.check()


SETTINGS = settings(
    max_examples=40,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


class ChecksumModel(TieredVMModel):
    tiers = {}  # noqa: RUF012


class PoolEncryptModel(TieredVMModel):
    tiers = {"compress": "lz4", "compress_pool": 3 * PAGE, "encrypt": True}  # noqa: RUF012


ChecksumModel.TestCase.settings = SETTINGS
PoolEncryptModel.TestCase.settings = SETTINGS
TestChecksumModel = ChecksumModel.TestCase
TestPoolEncryptModel = PoolEncryptModel.TestCase
