"""SwapSpace unit tests: both layouts, swapon/swapoff, bad blocks, water marks, I/O."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest

from vmpager.devices.memory import MemoryDevice
from vmpager.errors import InvariantViolation
from vmpager.swap.space import SwapSpace

BLOCK = 4096
QUIET = {"low_water": 0, "high_water": 0}


def _stripe_space(*sizes: int, stripe: int = 4, ndev: int = 3) -> SwapSpace:
    space = SwapSpace(layout="stripe", stripe_blocks=stripe, max_devices=ndev, **QUIET)
    for i, size in enumerate(sizes):
        space.swapon(MemoryDevice(size, name=f"d{i}"))
    space.check()
    return space


def _per_device_space(*sizes: int) -> SwapSpace:
    space = SwapSpace(layout="per_device", **QUIET)
    for i, size in enumerate(sizes):
        space.swapon(MemoryDevice(size, name=f"d{i}"))
    space.check()
    return space


def _drain(space: SwapSpace, count: int, min_count: int = 1) -> list[tuple[int, int]]:
    runs = []
    while (got := space.alloc(count, min_count=min_count)) is not None:
        runs.append(got)
        space.check()
    return runs


# --- stripe layout -----------------------------------------------------------


def test_stripe_mapping_interleaves_devices() -> None:
    space = _stripe_space(10, 6)  # stripe 4, 3 device slots
    devices = dict(space.devices())
    # Global stripe s is device s % 3 at device stripe s // 3.
    expected = {}
    for index, nblocks in ((0, 10), (1, 6)):
        for dblk in range(nblocks):
            g = (dblk // 4 * 3 + index) * 4 + dblk % 4
            expected[g] = (index, dblk)
    for g in range(40):
        if g in expected:
            index, dblk = expected[g]
            assert space.locate(g) == (devices[index], dblk)
            stripe_end = (g // 4 + 1) * 4
            device_end = g + devices[index].nblocks - dblk
            assert space.run_limit(g) == min(stripe_end, device_end) - g
        else:
            with pytest.raises(ValueError, match=f"swap block {g} is not on any swap device"):
                space.locate(g)
    assert space.total_blocks == space.free_blocks == 16


def test_stripe_runs_never_cross_a_stripe() -> None:
    space = _stripe_space(37, 23, 16, stripe=8)
    rng = np.random.default_rng(5)
    live: list[tuple[int, int]] = []
    for _ in range(300):
        if live and rng.random() < 0.4:
            blk, n = live.pop(int(rng.integers(len(live))))
            space.free(blk, n)
        else:
            count = int(rng.integers(1, 9))
            got = space.alloc(count, min_count=1)
            if got is None:
                continue
            blk, n = got
            assert 1 <= n <= count
            assert blk // 8 == (blk + n - 1) // 8, f"run {got} crosses a stripe"
            assert space.run_limit(blk) >= n
            live.append(got)
        space.check()
    assert space.used_blocks == sum(n for _, n in live)


def test_stripe_allocations_spread_over_devices() -> None:
    space = _stripe_space(16, 16, 16)
    devices = [space.locate(space.alloc(4)[0])[0].name for _ in range(6)]  # type: ignore[index]
    assert devices == ["d0", "d1", "d2", "d0", "d1", "d2"]


def test_stripe_caps_count_at_the_stripe() -> None:
    space = _stripe_space(16)
    assert space.alloc(10, min_count=2) == (0, 4)
    with pytest.raises(ValueError, match="cannot fit in a stripe"):
        space.alloc(5)


def test_stripe_free_across_a_stripe_boundary() -> None:
    space = _stripe_space(8, 8, ndev=2)
    runs = _drain(space, 4)
    assert sorted(runs) == [(0, 4), (4, 4), (8, 4), (12, 4)]
    space.free(2, 4)  # blocks 2, 3 on d0 and 4, 5 on d1
    space.check()
    per_device = {d.name: d.used for d in space.statistics().devices}
    assert per_device == {"d0": 6, "d1": 6}
    assert space.alloc(2) is not None


# --- per_device layout -------------------------------------------------------


def test_per_device_slices_keep_a_gap() -> None:
    space = _per_device_space(10, 5, 7)
    bases = [d.first_block for d in space.statistics().devices]
    assert bases == [0, 11, 17]
    with pytest.raises(ValueError, match="not on any swap device"):
        space.locate(10)
    assert space.run_limit(3) == 7
    assert space.run_limit(12) == 4
    assert space.locate(18)[1] == 1


def test_per_device_round_robin() -> None:
    space = _per_device_space(8, 8, 8)
    names = [space.locate(space.alloc(2)[0])[0].name for _ in range(6)]  # type: ignore[index]
    assert names == ["d0", "d1", "d2", "d0", "d1", "d2"]


def test_per_device_tries_every_device_before_halving() -> None:
    space = _per_device_space(8, 8)  # d0 is blocks 0..7, d1 blocks 9..16
    assert sum(n for _, n in _drain(space, 1)) == 16
    for blk in (0, 2, 4, 6, 9, 10):  # d0: four single blocks; d1: one run of 2
        space.free(blk, 1)
    space.check()
    assert [d.free for d in space.statistics().devices] == [4, 2]
    # The rotor points at d0, which has no run of 2: d1 serves before any halving.
    assert space.alloc(2, min_count=1) == (9, 2)
    # No run of 2 anywhere: halve to 1, starting after d1 (round-robin) -> d0.
    got = space.alloc(2, min_count=1)
    assert got is not None and got[1] == 1 and space.locate(got[0])[0].name == "d0"
    assert space.alloc(2) is None
    assert space.full


def test_per_device_halving_takes_the_longest_shorter_run() -> None:
    space = _per_device_space(16)
    assert space.alloc(4) == (0, 4)
    assert space.alloc(3) == (4, 3)
    space.free(0, 4)  # free: 0..3 and 7..15
    # 16 fails; 8 (up to 15) finds 7..15 first from the cursor: 9 blocks.
    assert space.alloc(16, min_count=2) == (7, 9)


# --- both layouts ------------------------------------------------------------


@pytest.fixture(params=["stripe", "per_device"])
def layout(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _space(layout: str, *sizes: int, **kwargs: int) -> SwapSpace:
    options = {"low_water": 0, "high_water": 0, **kwargs}
    space = SwapSpace(layout=layout, stripe_blocks=4, max_devices=4, **options)  # type: ignore[arg-type]
    for i, size in enumerate(sizes):
        space.swapon(MemoryDevice(size, name=f"d{i}"))
    return space


def test_swapon_while_in_use(layout: str) -> None:
    space = _space(layout, 8)
    first = _drain(space, 2)
    assert space.alloc(1) is None and space.full
    index = space.swapon(MemoryDevice(12, name="late"))
    assert index == 1
    assert not space.full or space.free_blocks < space.statistics().low_water
    second = _drain(space, 2)
    assert sum(n for _, n in second) == 12
    assert {space.locate(b)[0].name for b, _ in second} == {"late"}
    for blk, n in first + second:
        space.free(blk, n)
    space.check()
    assert space.free_blocks == space.total_blocks == 20


def test_swapoff_drains_and_removes(layout: str) -> None:
    space = _space(layout, 8, 8)
    runs = _drain(space, 2)
    d1_runs = [(b, n) for b, n in runs if space.locate(b)[0].name == "d1"]
    for blk, n in runs:
        if (blk, n) not in d1_runs:
            space.free(blk, n)
    space.swapoff_begin("d1")
    space.check()
    in_use = space.blocks_in_use("d1")
    assert sorted(in_use.tolist()) == sorted(b + i for b, n in d1_runs for i in range(n))
    assert space.free_blocks == 8 and space.total_blocks == 16
    # New allocations avoid the draining device.
    got = _drain(space, 2)
    assert {space.locate(b)[0].name for b, _ in got} == {"d0"}
    with pytest.raises(ValueError, match="8 blocks are still in use"):
        space.swapoff_finish(1)
    blk, n = d1_runs[0]
    space.free(blk, n)  # stays unallocatable
    space.check()
    assert space.alloc(1) is None
    assert space.total_blocks == 14
    for blk, n in d1_runs[1:]:
        space.free(blk, n)
    removed = space.swapoff_finish("d1")
    assert removed.name == "d1"
    space.check()
    assert [d.name for _, d in space.devices()] == ["d0"]
    assert space.total_blocks == 8
    with pytest.raises(ValueError, match="not on any swap device"):
        space.locate(blk)
    assert space.swapon(MemoryDevice(4, name="again")) == 1
    space.check()


def test_swapoff_cancel(layout: str) -> None:
    space = _space(layout, 8, 8)
    space.swapoff_begin(0)
    assert space.free_blocks == 8
    got = _drain(space, 4)
    assert {space.locate(b)[0].name for b, _ in got} == {"d1"}
    space.swapoff_cancel("d0")
    space.check()
    assert space.free_blocks == 8
    got = _drain(space, 4)
    assert {space.locate(b)[0].name for b, _ in got} == {"d0"}


def test_mark_bad_blocks_are_never_reused(layout: str) -> None:
    space = _space(layout, 8, 8)
    runs = _drain(space, 2)
    bad_blk, n = runs[1]
    space.mark_bad(bad_blk, n)
    space.check()
    with pytest.raises(ValueError, match="is bad, not allocated"):
        space.free(bad_blk, 1)
    with pytest.raises(ValueError, match="is bad, not allocated"):
        space.mark_bad(bad_blk, 1)
    for blk, count in runs:
        if blk != bad_blk:
            space.free(blk, count)
    again = _drain(space, 1)
    handed = {b for b, _ in again}
    assert not handed & {bad_blk, bad_blk + 1}
    stats = space.statistics()
    assert (stats.bad, stats.used, stats.free, stats.total) == (2, 14, 0, 16)
    by_device = {d.name: d.bad for d in stats.devices}
    assert by_device[space.locate(bad_blk)[0].name] == 2
    assert sorted(by_device.values()) == [0, 2]


def test_double_free_and_unknown_blocks_are_refused(layout: str) -> None:
    space = _space(layout, 8)
    blk, n = space.alloc(2)  # type: ignore[misc]
    space.free(blk, n)
    with pytest.raises(ValueError, match="is free, not allocated"):
        space.free(blk, n)
    with pytest.raises(ValueError, match="not on any swap device"):
        space.free(1000, 1)
    with pytest.raises(ValueError, match=r"count must be in \[1"):
        space.free(blk, 0)
    space.check()


def test_water_marks_warn_once_per_crossing(layout: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="vmpager.swap")
    space = _space(layout, 16, low_water=4, high_water=8)
    caplog.clear()

    def warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]

    runs = [space.alloc(1) for _ in range(13)]  # free 3 < 4
    assert space.almost_full and len(warnings()) == 1
    assert "almost full" in warnings()[0]
    space.alloc(1)  # free 2: no new warning
    assert len(warnings()) == 1
    for blk, _ in runs[:4]:  # type: ignore[misc]
        space.free(blk, 1)  # free 6: between the marks
    assert space.almost_full
    assert not [r for r in caplog.records if r.levelno == logging.INFO]
    for blk, _ in runs[4:7]:  # type: ignore[misc]
        space.free(blk, 1)  # free 9 > 8
    assert not space.statistics().almost_full
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len(infos) == 1 and "no longer almost full" in infos[0]
    for _ in range(6):
        space.alloc(1)  # free 3 again
    assert len(warnings()) == 2
    assert space.statistics().warnings == 2


def test_full_is_set_by_failure_and_cleared_at_low_water(
    layout: str, caplog: pytest.LogCaptureFixture
) -> None:
    space = _space(layout, 8, low_water=3, high_water=5)
    runs = [space.alloc(1) for _ in range(8)]
    caplog.clear()
    assert space.alloc(1) is None and space.alloc(2, min_count=1) is None
    stats = space.statistics()
    assert stats.full and stats.almost_full
    assert stats.alloc_failures == 2 and stats.full_events == 1
    assert len([r for r in caplog.records if "swap space full" in r.getMessage()]) == 1
    space.free(runs[0][0], 1)  # type: ignore[index]
    space.free(runs[1][0], 1)  # type: ignore[index]
    assert space.full  # 2 free < low_water 3
    space.free(runs[2][0], 1)  # type: ignore[index]
    stats = space.statistics()
    assert not stats.full and stats.almost_full  # 3 free: full clears, hysteresis holds


def test_io_goes_to_the_right_device_block(layout: str) -> None:
    space = _space(layout, 8, 8)
    for _ in range(3):
        blk, n = space.alloc(3)  # type: ignore[misc]
        data = os.urandom(n * BLOCK)
        space.write(blk, [data[:BLOCK], data[BLOCK:]])
        device, dblk = space.locate(blk)
        direct = bytearray(n * BLOCK)
        device.read_blocks(dblk, [direct])
        assert direct == data
        back = bytearray(n * BLOCK)
        space.read(blk, [back])
        assert back == data
        space.discard(blk, n)
    blk = space.alloc(1)[0]  # type: ignore[index]
    limit = space.run_limit(blk)
    with pytest.raises(ValueError, match="crosses a stripe or device boundary"):
        space.write(blk, [bytes((limit + 1) * BLOCK)])


def test_block_size_mismatch_and_duplicates_are_refused(layout: str) -> None:
    space = _space(layout, 8)
    assert space.block_size == BLOCK
    with pytest.raises(ValueError, match="block_size 512 differs"):
        space.swapon(MemoryDevice(8, block_size=512, name="small"))
    with pytest.raises(ValueError, match="already in use"):
        space.swapon(MemoryDevice(8, name="d0"))
    for i in range(3):
        space.swapon(MemoryDevice(2, name=f"x{i}"))
    with pytest.raises(ValueError, match="max_devices=4"):
        space.swapon(MemoryDevice(2, name="one too many"))
    with pytest.raises(ValueError, match="no swap device 'nope'"):
        space.swapoff_begin("nope")
    with pytest.raises(TypeError):
        space.swapoff_begin(1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="must implement BlockDevice"):
        space.swapon(object())  # type: ignore[arg-type]
    space.check()


def test_block_size_unknown_before_the_first_device() -> None:
    with pytest.raises(ValueError, match="add a device first"):
        _ = SwapSpace().block_size
    assert SwapSpace(block_size=512).block_size == 512
    assert SwapSpace().alloc(1) is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"layout": "raid"}, "layout must be"),
        ({"stripe_blocks": 0}, r"stripe_blocks must be in \[1"),
        ({"max_devices": 0}, r"max_devices must be in \[1"),
        ({"low_water": -1}, r"low_water must be in \[0"),
        ({"low_water": 10, "high_water": 5}, "low_water must be <= high_water"),
    ],
)
def test_bad_arguments(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SwapSpace(**kwargs)  # type: ignore[arg-type]


def test_bad_alloc_arguments(layout: str) -> None:
    space = _space(layout, 8)
    with pytest.raises(ValueError, match=r"count must be in \[1"):
        space.alloc(0)
    with pytest.raises(ValueError, match=r"min_count must be in \[1, 2\]"):
        space.alloc(2, min_count=3)
    with pytest.raises(TypeError):
        space.alloc(2.0)  # type: ignore[arg-type]


def test_check_finds_corruption(layout: str) -> None:
    space = _space(layout, 8, 8)
    space.alloc(2)
    space.check()
    slot = space._slots[0]
    assert slot is not None
    slot.state[5] = 1  # used, but free in the blist and not counted
    with pytest.raises(InvariantViolation) as caught:
        space.check()
    assert any("counts used=2" in p for p in caught.value.problems)
    assert any("block 5 is in use but free" in p for p in caught.value.problems)


def test_failed_intermediate_size_marks_full_as_freebsd_getswapspace(layout: str) -> None:
    """A halving request that succeeds at a smaller size still marks the space full
    (every failed swp_pager_getswapspace does); sizecheck clears it at low_water."""
    space = _space(layout, 16, low_water=12, high_water=14)
    blocks = [space.alloc(1) for _ in range(16)]
    for blk, _ in blocks[::2]:  # type: ignore[misc]
        space.free(blk, 1)  # 8 free single blocks: below low_water 12
    got = space.alloc(4, min_count=1)
    assert got is not None and got[1] == 1
    stats = space.statistics()
    assert stats.full and stats.almost_full and stats.full_events == 1
    assert stats.alloc_failures == 0
    assert space.largest_free_run() == 1
    assert "7 of 16 blocks free (largest free run 1)" in space.describe_free()
    # Above low_water, the successful smaller allocation clears full again.
    roomy = _space(layout, 16, low_water=2, high_water=4)
    taken = [roomy.alloc(1) for _ in range(16)]
    for blk, _ in taken[::2]:  # type: ignore[misc]
        roomy.free(blk, 1)
    assert roomy.alloc(4, min_count=1) is not None
    stats = roomy.statistics()
    assert not stats.full and stats.full_events == 1
