"""The tier under a swap space: pool, rejects, same-filled pages, writeback, corruption."""

from __future__ import annotations

import os

import pytest

from vmpager.devices.faulty import FaultyDevice
from vmpager.devices.memory import MemoryDevice
from vmpager.errors import CorruptPage, DeviceError
from vmpager.swap.space import SwapSpace
from vmpager.tiers.tier import ENTRY_OVERHEAD, SwapTier

PAGE = 4096


def compressible(n: int) -> bytes:
    """A page lz4 compresses to about 1.7 KiB, different for every ``n``."""
    rnd = os.urandom(1600)
    return rnd + n.to_bytes(8, "little") + bytes(PAGE - 1608)


def space_with(tier: SwapTier, nblocks: int = 256) -> tuple[SwapSpace, FaultyDevice]:
    space = SwapSpace(low_water=0, high_water=0)
    space.attach_tier(tier)
    device = FaultyDevice(MemoryDevice(nblocks, PAGE, name="ram"))
    space.swapon(device)
    return space, device


def read(space: SwapSpace, blk: int, count: int = 1) -> bytes:
    out = bytearray(count * PAGE)
    space.read(blk, [out])
    return bytes(out)


def test_pool_keeps_compressible_and_same_filled_pages_and_rejects_the_rest() -> None:
    tier = SwapTier(PAGE, compress="lz4", pool_capacity=64 * PAGE, integrity=True)
    space, device = space_with(tier)
    blk, _ = space.alloc(4) or (0, 0)
    pages = [compressible(1), bytes(PAGE), b"\x07" * PAGE, os.urandom(PAGE)]
    space.write(blk, [bytearray(p) for p in pages])
    stats = tier.statistics()
    assert (stats.stored_pages, stats.same_filled_pages, stats.rejects) == (3, 2, 1)
    assert stats.device_pages_written == 1
    assert device.statistics().blocks_written == 1  # only the reject reached the device
    assert read(space, blk, 4) == b"".join(pages)
    assert tier.statistics().hits == 3
    assert device.statistics().blocks_read == 1
    assert stats.pool_bytes == 3 * ENTRY_OVERHEAD + stats.compressed_bytes
    tier.check([device])


def test_a_full_pool_writes_its_oldest_pages_back_and_stays_within_capacity() -> None:
    capacity = 16 * (1700 + ENTRY_OVERHEAD)
    tier = SwapTier(PAGE, compress="lz4", pool_capacity=capacity, writeback_cluster=8)
    space, device = space_with(tier)
    contents = {}
    for _ in range(8):
        blk, n = space.alloc(8) or (0, 0)
        assert n == 8
        pages = [compressible(blk + i) for i in range(8)]
        space.write(blk, [bytearray(p) for p in pages])
        contents.update({blk + i: p for i, p in enumerate(pages)})
        assert tier.statistics().pool_bytes <= capacity
    stats = tier.statistics()
    assert stats.writebacks > 0 and stats.writeback_runs > 0
    assert stats.writebacks + stats.stored_pages == 64
    # The oldest went first: the first pages written are on the device now.
    pooled = set(tier.pool_blocks())
    assert min(contents) not in pooled and max(contents) in pooled
    assert device.statistics().blocks_written == stats.writebacks
    for blk, page in contents.items():
        assert read(space, blk) == page, blk
    tier.check([device])


def test_freeing_a_block_drops_its_pool_entry() -> None:
    tier = SwapTier(PAGE, compress="zstd", pool_capacity=64 * PAGE)
    space, device = space_with(tier)
    blk, _ = space.alloc(2) or (0, 0)
    space.write(blk, [bytearray(compressible(1)), bytearray(compressible(2))])
    space.free(blk, 1)
    assert tier.pool_blocks() == [blk + 1]
    tier.check([device])
    space.check()


def test_rewriting_a_block_replaces_its_pool_entry() -> None:
    tier = SwapTier(PAGE, compress="lz4", pool_capacity=64 * PAGE)
    space, _ = space_with(tier)
    blk, _ = space.alloc(1) or (0, 0)
    space.write(blk, [bytearray(compressible(1))])
    space.write(blk, [bytearray(os.urandom(PAGE))])  # a reject: to the device
    new = compressible(9)
    space.write(blk, [bytearray(new)])
    assert read(space, blk) == new
    assert tier.statistics().stored_pages == 1


