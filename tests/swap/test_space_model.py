"""Model-based test of SwapSpace against a plain model of devices and block states.

The model keeps, per device, the state of every block (free, used, bad),
whether it is draining, and knows on its own which global block numbers
exist: in the stripe layout by the interleave formula, in the per_device
layout from the slice each device was given (checked to leave a gap). It
predicts whether an allocation can succeed and how long the run must be,
the almost-full / full hysteresis, and every count; the space's ``check()``
runs after every step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from vmpager.devices.memory import MemoryDevice
from vmpager.swap.space import SwapSpace

STRIPE = 4
MAX_DEVICES = 3
LOW_WATER = 3
HIGH_WATER = 6


@dataclass
class ModelDevice:
    name: str
    index: int
    base: int  # per_device layout only
    state: list[str]
    draining: bool = False
    device: MemoryDevice | None = field(default=None, repr=False)

    @property
    def nblocks(self) -> int:
        return len(self.state)

    def count(self, what: str) -> int:
        return self.state.count(what)


class SwapSpaceMachine(RuleBasedStateMachine):
    layout = "per_device"

    def __init__(self) -> None:
        super().__init__()
        self.space = SwapSpace(
            layout=self.layout,  # type: ignore[arg-type]
            stripe_blocks=STRIPE,
            max_devices=MAX_DEVICES,
            low_water=LOW_WATER,
            high_water=HIGH_WATER,
        )
        self.devices: dict[int, ModelDevice] = {}
        self.serial = 0
        self.almost_full = False
        self.full = False

    # -- the model's own block numbering ---------------------------------------

    def where(self, blk: int) -> tuple[ModelDevice, int] | None:
        if self.layout == "stripe":
            stripe, offset = divmod(blk, STRIPE)
            dev = self.devices.get(stripe % MAX_DEVICES)
            dblk = stripe // MAX_DEVICES * STRIPE + offset
            if dev is not None and dblk < dev.nblocks:
                return dev, dblk
            return None
        for dev in self.devices.values():
            if dev.base <= blk < dev.base + dev.nblocks:
                return dev, blk - dev.base
        return None

    def global_block(self, dev: ModelDevice, dblk: int) -> int:
        if self.layout == "stripe":
            return (dblk // STRIPE * MAX_DEVICES + dev.index) * STRIPE + dblk % STRIPE
        return dev.base + dblk

    def free_count(self) -> int:
        return sum(d.count("free") for d in self.devices.values() if not d.draining)

    def sizecheck(self) -> None:
        free = self.free_count()
        if free < LOW_WATER:
            self.almost_full = True
        else:
            self.full = False
            if free > HIGH_WATER:
                self.almost_full = False

    def longest_free_run(self) -> int:
        longest = 0
        for dev in self.devices.values():
            if dev.draining:
                continue
            run = 0
            for dblk, state in enumerate(dev.state):
                if self.layout == "stripe" and dblk % STRIPE == 0:
                    run = 0
                run = run + 1 if state == "free" else 0
                longest = max(longest, run)
        return longest

    def used_runs(self) -> list[tuple[int, int]]:
        """Maximal runs of used blocks inside one device (and one stripe), as global runs."""
        runs = []
        for dev in self.devices.values():
            start = None
            for dblk in range(dev.nblocks + 1):
                boundary = self.layout == "stripe" and dblk % STRIPE == 0
                used = dblk < dev.nblocks and dev.state[dblk] == "used"
                if start is not None and (not used or boundary):
                    runs.append((self.global_block(dev, start), dblk - start))
                    start = None
                if used and start is None:
                    start = dblk
        return sorted(runs)

    # -- rules -------------------------------------------------------------------

    @rule(nblocks=st.integers(1, 24))
    def swapon(self, nblocks: int) -> None:
        name = f"d{self.serial}"
        self.serial += 1
        device = MemoryDevice(nblocks, name=name)
        if len(self.devices) == MAX_DEVICES:
            with pytest.raises(ValueError, match="too many swap devices"):
                self.space.swapon(device)
            return
        index = self.space.swapon(device)
        assert index == min(set(range(MAX_DEVICES)) - set(self.devices))
        base = next(d.first_block for d in self.space.statistics().devices if d.index == index)
        dev = ModelDevice(name, index, base, ["free"] * nblocks, device=device)
        if self.layout == "per_device":
            for other in self.devices.values():
                apart = base + nblocks < other.base or other.base + other.nblocks < base
                assert apart, f"{dev} overlaps or touches {other}"
        self.devices[index] = dev
        self.sizecheck()

    @rule(count=st.integers(1, 10), min_count=st.integers(1, 10), exact=st.booleans())
    def alloc(self, count: int, min_count: int, exact: bool) -> None:
        floor = count if exact else min(min_count, count)
        if self.layout == "stripe":
            if floor > STRIPE:
                with pytest.raises(ValueError, match="cannot fit in a stripe"):
                    self.space.alloc(count, min_count=floor)
                return
            count = min(count, STRIPE)
        longest = self.longest_free_run()
        got = self.space.alloc(count, min_count=floor)
        if longest < floor:
            assert got is None, f"allocated {got} but the longest free run is {longest}"
            self.full = True
            self.almost_full = True
            return
        assert got is not None, f"no run of {floor} found, but a run of {longest} is free"
        if longest < count:
            # An intermediate size failed: that alone marks the space full
            # (swp_pager_getswapspace); the allocation's sizecheck may clear it.
            self.full = True
            self.almost_full = True
        blk, n = got
        assert floor <= n <= count
        if longest >= count:
            assert n == count, f"a run of {count} was free, but {n} were handed out"
        first = self.where(blk)
        assert first is not None, f"block {blk} does not exist"
        dev, dblk = first
        assert not dev.draining, f"allocated on draining {dev.name}"
        for i in range(n):
            assert self.where(blk + i) == (dev, dblk + i), f"run {got} leaves {dev.name}"
            assert dev.state[dblk + i] == "free", f"block {blk + i} was {dev.state[dblk + i]}"
            dev.state[dblk + i] = "used"
        if self.layout == "stripe":
            assert blk // STRIPE == (blk + n - 1) // STRIPE, f"run {got} crosses a stripe"
        self.sizecheck()

    def _pick_used_piece(self, data: st.DataObject) -> tuple[int, int]:
        runs = self.used_runs()
        blk, n = runs[data.draw(st.integers(0, len(runs) - 1))]
        offset = data.draw(st.integers(0, n - 1))
        length = data.draw(st.integers(1, n - offset))
        return blk + offset, length

    @precondition(lambda self: self.used_runs())
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        blk, n = self._pick_used_piece(data)
        self.space.free(blk, n)
        for i in range(n):
            where = self.where(blk + i)
            assert where is not None
            where[0].state[where[1]] = "free"
        self.sizecheck()

    @precondition(lambda self: self.used_runs())
    @rule(data=st.data())
    def mark_bad(self, data: st.DataObject) -> None:
        blk, n = self._pick_used_piece(data)
        self.space.mark_bad(blk, n)
        for i in range(n):
            where = self.where(blk + i)
            assert where is not None
            where[0].state[where[1]] = "bad"

    @precondition(lambda self: self.devices)
    @rule(data=st.data())
    def free_what_is_not_allocated(self, data: st.DataObject) -> None:
        dev = data.draw(st.sampled_from(sorted(self.devices.values(), key=lambda d: d.index)))
        dblk = data.draw(st.integers(0, dev.nblocks - 1))
        blk = self.global_block(dev, dblk)
        if dev.state[dblk] == "used":
            return
        with pytest.raises(ValueError, match="not allocated"):
            self.space.free(blk, 1)

    @rule(blk=st.integers(0, 200))
    def free_a_missing_block(self, blk: int) -> None:
        if self.where(blk) is None:
            with pytest.raises(ValueError, match="not on any swap device"):
                self.space.free(blk, 1)

    def _pick_device(self, data: st.DataObject) -> ModelDevice:
        return data.draw(st.sampled_from(sorted(self.devices.values(), key=lambda d: d.index)))

    @precondition(lambda self: self.devices)
    @rule(data=st.data(), by_name=st.booleans())
    def swapoff_begin(self, data: st.DataObject, by_name: bool) -> None:
        dev = self._pick_device(data)
        self.space.swapoff_begin(dev.name if by_name else dev.index)
        if not dev.draining:  # a repeated begin changes nothing, not even the water marks
            dev.draining = True
            self.sizecheck()

    @precondition(lambda self: self.devices)
    @rule(data=st.data())
    def swapoff_cancel(self, data: st.DataObject) -> None:
        dev = self._pick_device(data)
        self.space.swapoff_cancel(dev.index)
        if dev.draining:
            dev.draining = False
            self.sizecheck()

    @precondition(lambda self: self.devices)
    @rule(data=st.data())
    def swapoff_finish(self, data: st.DataObject) -> None:
        dev = self._pick_device(data)
        if dev.count("used"):
            with pytest.raises(ValueError, match="still in use"):
                self.space.swapoff_finish(dev.name)
            return
        assert self.space.swapoff_finish(dev.name) is dev.device
        del self.devices[dev.index]
        self.sizecheck()

    # -- invariants -----------------------------------------------------------------

    @invariant()
    def space_checks(self) -> None:
        self.space.check()

    @invariant()
    def counts_match(self) -> None:
        stats = self.space.statistics()
        free = self.free_count()
        used = sum(d.count("used") for d in self.devices.values())
        bad = sum(d.count("bad") for d in self.devices.values())
        assert (stats.free, stats.used, stats.bad, stats.total) == (
            free,
            used,
            bad,
            free + used + bad,
        )
        assert (stats.almost_full, stats.full) == (self.almost_full, self.full)
        by_index = {d.index: d for d in stats.devices}
        assert set(by_index) == set(self.devices)
        for index, dev in self.devices.items():
            got = by_index[index]
            assert (got.name, got.total, got.used, got.bad, got.free, got.draining) == (
                dev.name,
                dev.nblocks,
                dev.count("used"),
                dev.count("bad"),
                dev.count("free"),
                dev.draining,
            )
            in_use = sorted(self.space.blocks_in_use(index).tolist())
            expected = [self.global_block(dev, b) for b, s in enumerate(dev.state) if s == "used"]
            assert in_use == sorted(expected)

    @invariant()
    def block_numbers_match(self) -> None:
        for blk in range(0, 130):
            where = self.where(blk)
            if where is None:
                with pytest.raises(ValueError):
                    self.space.locate(blk)
                continue
            dev, dblk = where
            assert self.space.locate(blk) == (dev.device, dblk)
            limit = dev.nblocks - dblk
            if self.layout == "stripe":
                limit = min(limit, STRIPE - blk % STRIPE)
            assert self.space.run_limit(blk) == limit

    def teardown(self) -> None:
        for dev in self.devices.values():
            assert dev.device is not None
            dev.device.close()


class PerDeviceMachine(SwapSpaceMachine):
    layout = "per_device"


class StripeMachine(SwapSpaceMachine):
    layout = "stripe"


_settings = settings(max_examples=60, stateful_step_count=40, deadline=None, derandomize=True)

TestPerDeviceSpace = PerDeviceMachine.TestCase
TestPerDeviceSpace.settings = _settings
TestStripeSpace = StripeMachine.TestCase
TestStripeSpace.settings = _settings
