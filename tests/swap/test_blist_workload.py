"""The swap-allocator workload: the random stream, and placement against FreeBSD's.

The full-size run pins the checksum FreeBSD's C blist produces; smaller runs
compare the blist with a plain byte-map first-fit model, call for call.
"""

from __future__ import annotations

import pytest

from vmpager.swap._blist_workload import run_workload, splitmix64, splitmix64_stream
from vmpager.swap.blist import Blist


class ByteMapModel:
    """First fit from a cursor over one byte per block (bytearray.find), retried from 0."""

    def __init__(self, nblocks: int) -> None:
        self.nblocks = nblocks
        self.used = bytearray(nblocks)
        self.cursor = 0
        self.nfree = nblocks

    def alloc(self, count: int) -> tuple[int, int] | None:
        pattern = bytes(count)
        blk = self.used.find(pattern, self.cursor)
        if blk < 0:
            blk = self.used.find(pattern)
        if blk < 0:
            return None
        self.used[blk : blk + count] = b"\x01" * count
        self.nfree -= count
        self.cursor = (blk + count) % self.nblocks
        return blk, count

    def free(self, blk: int, count: int) -> None:
        assert self.used[blk : blk + count] == b"\x01" * count
        self.used[blk : blk + count] = bytes(count)
        self.nfree += count

    def avail(self) -> int:
        return self.nfree


def test_vectorised_stream_equals_the_sequential_generator() -> None:
    state = 12345
    expected = []
    for _ in range(1000):
        state, value = splitmix64(state)
        expected.append(value)
    assert splitmix64_stream(12345, 1000) == expected
    assert splitmix64_stream(12345, 10, skip=990) == expected[990:]


def test_splitmix64_known_first_output() -> None:
    # First output of splitmix64 seeded 0, as published with the algorithm.
    assert splitmix64(0)[1] == 0xE220A8397B1DCDAF


@pytest.mark.parametrize("fill", [0.5, 0.9])
@pytest.mark.parametrize(("leaf_bits", "fanout"), [(1024, 64), (64, 4), (16, 2)])
def test_placement_equals_the_model(fill: float, leaf_bits: int, fanout: int) -> None:
    nblocks = 1 << 13
    got = run_workload(Blist(nblocks, leaf_bits=leaf_bits, fanout=fanout), nblocks, fill, 20_000)
    want = run_workload(ByteMapModel(nblocks), nblocks, fill, 20_000)
    assert got == want


def test_freebsd_placement_at_fill_half() -> None:
    """The benchmark's full run: FreeBSD's C blist gives exactly these numbers."""
    bl = Blist(1 << 20)
    result = run_workload(bl, 1 << 20, 0.5, 1_000_000)
    assert result.failures == 0
    assert result.free_blocks == 524_010
    assert result.live_runs == 61_544
    assert result.checksum == 0x3776E72B6F4553DB
    bl.check()