@pytest.mark.parametrize("encrypt", [False, True])
def test_a_corrupt_block_raises_corrupt_page_and_is_retired_when_freed(encrypt: bool) -> None:
    tier = SwapTier(PAGE, encrypt=encrypt)
    space, device = space_with(tier)
    blk, _ = space.alloc(3) or (0, 0)
    pages = [os.urandom(PAGE) for _ in range(3)]
    space.write(blk, [bytearray(p) for p in pages])
    _, dblk = space.locate(blk + 1)
    device.corrupt_stored([dblk], offset=77)
    out = bytearray(b"\x55" * 3 * PAGE)
    with pytest.raises(CorruptPage) as info:
        space.read(blk, [out])
    err = info.value
    assert isinstance(err, DeviceError)
    assert (err.device, err.block, err.swap_block) == ("faulty:ram", dblk, blk + 1)
    assert out[PAGE : 2 * PAGE] == bytes(PAGE)  # not the corrupt data
    assert read(space, blk) == pages[0] and read(space, blk + 2) == pages[2]
    with pytest.raises(CorruptPage, match="found corrupt before"):
        read(space, blk + 1)
    assert tier.statistics().bad_pending == 1
    space.free(blk, 3)
    stats = space.statistics()
    assert (stats.bad, stats.used) == (1, 0)
    assert tier.statistics().bad_pending == 0
    space.check()


def test_corruption_on_the_way_is_read_again() -> None:
    tier = SwapTier(PAGE)
    space, device = space_with(tier)
    blk, _ = space.alloc(2) or (0, 0)
    pages = [os.urandom(PAGE) for _ in range(2)]
    space.write(blk, [bytearray(p) for p in pages])
    _, dblk = space.locate(blk)
    device.corrupt_reads([dblk + 1], times=1)
    assert read(space, blk, 2) == b"".join(pages)
    stats = tier.statistics()
    assert (stats.reread_ok, stats.corrupt_pages) == (1, 0)
    assert device.statistics().injected_corruptions == 1


def test_a_failed_write_stores_nothing_in_the_pool() -> None:
    tier = SwapTier(PAGE, compress="lz4", pool_capacity=64 * PAGE)
    space, device = space_with(tier)
    blk, _ = space.alloc(2) or (0, 0)
    _, dblk = space.locate(blk)
    device.fail_writes([dblk + 1], times=1)
    with pytest.raises(DeviceError):
        space.write(blk, [bytearray(compressible(1)), bytearray(os.urandom(PAGE))])
    assert tier.statistics().stored_pages == 0


def test_a_failed_writeback_keeps_the_pages_in_the_pool() -> None:
    capacity = 4 * (1700 + ENTRY_OVERHEAD)
    tier = SwapTier(PAGE, compress="lz4", pool_capacity=capacity)
    space, device = space_with(tier)
    device.write_error_rate = 1.0
    blk, _ = space.alloc(8) or (0, 0)
    pages = [compressible(i) for i in range(8)]
    space.write(blk, [bytearray(p) for p in pages])
    stats = tier.statistics()
    assert stats.writeback_errors > 0 and stats.stored_pages == 8
    device.write_error_rate = 0.0
    assert read(space, blk, 8) == b"".join(pages)


def test_bad_arguments_name_themselves() -> None:
    with pytest.raises(ValueError, match="compress_pool must hold at least one page"):
        SwapTier(PAGE, compress="lz4", pool_capacity=100)
    with pytest.raises(TypeError, match="encrypt must be a bool"):
        SwapTier(PAGE, encrypt=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="accept_limit"):
        SwapTier(PAGE, compress="lz4", pool_capacity=PAGE, accept_limit=PAGE + 1)
    space = SwapSpace()
    space.swapon(MemoryDevice(4, PAGE))
    with pytest.raises(ValueError, match="already has devices"):
        space.attach_tier(SwapTier(PAGE))


def test_a_page_read_from_the_pool_is_the_first_written_back() -> None:
    capacity = 12 * (1700 + ENTRY_OVERHEAD)
    tier = SwapTier(PAGE, compress="lz4", pool_capacity=capacity, writeback_cluster=1)
    space, _ = space_with(tier)
    blk, _ = space.alloc(12) or (0, 0)
    contents = {blk + i: compressible(i) for i in range(10)}
    for b, page in contents.items():
        space.write(b, [bytearray(page)])
    assert tier.pool_blocks() == list(contents)  # the oldest first
    hit = blk + 6
    assert read(space, hit) == contents[hit]
    # Read back, the page is resident: its entry is the least useful, so it goes
    # first when the pool overflows, before the older entries of pages not in use.
    assert tier.pool_blocks()[0] == hit
    more, _ = space.alloc(8) or (0, 0)
    for i in range(8):  # until the first writeback
        space.write(more + i, [bytearray(compressible(100 + i))])
        if tier.statistics().writebacks:
            break
    assert tier.statistics().writebacks >= 1
    assert hit not in tier.pool_blocks()
    assert blk + 0 in tier.pool_blocks()  # older, but not read: still in the pool
    assert read(space, hit) == contents[hit]  # from the device now
    for b, page in contents.items():
        assert read(space, b) == page
    tier.check()
