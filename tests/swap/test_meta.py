"""Unit tests of SwapMeta: examples of each rule, bad input, and check()."""

from __future__ import annotations

import numpy as np
import pytest

from vmpager.errors import InvariantViolation
from vmpager.swap.meta import SWAP_META_PAGES, SWAPBLK_NONE, MetaStatistics, SwapMeta


class Freed:
    """The allocator side: records every free_blocks call."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def __call__(self, blk: int, count: int) -> None:
        self.calls.append((blk, count))

    def blocks(self) -> list[int]:
        return sorted(b for blk, count in self.calls for b in range(blk, blk + count))


@pytest.fixture
def freed() -> Freed:
    return Freed()


@pytest.fixture
def meta(freed: Freed) -> SwapMeta:
    return SwapMeta(freed)


def test_constants_match_the_seed() -> None:
    assert SWAPBLK_NONE == -1
    assert SWAP_META_PAGES == 16


def test_build_then_lookup(meta: SwapMeta, freed: Freed) -> None:
    meta.build(3, 5, 100)
    meta.build(3, 21, 101)
    meta.build(4, 5, 102)
    assert meta.lookup(3, 5) == 100
    assert meta.lookup(3, 21) == 101
    assert meta.lookup(4, 5) == 102
    assert meta.lookup(3, 6) == SWAPBLK_NONE
    assert meta.lookup(9, 5) == SWAPBLK_NONE
    assert meta.count(3) == 2 and meta.count(4) == 1 and meta.count(9) == 0
    assert meta.total() == 3
    assert freed.calls == []
    meta.check()


def test_build_over_a_block_frees_the_old_one(meta: SwapMeta, freed: Freed) -> None:
    meta.build(1, 0, 10)
    meta.build(1, 0, 11)
    assert meta.lookup(1, 0) == 11
    assert freed.calls == [(10, 1)]
    assert meta.count(1) == 1
    meta.check()


def test_build_the_same_block_again_is_refused(meta: SwapMeta, freed: Freed) -> None:
    meta.build(1, 0, 10)
    with pytest.raises(ValueError, match="blk"):
        meta.build(1, 0, 10)
    assert meta.lookup(1, 0) == 10 and freed.calls == []
    meta.check()


def test_build_none_frees_like_the_seed(meta: SwapMeta, freed: Freed) -> None:
    meta.build(1, 7, 10)
    meta.build(1, 7, SWAPBLK_NONE)
    meta.build(1, 8, SWAPBLK_NONE)
    assert meta.lookup(1, 7) == SWAPBLK_NONE
    assert freed.calls == [(10, 1)]
    assert meta.total() == 0 and list(meta.objects()) == []


def test_pop_removes_without_freeing(meta: SwapMeta, freed: Freed) -> None:
    meta.build(2, 40, 77)
    assert meta.pop(2, 40) == 77
    assert meta.pop(2, 40) == SWAPBLK_NONE
    assert freed.calls == []
    assert meta.count(2) == 0
    meta.check()


def test_free_reports_whether_there_was_a_block(meta: SwapMeta, freed: Freed) -> None:
    meta.build(2, 40, 77)
    assert meta.free(2, 40) is True
    assert meta.free(2, 40) is False
    assert meta.free(5, 0) is False
    assert freed.calls == [(77, 1)]


def test_empty_chunks_and_objects_are_released(meta: SwapMeta) -> None:
    for pindex in range(3 * SWAP_META_PAGES):
        meta.build(1, pindex, 1000 + pindex)
    meta.build(2, 5, 5)
    assert meta.statistics().chunks == 4
    for pindex in range(SWAP_META_PAGES, 2 * SWAP_META_PAGES):
        meta.free(1, pindex)
    assert meta.statistics().chunks == 3
    meta.check()
    # The slot of the last chunk moved into the hole; lookups still agree.
    assert meta.lookup(1, 2 * SWAP_META_PAGES + 3) == 1000 + 2 * SWAP_META_PAGES + 3
    meta.free_all(1)
    stats = meta.statistics()
    assert (stats.objects, stats.chunks, stats.pages) == (1, 1, 1)
    assert list(meta.objects()) == [2]
    meta.check()


def test_free_range_coalesces_consecutive_blocks(meta: SwapMeta, freed: Freed) -> None:
    for pindex in range(40):
        meta.build(1, pindex, 500 + pindex)
    meta.build(1, 50, 900)
    meta.build(1, 51, 600)  # not consecutive with its neighbour's block
    assert meta.free_range(1, 3, 60) == 39
    assert sorted(freed.calls) == [(503, 37), (600, 1), (900, 1)]
    assert [p for p, _ in meta.pages(1)] == [0, 1, 2]
    meta.check()


def test_free_range_over_a_huge_span_is_cheap(meta: SwapMeta, freed: Freed) -> None:
    meta.build(1, 2**62, 1)
    meta.build(1, 5, 2)
    assert meta.free_range(1, 0, 2**63 - 1) == 2
    assert freed.blocks() == [1, 2]


def test_free_all_returns_the_count_and_coalesces(meta: SwapMeta, freed: Freed) -> None:
    for pindex in range(0, 200, 2):
        meta.build(9, pindex, 3000 + pindex // 2)
    meta.build(8, 0, 1)
    assert meta.free_all(9) == 100
    assert freed.calls == [(3000, 100)]
    assert meta.free_all(9) == 0
    assert meta.count(8) == 1
    meta.check()


def test_lookup_range_crosses_chunks_at_any_alignment(meta: SwapMeta) -> None:
    assigned = {3: 30, 15: 150, 16: 160, 47: 470, 100: 1000}
    for pindex, blk in assigned.items():
        meta.build(1, pindex, blk)
    for start, npages in [(0, 0), (0, 101), (2, 14), (15, 2), (17, 29), (10, 200), (5000, 3)]:
        got = meta.lookup_range(1, start, npages)
        assert got.dtype == np.int64
        expected = [assigned.get(p, SWAPBLK_NONE) for p in range(start, start + npages)]
        assert got.tolist() == expected, (start, npages)
    assert meta.lookup_range(2, 0, 4).tolist() == [SWAPBLK_NONE] * 4


def test_blocks_beyond_32_bits(meta: SwapMeta, freed: Freed) -> None:
    meta.build(1, 0, 7)
    meta.build(1, 1, 2**40)
    meta.build(1, 2, 2**63 - 1)
    assert meta.lookup(1, 0) == 7
    assert meta.lookup(1, 1) == 2**40
    assert meta.lookup_range(1, 0, 3).tolist() == [7, 2**40, 2**63 - 1]
    meta.check()
    assert meta.free_all(1) == 3
    assert freed.blocks() == [7, 2**40, 2**63 - 1]


def test_pages_are_ascending_and_a_snapshot(meta: SwapMeta) -> None:
    for pindex in [900, 3, 2**50, 17, 16]:
        meta.build(1, pindex, pindex % 1000 + 1)
    pages = meta.pages(1)
    meta.free_all(1)  # changing the metadata does not disturb the iteration
    assert [p for p, _ in pages] == [3, 16, 17, 900, 2**50]


def test_items_and_owner_arrays_cover_everything(meta: SwapMeta) -> None:
    meta.build(5, 1, 50)
    meta.build(2, 40, 20)
    meta.build(2, 3, 21)
    assert list(meta.items()) == [(2, 3, 21), (2, 40, 20), (5, 1, 50)]
    oids, pindexes, blks = meta.owner_arrays()
    assert oids.tolist() == [2, 2, 5]
    assert pindexes.tolist() == [3, 40, 1]
    assert blks.tolist() == [21, 20, 50]
    assert all(a.dtype == np.int64 for a in (oids, pindexes, blks))


def test_owner_arrays_when_empty(meta: SwapMeta) -> None:
    arrays = meta.owner_arrays()
    assert [len(a) for a in arrays] == [0, 0, 0]
    assert list(meta.items()) == []


def test_transfer_follows_swap_pager_copy(meta: SwapMeta, freed: Freed) -> None:
    # Source pages 0..9 with blocks 100..109; collapse at offset 2 into an
    # 6-page destination that has its own block at 1 and page 3 resident.
    for pindex in range(10):
        meta.build(1, pindex, 100 + pindex)
    meta.build(2, 1, 50)
    asked: list[int] = []

    def resident(d: int) -> bool:
        asked.append(d)
        return d == 3

    meta.transfer(1, 2, 2, 6, resident)
    assert meta.count(1) == 0
    assert list(meta.pages(2)) == [(0, 102), (1, 50), (2, 104), (4, 106), (5, 107)]
    # Out of range (src 0, 1, 8, 9), the destination's block (src 3) and the
    # resident page (src 5) lose their source blocks.
    assert freed.blocks() == [100, 101, 103, 105, 108, 109]
    assert sorted(asked) == [0, 2, 3, 4, 5]
    meta.check()


def test_transfer_leaves_everything_when_the_predicate_fails(meta: SwapMeta, freed: Freed) -> None:
    meta.build(1, 0, 10)
    meta.build(1, 1, 11)

    def broken(d: int) -> bool:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        meta.transfer(1, 2, 0, 10, broken)
    assert list(meta.pages(1)) == [(0, 10), (1, 11)]
    assert meta.count(2) == 0 and freed.calls == []
    meta.check()


def test_transfer_into_itself_is_refused(meta: SwapMeta) -> None:
    with pytest.raises(ValueError, match="dst_oid"):
        meta.transfer(1, 1, 0, 10, lambda d: False)


def test_statistics_is_a_frozen_snapshot(meta: SwapMeta) -> None:
    for pindex in range(64):
        meta.build(1, pindex, pindex)
    stats = meta.statistics()
    assert isinstance(stats, MetaStatistics)
    assert (stats.objects, stats.chunks, stats.pages) == (1, 4, 64)
    assert stats.bytes_used > 64 * 4
    with pytest.raises(AttributeError):
        stats.pages = 0  # type: ignore[misc]


def test_dense_object_is_compact(meta: SwapMeta) -> None:
    npages = 1 << 16
    for pindex in range(npages):
        meta.build(1, pindex, pindex)
    stats = meta.statistics()
    assert stats.pages == npages
    assert stats.bytes_per_page <= 16, stats


def test_numpy_integers_are_accepted(meta: SwapMeta) -> None:
    meta.build(np.int64(1), np.int32(2), np.uint16(3))  # type: ignore[arg-type]
    assert meta.lookup(1, 2) == 3
    assert type(meta.lookup(np.int64(1), np.int64(2))) is int  # type: ignore[arg-type]


BAD_VALUES = [
    ("oid", -1, ValueError),
    ("oid", "1", TypeError),
    ("oid", 1.0, TypeError),
    ("oid", True, TypeError),
    ("oid", 2**63, ValueError),
    ("pindex", -1, ValueError),
    ("pindex", None, TypeError),
    ("pindex", 2**63, ValueError),
]


@pytest.mark.parametrize(("name", "value", "error"), BAD_VALUES)
@pytest.mark.parametrize("method", ["build", "lookup", "pop", "free"])
def test_bad_page_arguments_name_the_argument(
    meta: SwapMeta, method: str, name: str, value: object, error: type[Exception]
) -> None:
    args: dict[str, object] = {"oid": 1, "pindex": 2}
    args[name] = value
    call = [args["oid"], args["pindex"]] + ([5] if method == "build" else [])
    with pytest.raises(error, match=name):
        getattr(meta, method)(*call)
    assert meta.total() == 0


@pytest.mark.parametrize(
    ("value", "error"), [(-2, ValueError), (2**63, ValueError), ("5", TypeError), (5.0, TypeError)]
)
def test_bad_blocks_are_refused(meta: SwapMeta, value: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="blk"):
        meta.build(1, 2, value)  # type: ignore[arg-type]
    assert meta.total() == 0


@pytest.mark.parametrize("method", ["lookup_range", "free_range"])
@pytest.mark.parametrize(
    ("position", "name", "value", "error"),
    [
        (0, "oid", -3, ValueError),
        (1, "start", -1, ValueError),
        (2, "npages", -1, ValueError),
        (2, "npages", 1.5, TypeError),
    ],
)
def test_bad_range_arguments(
    meta: SwapMeta, method: str, position: int, name: str, value: object, error: type[Exception]
) -> None:
    args: list[object] = [1, 0, 4]
    args[position] = value
    with pytest.raises(error, match=name):
        getattr(meta, method)(*args)


@pytest.mark.parametrize(
    ("args", "name", "error"),
    [
        ((-1, 2, 0, 1), "src_oid", ValueError),
        ((1, "2", 0, 1), "dst_oid", TypeError),
        ((1, 2, -1, 1), "offset_pages", ValueError),
        ((1, 2, 0, -1), "dst_npages", ValueError),
    ],
)
def test_bad_transfer_arguments(
    meta: SwapMeta, args: tuple[object, ...], name: str, error: type[Exception]
) -> None:
    with pytest.raises(error, match=name):
        meta.transfer(*args, lambda d: False)  # type: ignore[arg-type, call-arg]


def test_callables_are_checked() -> None:
    with pytest.raises(TypeError, match="free_blocks"):
        SwapMeta(42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="dst_resident"):
        SwapMeta(Freed()).transfer(1, 2, 0, 1, None)  # type: ignore[arg-type]


def test_free_all_and_count_check_the_oid(meta: SwapMeta) -> None:
    for method in ("free_all", "count", "pages"):
        with pytest.raises(ValueError, match="oid"):
            getattr(meta, method)(-1)


# -- check() must catch broken structures -----------------------------------


def _corruptible(meta: SwapMeta) -> None:
    for pindex in range(40):
        meta.build(1, pindex, 100 + pindex)
    meta.build(2, 3, 7)
    meta.check()


def test_check_finds_a_block_assigned_twice(meta: SwapMeta) -> None:
    _corruptible(meta)
    meta.build(2, 4, 100)  # the caller handed out a block already in use
    with pytest.raises(InvariantViolation, match="block 100 is assigned more than once"):
        meta.check()


def test_check_finds_a_wrong_slot_count(meta: SwapMeta) -> None:
    _corruptible(meta)
    meta._objects[1].counts[0] += 1
    with pytest.raises(InvariantViolation, match="counts"):
        meta.check()


def test_check_finds_an_empty_chunk(meta: SwapMeta) -> None:
    _corruptible(meta)
    obj = meta._objects[2]
    obj.blocks[3] = SWAPBLK_NONE
    obj.counts[0] = 0
    obj.npages = 0
    meta._total -= 1
    with pytest.raises(InvariantViolation, match="empty but kept"):
        meta.check()


def test_check_finds_an_invalid_block_value(meta: SwapMeta) -> None:
    _corruptible(meta)
    meta._objects[2].blocks[0] = -5
    with pytest.raises(InvariantViolation, match="below -1"):
        meta.check()


def test_check_finds_a_wrong_total(meta: SwapMeta) -> None:
    _corruptible(meta)
    meta._total += 1
    with pytest.raises(InvariantViolation, match="total"):
        meta.check()


def test_check_finds_a_leaf_pointing_at_the_wrong_slot(meta: SwapMeta) -> None:
    _corruptible(meta)
    leaf = meta._objects[1].leaves[0]
    leaf[0], leaf[1] = leaf[1], leaf[0]
    with pytest.raises(InvariantViolation, match="maps chunk"):
        meta.check()
