"""``SwapSpace.free_many`` against ``free`` of each run: the same blocks free, the
same counts and hysteresis, the same retirements and the same errors."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmpager.devices.faulty import FaultyDevice
from vmpager.devices.memory import MemoryDevice
from vmpager.errors import CorruptPage
from vmpager.swap.space import SwapSpace
from vmpager.tiers.tier import SwapTier

BLOCK = 4096


def _space(layout: str, sizes: list[int], *, tier: bool = False, water: int = 0) -> SwapSpace:
    space = SwapSpace(
        layout=layout,  # type: ignore[arg-type]
        stripe_blocks=4,
        max_devices=4,
        low_water=water,
        high_water=2 * water,
    )
    if tier:
        space.attach_tier(SwapTier(BLOCK, integrity=True))
    for i, size in enumerate(sizes):
        space.swapon(FaultyDevice(MemoryDevice(size, BLOCK, name=f"d{i}")))
    return space


def _runs(blocks: list[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for b in blocks:
        if runs and runs[-1][0] + runs[-1][1] == b:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((b, 1))
    return runs


def _free_each_run(space: SwapSpace, blocks: list[int]) -> None:
    for start, length in _runs(blocks):
        space.free(start, length)


def _outcome(call: Any) -> str | None:
    try:
        call()
    except ValueError as error:
        return str(error)
    return None


def _same(a: SwapSpace, b: SwapSpace) -> None:
    assert a.statistics() == b.statistics()
    assert a.largest_free_run() == b.largest_free_run()
    a.check()
    b.check()


def _allocated(space: SwapSpace, count: int) -> list[int]:
    blocks: list[int] = []
    while len(blocks) < count and (got := space.alloc(min(4, count - len(blocks)))) is not None:
        blocks.extend(range(got[0], got[0] + got[1]))
    return blocks


@settings(max_examples=60, deadline=None)
@given(
    layout=st.sampled_from(["per_device", "stripe"]),
    sizes=st.lists(st.integers(8, 48), min_size=1, max_size=3),
    fill=st.integers(1, 100),
    picks=st.lists(st.integers(0, 10_000), max_size=60),
    extra=st.lists(st.integers(-2, 200), max_size=2),
    drain=st.booleans(),
    water=st.sampled_from([0, 8]),
)
def test_free_many_is_free_of_each_run(
    layout: str,
    sizes: list[int],
    fill: int,
    picks: list[int],
    extra: list[int],
    drain: bool,
    water: int,
) -> None:
    a = _space(layout, sizes, water=water)
    b = _space(layout, sizes, water=water)
    allocated = _allocated(a, fill)
    assert _allocated(b, fill) == allocated
    if drain and len(sizes) > 1:
        a.swapoff_begin(1)
        b.swapoff_begin(1)
    chosen = sorted({allocated[p % len(allocated)] for p in picks} if allocated else set())
    # Blocks not allocated (free, past the end, between devices, negative) make it fail.
    blocks = sorted(set(chosen) | set(extra)) if extra else chosen
    got = _outcome(lambda: a.free_many(blocks))
    want = _outcome(lambda: _free_each_run(b, blocks))
    assert got == want
    _same(a, b)
    # Later allocations find the same blocks.
    assert _allocated(a, 30) == _allocated(b, 30)
    _same(a, b)


def test_a_double_free_is_refused_alike() -> None:
    a, b = _space("per_device", [32]), _space("per_device", [32])
    blocks = _allocated(a, 10)
    _allocated(b, 10)
    a.free(4, 1)
    b.free(4, 1)
    got = _outcome(lambda: a.free_many(blocks))
    assert got is not None and "free" in got
    assert got == _outcome(lambda: _free_each_run(b, blocks))
    _same(a, b)


def test_unsorted_or_repeated_blocks_are_freed_as_runs_in_the_order_given() -> None:
    for blocks in ([5, 3, 4], [3, 3]):
        a, b = _space("per_device", [32]), _space("per_device", [32])
        _allocated(a, 10)
        _allocated(b, 10)
        assert _outcome(lambda: a.free_many(blocks)) == _outcome(  # noqa: B023
            lambda: _free_each_run(b, blocks)  # noqa: B023
        )
        _same(a, b)


def test_blocks_found_corrupt_are_marked_bad_not_freed(caplog: pytest.LogCaptureFixture) -> None:
    a = _space("per_device", [16, 16], tier=True)
    b = _space("per_device", [16, 16], tier=True)
    for space in (a, b):
        blocks = _allocated(space, 24)
        for blk in blocks:
            space.write(blk, [bytearray(blk.to_bytes(2, "little") * (BLOCK // 2))])
        for blk in (3, 4, 20):
            device, dblk = space.locate(blk)
            assert isinstance(device, FaultyDevice)
            device.corrupt_stored([dblk])
            with pytest.raises(CorruptPage):
                space.read_page(blk, memoryview(bytearray(BLOCK)))
    freed = [1, 2, 3, 4, 5, 19, 20, 21]
    with caplog.at_level(logging.WARNING, logger="vmpager.swap"):
        caplog.clear()
        a.free_many(freed)
        fast_log = sorted(r.getMessage() for r in caplog.records)
        caplog.clear()
        _free_each_run(b, freed)
        slow_log = sorted(r.getMessage() for r in caplog.records)
    assert fast_log == slow_log
    _same(a, b)
    assert a.statistics().bad == 3
    assert a.tier is not None and a.tier.statistics().bad_pending == 0
