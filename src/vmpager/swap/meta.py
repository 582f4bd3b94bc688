"""Per-object swap metadata: which swap block holds each swapped-out page.

This is FreeBSD's ``struct swblock`` hash and the ``swp_pager_meta_build``,
``swp_pager_meta_free``, ``swp_pager_meta_free_all`` and ``swp_pager_meta_ctl``
routines, plus the metadata half of ``swap_pager_copy``. It maps
``(object id, page index)`` to a swap block number. Storage is grouped in
chunks of ``SWAP_META_PAGES`` (16) consecutive page indexes, like FreeBSD 2002's
``swblock``; a chunk exists only while at least one of its pages has a block,
and is released as soon as its last block goes.

Layout (per object), chosen so that millions of swapped pages cost a few bytes
each rather than a Python object each:

* ``blocks`` — a flat ``array.array`` holding 16 block numbers per chunk
  *slot* (``SWAPBLK_NONE`` where a page has none). It stores 32-bit numbers
  and widens itself to 64 bits the first time a block does not fit.
* ``counts`` / ``owners`` — per slot: how many of its 16 pages have a block,
  and which chunk (``pindex // 16``) the slot holds.
* ``leaves`` — a two-level chunk table in the manner of a radix tree: a dict
  from ``chunk // 64`` to a 65-entry 32-bit array giving the slot of each of
  its 64 chunks (-1 when absent) and, in the last entry, how many are present.
  Empty leaves are released too, so a sparse object costs memory in proportion
  to what it holds, not to the span of its page indexes.

Slots stay dense: releasing a chunk moves the object's last slot into the hole.

The metadata never allocates swap blocks. Whenever it drops a block it hands
it back through the ``free_blocks(blk, count)`` callback given at construction,
always after its own state is updated, so the callback sees a consistent
structure. Blocks of one operation that are consecutive numbers are returned
in one call.

Locking: the structure is not thread-safe; the caller holds the VM lock for
every call, as FreeBSD 2002 runs these routines under Giant at splvm.
"""

from __future__ import annotations

import operator
import sys
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final, SupportsIndex

import numpy as np
import numpy.typing as npt

from vmpager.errors import InvariantViolation
from vmpager.units import check_int

__all__ = ["SWAPBLK_NONE", "SWAP_META_PAGES", "MetaStatistics", "SwapMeta"]

#: The block value that means "this page has no swap block".
SWAPBLK_NONE: Final = -1
#: Pages per metadata chunk (FreeBSD 2002's SWAP_META_PAGES).
SWAP_META_PAGES: Final = 16

_CHUNK_SHIFT: Final = 4
_CHUNK_MASK: Final = SWAP_META_PAGES - 1
_LEAF_SHIFT: Final = 6
_LEAF_CHUNKS: Final = 1 << _LEAF_SHIFT
_LEAF_MASK: Final = _LEAF_CHUNKS - 1
#: Index of a leaf's "chunks present" counter, stored after its 64 slot numbers.
_LEAF_COUNT: Final = _LEAF_CHUNKS
#: Object ids, page indexes and blocks must fit in int64 (the vectorised views).
_VALUE_BITS: Final = 63
_VALUE_MAX: Final = (1 << _VALUE_BITS) - 1
# The hot paths test an int x with ``x >> _VALUE_BITS``: it is zero exactly
# when 0 <= x <= _VALUE_MAX, one operation instead of two comparisons; any
# other value goes to check_int for conversion or a precise error.
_INT32_MAX: Final = (1 << 31) - 1

_EMPTY_LEAF: Final = array("i", [-1] * _LEAF_CHUNKS + [0])
#: Bytes of one empty chunk: -1 is all ones in two's complement at any width.
_EMPTY_CHUNK_I: Final = b"\xff" * (4 * SWAP_META_PAGES)
_EMPTY_CHUNK_Q: Final = b"\xff" * (8 * SWAP_META_PAGES)
_NONE_CHUNK_I: Final = array("i", [SWAPBLK_NONE] * SWAP_META_PAGES)
_NONE_CHUNK_Q: Final = array("q", [SWAPBLK_NONE] * SWAP_META_PAGES)

#: lookup_range walks up to this many chunks one by one in plain Python
#: (about 0.3 us a chunk); longer ranges are gathered with numpy per leaf
#: (about 10 us of fixed cost).
_LOOKUP_LOOP_MAX_CHUNKS = 32
#: free_range and transfer walk up to this many chunks (moved pages / 16 for
#: transfer) one by one; beyond it they may rebuild whole-object arrays.
_LOOP_MAX_CHUNKS = 8
#: A range operation takes the whole-object path when it spans at least
#: 1/_BULK_FRACTION of the object's chunks (its cost is linear in the object).
_BULK_FRACTION = 8
#: Below this many blocks, sorting and coalescing in plain Python is cheaper.
_NUMPY_COALESCE_MIN = 64

Int64Array = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class MetaStatistics:
    """A snapshot of the swap metadata's size.

    ``bytes_used`` is an estimate of the memory the structure holds (arrays,
    dicts and per-object records, as ``sys.getsizeof`` reports them).
    """

    objects: int
    chunks: int
    pages: int
    bytes_used: int

    @property
    def bytes_per_page(self) -> float:
        """``bytes_used`` divided by the assigned pages (0.0 when empty)."""
        return self.bytes_used / self.pages if self.pages else 0.0


def _numpy_type(blocks: array[int]) -> type[np.int32] | type[np.int64]:
    """The numpy type of a blocks array's items."""
    return np.int32 if blocks.typecode == "i" else np.int64


class _ObjectMeta:
    """The metadata of one object; see the module docstring for the layout."""

    __slots__ = ("blocks", "counts", "leaves", "npages", "owners")

    def __init__(self) -> None:
        self.leaves: dict[int, array[int]] = {}
        self.blocks: array[int] = array("i")
        self.counts: array[int] = array("B")
        self.owners: array[int] = array("q")
        self.npages = 0

    def blocks_view(self) -> Int64Array:
        """The blocks as an (nslots, 16) int64 copy (safe to keep)."""
        view = np.frombuffer(self.blocks, dtype=_numpy_type(self.blocks))
        # astype copies, so no view of the array.array outlives this call (a
        # live export would make the next resize raise BufferError).
        return view.astype(np.int64).reshape(-1, SWAP_META_PAGES)

    def owners_view(self) -> Int64Array:
        """The chunk index of each slot, as an int64 copy."""
        return np.frombuffer(self.owners, dtype=np.int64).copy()

    def arrays(self) -> tuple[Int64Array, Int64Array]:
        """(pindexes, blks) of every assigned page, ascending pindex. O(pages)."""
        owners = self.owners_view()
        order = np.argsort(owners, kind="stable")
        blks = self.blocks_view()[order]
        pindexes = (owners[order] << _CHUNK_SHIFT)[:, None] + np.arange(
            SWAP_META_PAGES, dtype=np.int64
        )
        present = blks >= 0
        return pindexes[present], blks[present]

    def size_bytes(self) -> int:
        total = sys.getsizeof(self) + sys.getsizeof(self.leaves)
        total += sys.getsizeof(self.blocks) + sys.getsizeof(self.counts)
        total += sys.getsizeof(self.owners)
        for key, leaf in self.leaves.items():
            total += sys.getsizeof(leaf) + sys.getsizeof(key)
        return total


def _object_from_arrays(pindexes: Int64Array, blks: Int64Array) -> _ObjectMeta:
    """Build an object's metadata from pages sorted by unique pindex. O(pages)."""
    obj = _ObjectMeta()
    if len(pindexes) == 0:
        return obj
    chunks = pindexes >> _CHUNK_SHIFT
    owners, slot_of_page = np.unique(chunks, return_inverse=True)
    nslots = len(owners)
    table = np.full((nslots, SWAP_META_PAGES), SWAPBLK_NONE, dtype=np.int64)
    table[slot_of_page, pindexes & _CHUNK_MASK] = blks
    wide = int(blks.max()) > _INT32_MAX
    obj.blocks = array("q" if wide else "i")
    obj.blocks.frombytes(table.astype(np.int64 if wide else np.int32).tobytes())
    obj.counts = array("B")
    obj.counts.frombytes(np.bincount(slot_of_page, minlength=nslots).astype(np.uint8).tobytes())
    obj.owners = array("q")
    obj.owners.frombytes(owners.astype(np.int64).tobytes())
    leaf_keys, leaf_of_slot = np.unique(owners >> _LEAF_SHIFT, return_inverse=True)
    leaf_table = np.full((len(leaf_keys), _LEAF_CHUNKS + 1), -1, dtype=np.int32)
    leaf_table[leaf_of_slot, owners & _LEAF_MASK] = np.arange(nslots, dtype=np.int32)
    leaf_table[:, _LEAF_COUNT] = np.bincount(leaf_of_slot, minlength=len(leaf_keys))
    for key, row in zip(leaf_keys.tolist(), leaf_table, strict=True):
        leaf: array[int] = array("i")
        leaf.frombytes(row.tobytes())
        obj.leaves[key] = leaf
    obj.npages = len(pindexes)
    return obj


#: Copied for short results: a slice copy is several times cheaper than np.full.
_NO_BLOCKS: Final = np.full(4096, SWAPBLK_NONE, dtype=np.int64)


def _no_blocks(npages: int) -> Int64Array:
    """A fresh int64 array of npages SWAPBLK_NONE."""
    if npages <= len(_NO_BLOCKS):
        return _NO_BLOCKS[:npages].copy()
    return np.full(npages, SWAPBLK_NONE, dtype=np.int64)


def _check_value(value: SupportsIndex, name: str, minimum: int = 0) -> int:
    """Slow path of argument checking: convert index-like values or raise."""
    return check_int(value, name, minimum=minimum, maximum=_VALUE_MAX)


class SwapMeta:
    """Swap block of every swapped page of every object, in 16-page chunks.

    All methods run under the caller's VM lock and never block. Single-page
    operations (``build``, ``lookup``, ``pop``, ``free``) cost O(1): two dict
    look-ups and two array accesses. Range operations cost O(chunks spanned),
    or O(pages of the object) when they span a large part of it and work on
    whole-object numpy arrays instead.

    Object ids, page indexes and block numbers are ints in ``[0, 2**63 - 1]``.
    """

    def __init__(self, free_blocks: Callable[[int, int], None]) -> None:
        """``free_blocks(blk, count)`` returns blocks ``blk .. blk + count - 1``
        to the allocator; it is called after the metadata no longer holds them
        and must not call back into this structure."""
        if not callable(free_blocks):
            raise TypeError(f"free_blocks must be callable, got {type(free_blocks).__name__}")
        self._free_blocks = free_blocks
        self._objects: dict[int, _ObjectMeta] = {}
        self._total = 0

    # ------------------------------------------------------------------
    # single-page operations (the pagein / pageout hot paths)

    def build(self, oid: int, pindex: int, blk: int) -> None:
        """Assign ``blk`` to page ``pindex`` of object ``oid`` (swp_pager_meta_build).

        A block the page had before is freed through ``free_blocks``.
        ``blk == SWAPBLK_NONE`` removes and frees the page's block, like
        FreeBSD 2002. Assigning the block the page already has is a ``ValueError``
        (freeing it would leave a free block assigned). O(1).
        """
        if type(oid) is not int or oid >> _VALUE_BITS:
            oid = _check_value(oid, "oid")
        if type(pindex) is not int or pindex >> _VALUE_BITS:
            pindex = _check_value(pindex, "pindex")
        if type(blk) is not int or blk >> _VALUE_BITS:
            blk = _check_value(blk, "blk", minimum=SWAPBLK_NONE)
            if blk == SWAPBLK_NONE:
                self.free(oid, pindex)
                return
        obj = self._objects.get(oid)
        if obj is None:
            obj = self._objects[oid] = _ObjectMeta()
        chunk = pindex >> _CHUNK_SHIFT
        leaves = obj.leaves
        leaf = leaves.get(chunk >> _LEAF_SHIFT)
        if leaf is None:
            leaf = leaves[chunk >> _LEAF_SHIFT] = array("i", _EMPTY_LEAF)
        slot = leaf[chunk & _LEAF_MASK]
        blocks = obj.blocks
        if slot < 0:
            slot = len(obj.counts)
            blocks.frombytes(_EMPTY_CHUNK_I if blocks.typecode == "i" else _EMPTY_CHUNK_Q)
            obj.counts.append(0)
            obj.owners.append(chunk)
            leaf[chunk & _LEAF_MASK] = slot
            leaf[_LEAF_COUNT] += 1
        i = (slot << _CHUNK_SHIFT) | (pindex & _CHUNK_MASK)
        old = blocks[i]
        if old == blk:
            raise ValueError(f"blk {blk} is already assigned to oid {oid} pindex {pindex}")
        try:
            blocks[i] = blk
        except OverflowError:
            obj.blocks = blocks = array("q", blocks)
            blocks[i] = blk
        if old < 0:
            obj.counts[slot] += 1
            obj.npages += 1
            self._total += 1
        else:
            self._free_blocks(old, 1)

    def build_run(self, oid: int, pindex: int, blk: int, count: int) -> None:
        """``build(oid, pindex + k, blk + k)`` for every ``k < count``: a run of
        pages gets a run of consecutive blocks (the pageout of a cluster).

        Blocks the pages had before are freed through ``free_blocks``
        (consecutive ones in one call). All or nothing: a page given the
        block it already has is a ``ValueError`` before anything changes.
        O(count / 16): one slice of the blocks per chunk.
        """
        if type(oid) is not int or oid >> _VALUE_BITS:
            oid = _check_value(oid, "oid")
        if type(pindex) is not int or pindex >> _VALUE_BITS:
            pindex = _check_value(pindex, "pindex")
        if type(blk) is not int or blk >> _VALUE_BITS:
            blk = _check_value(blk, "blk")
        count = check_int(count, "count", minimum=0, maximum=_VALUE_MAX + 1 - max(pindex, blk))
        if count <= 1:
            if count:
                self.build(oid, pindex, blk)
            return
        obj = self._objects.get(oid)
        end = pindex + count
        wide = blk + count - 1 > _INT32_MAX
        if obj is not None and obj.blocks.typecode == "q":
            wide = True
        new = array("q" if wide else "i", range(blk, blk + count))
        if obj is not None:
            # Refuse before any change: a page given the block it has.
            leaves = obj.leaves
            blocks = obj.blocks
            p = pindex
            while p < end:
                chunk = p >> _CHUNK_SHIFT
                stop = min(end, (chunk + 1) << _CHUNK_SHIFT)
                leaf = leaves.get(chunk >> _LEAF_SHIFT)
                if leaf is not None and (slot := leaf[chunk & _LEAF_MASK]) >= 0:
                    base = (slot << _CHUNK_SHIFT) - (chunk << _CHUNK_SHIFT)
                    olds = blocks[base + p : base + stop]
                    wanted = new[p - pindex : stop - pindex]
                    if any(map(operator.eq, olds, wanted)):
                        k = [a == b for a, b in zip(olds, wanted, strict=True)].index(True)
                        raise ValueError(
                            f"blk {olds[k]} is already assigned to oid {oid} pindex {p + k}"
                        )
                p = stop
            if wide and obj.blocks.typecode == "i":
                obj.blocks = array("q", obj.blocks)
        else:
            obj = self._objects[oid] = _ObjectMeta()
            if wide:
                obj.blocks = array("q")
        leaves = obj.leaves
        blocks = obj.blocks
        empty_chunk = _EMPTY_CHUNK_I if blocks.typecode == "i" else _EMPTY_CHUNK_Q
        counts = obj.counts
        freed: list[int] = []
        added = 0
        p = pindex
        while p < end:
            chunk = p >> _CHUNK_SHIFT
            stop = min(end, (chunk + 1) << _CHUNK_SHIFT)
            leaf = leaves.get(chunk >> _LEAF_SHIFT)
            if leaf is None:
                leaf = leaves[chunk >> _LEAF_SHIFT] = array("i", _EMPTY_LEAF)
            slot = leaf[chunk & _LEAF_MASK]
            if slot < 0:
                slot = len(counts)
                blocks.frombytes(empty_chunk)
                counts.append(0)
                obj.owners.append(chunk)
                leaf[chunk & _LEAF_MASK] = slot
                leaf[_LEAF_COUNT] += 1
            i = (slot << _CHUNK_SHIFT) | (p & _CHUNK_MASK)
            n = stop - p
            olds = blocks[i : i + n]
            blocks[i : i + n] = new[p - pindex : stop - pindex]
            empty = olds.count(SWAPBLK_NONE)
            if empty != n:
                freed.extend(x for x in olds if x >= 0)
            counts[slot] += empty
            added += empty
            p = stop
        obj.npages += added
        self._total += added
        self._free_coalesced(freed)

    def lookup(self, oid: int, pindex: int) -> int:
        """The block of page ``pindex`` of ``oid``, or ``SWAPBLK_NONE``. O(1)."""
        if type(oid) is not int or oid >> _VALUE_BITS:
            oid = _check_value(oid, "oid")
        if type(pindex) is not int or pindex >> _VALUE_BITS:
            pindex = _check_value(pindex, "pindex")
        obj = self._objects.get(oid)
        if obj is None:
            return SWAPBLK_NONE
        chunk = pindex >> _CHUNK_SHIFT
        leaf = obj.leaves.get(chunk >> _LEAF_SHIFT)
        if leaf is None:
            return SWAPBLK_NONE
        slot = leaf[chunk & _LEAF_MASK]
        if slot < 0:
            return SWAPBLK_NONE
        return obj.blocks[(slot << _CHUNK_SHIFT) | (pindex & _CHUNK_MASK)]

    # pop and free repeat the look-up inline rather than share a helper: a
    # method call is a third of their cost, and they run on every pagein.

    def pop(self, oid: int, pindex: int) -> int:
        """Remove the page's block without freeing it (SWM_POP). O(1).

        Returns the block, now owned by the caller, or ``SWAPBLK_NONE``.
        """
        if type(oid) is not int or oid >> _VALUE_BITS:
            oid = _check_value(oid, "oid")
        if type(pindex) is not int or pindex >> _VALUE_BITS:
            pindex = _check_value(pindex, "pindex")
        obj = self._objects.get(oid)
        if obj is None:
            return SWAPBLK_NONE
        chunk = pindex >> _CHUNK_SHIFT
        leaf = obj.leaves.get(chunk >> _LEAF_SHIFT)
        if leaf is None:
            return SWAPBLK_NONE
        slot = leaf[chunk & _LEAF_MASK]
        if slot < 0:
            return SWAPBLK_NONE
        i = (slot << _CHUNK_SHIFT) | (pindex & _CHUNK_MASK)
        blocks = obj.blocks
        old = blocks[i]
        if old < 0:
            return SWAPBLK_NONE
        self._total -= 1
        npages = obj.npages - 1
        if npages == 0:
            # Last page of the object: drop the whole record at once.
            del self._objects[oid]
            return old
        obj.npages = npages
        blocks[i] = SWAPBLK_NONE
        counts = obj.counts
        left = counts[slot] - 1
        counts[slot] = left
        if left == 0:
            self._release_slot(obj, slot, chunk)
        return old

    def free(self, oid: int, pindex: int) -> bool:
        """Remove the page's block and free it (SWM_FREE). O(1).

        Returns False, and frees nothing, when the page had no block.
        """
        if type(oid) is not int or oid >> _VALUE_BITS:
            oid = _check_value(oid, "oid")
        if type(pindex) is not int or pindex >> _VALUE_BITS:
            pindex = _check_value(pindex, "pindex")
        obj = self._objects.get(oid)
        if obj is None:
            return False
        chunk = pindex >> _CHUNK_SHIFT
        leaf = obj.leaves.get(chunk >> _LEAF_SHIFT)
        if leaf is None:
            return False
        slot = leaf[chunk & _LEAF_MASK]
        if slot < 0:
            return False
        i = (slot << _CHUNK_SHIFT) | (pindex & _CHUNK_MASK)
        blocks = obj.blocks
        old = blocks[i]
        if old < 0:
            return False
        self._total -= 1
        npages = obj.npages - 1
        if npages == 0:
            # Last page of the object: drop the whole record at once.
            del self._objects[oid]
            self._free_blocks(old, 1)
            return True
        obj.npages = npages
        blocks[i] = SWAPBLK_NONE
        counts = obj.counts
        left = counts[slot] - 1
        counts[slot] = left
        if left == 0:
            self._release_slot(obj, slot, chunk)
        self._free_blocks(old, 1)
        return True

    @staticmethod
    def _release_slot(obj: _ObjectMeta, slot: int, chunk: int) -> None:
        """Forget an empty chunk; the object's last slot moves into its place."""
        last = len(obj.counts) - 1
        blocks = obj.blocks
        if slot != last:
            blocks[slot << _CHUNK_SHIFT : (slot + 1) << _CHUNK_SHIFT] = blocks[
                last << _CHUNK_SHIFT :
            ]
            obj.counts[slot] = obj.counts[last]
            moved = obj.owners[last]
            obj.owners[slot] = moved
            obj.leaves[moved >> _LEAF_SHIFT][moved & _LEAF_MASK] = slot
        del blocks[last << _CHUNK_SHIFT :]
        obj.counts.pop()
        obj.owners.pop()
        key = chunk >> _LEAF_SHIFT
        leaf = obj.leaves[key]
        leaf[chunk & _LEAF_MASK] = -1
        left = leaf[_LEAF_COUNT] - 1
        if left:
            leaf[_LEAF_COUNT] = left
        else:
            del obj.leaves[key]

    # ------------------------------------------------------------------
    # range operations

    def lookup_range(self, oid: int, start: int, npages: int) -> Int64Array:
        """Blocks of pages ``start .. start + npages - 1`` as an int64 array.

        ``SWAPBLK_NONE`` where a page has none. Costs one chunk look-up per
        16 pages (vectorised per leaf of 64 chunks for long ranges) plus
        O(npages) to fill the result.
        """
        oid, start, npages = self._check_range(oid, start, npages)
        obj = self._objects.get(oid)
        if obj is None or npages == 0:
            return _no_blocks(npages)
        first = start >> _CHUNK_SHIFT
        last = (start + npages - 1) >> _CHUNK_SHIFT
        nchunks = last - first + 1
        leaves = obj.leaves
        if nchunks <= _LOOKUP_LOOP_MAX_CHUNKS:
            # Gathered in an array.array of the blocks' own type and converted
            # once: far cheaper than one numpy slice assignment per chunk.
            blocks = obj.blocks
            gathered = array(blocks.typecode)
            none_chunk = _NONE_CHUNK_I if blocks.typecode == "i" else _NONE_CHUNK_Q
            pindex = start
            end = start + npages
            while pindex < end:
                chunk = pindex >> _CHUNK_SHIFT
                stop = min(end, (chunk + 1) << _CHUNK_SHIFT)
                leaf = leaves.get(chunk >> _LEAF_SHIFT)
                if leaf is not None and (slot := leaf[chunk & _LEAF_MASK]) >= 0:
                    base = (slot - chunk) << _CHUNK_SHIFT
                    gathered += blocks[base + pindex : base + stop]
                else:
                    gathered += none_chunk[: stop - pindex]
                pindex = stop
            return np.array(gathered, dtype=np.int64)
        positions: list[Int64Array] = []
        slots: list[Int64Array] = []
        for key in self._leaf_keys(obj, first >> _LEAF_SHIFT, last >> _LEAF_SHIFT):
            leaf = leaves[key]
            base = key << _LEAF_SHIFT
            lo = max(first, base)
            hi = min(last + 1, base + _LEAF_CHUNKS)
            leaf_slots = np.frombuffer(leaf, dtype=np.int32)[lo - base : hi - base]
            present = np.flatnonzero(leaf_slots >= 0)
            if len(present):
                positions.append(present + (lo - first))
                slots.append(leaf_slots[present].astype(np.int64))
            del leaf_slots
        padded = np.full((nchunks, SWAP_META_PAGES), SWAPBLK_NONE, dtype=np.int64)
        if positions:
            # Gather straight from a view of the blocks (no copy of the whole
            # object); the view dies here, before anything can resize the array.
            view = np.frombuffer(obj.blocks, dtype=_numpy_type(obj.blocks))
            padded[np.concatenate(positions)] = view.reshape(-1, SWAP_META_PAGES)[
                np.concatenate(slots)
            ]
            del view
        offset = start & _CHUNK_MASK
        return padded.reshape(-1)[offset : offset + npages]

    def free_range(self, oid: int, start: int, npages: int) -> int:
        """Remove and free the blocks of pages ``start .. start + npages - 1``.

        swp_pager_meta_free. Returns how many blocks were freed; consecutive
        block numbers go back in one ``free_blocks`` call. Cost: O(chunks
        spanned), or O(pages of the object) for a range spanning a large part
        of it.
        """
        oid, start, npages = self._check_range(oid, start, npages)
        obj = self._objects.get(oid)
        if obj is None or npages == 0:
            return 0
        end = min(start + npages, _VALUE_MAX + 1)
        first = start >> _CHUNK_SHIFT
        last = (end - 1) >> _CHUNK_SHIFT
        nchunks = last - first + 1
        nslots = len(obj.counts)
        removed: list[int] | Int64Array
        if nchunks <= _LOOP_MAX_CHUNKS or nchunks * _BULK_FRACTION < nslots:
            removed = self._free_range_loop(obj, start, end)
        else:
            removed = self._free_range_bulk(oid, obj, start, end)
        if obj.npages == 0:
            self._objects.pop(oid, None)
        self._free_coalesced(removed)
        return len(removed)

    def _free_range_loop(self, obj: _ObjectMeta, start: int, end: int) -> list[int]:
        """Clear [start, end) chunk by chunk; returns the blocks removed.

        Visits only leaves the object has, so a huge span costs no more than
        the object's leaves.
        """
        removed: list[int] = []
        leaves = obj.leaves
        first = start >> _CHUNK_SHIFT
        last = (end - 1) >> _CHUNK_SHIFT
        for key in self._leaf_keys(obj, first >> _LEAF_SHIFT, last >> _LEAF_SHIFT):
            base_chunk = key << _LEAF_SHIFT
            for chunk in range(max(first, base_chunk), min(last + 1, base_chunk + _LEAF_CHUNKS)):
                # The leaf goes away when its last chunk does.
                leaf = leaves.get(key)
                if leaf is None:
                    break
                slot = leaf[chunk & _LEAF_MASK]
                if slot < 0:
                    continue
                blocks = obj.blocks
                base = (slot - chunk) << _CHUNK_SHIFT
                lo = max(start, chunk << _CHUNK_SHIFT) + base
                hi = min(end, (chunk + 1) << _CHUNK_SHIFT) + base
                if hi - lo == SWAP_META_PAGES:
                    # The whole chunk goes: no need to clear its entries.
                    removed.extend([blk for blk in blocks[lo:hi] if blk >= 0])
                    self._release_slot(obj, slot, chunk)
                    continue
                nfreed = 0
                for i in range(lo, hi):
                    blk = blocks[i]
                    if blk >= 0:
                        removed.append(blk)
                        blocks[i] = SWAPBLK_NONE
                        nfreed += 1
                if nfreed:
                    left = obj.counts[slot] - nfreed
                    obj.counts[slot] = left
                    if left == 0:
                        self._release_slot(obj, slot, chunk)
        obj.npages -= len(removed)
        self._total -= len(removed)
        return removed

    def _free_range_bulk(self, oid: int, obj: _ObjectMeta, start: int, end: int) -> Int64Array:
        """Clear [start, end) by rebuilding the object from numpy arrays."""
        pindexes, blks = obj.arrays()
        inside = (pindexes >= start) & (pindexes < end)
        removed = blks[inside]
        if len(removed) == 0:
            return removed
        keep = ~inside
        rebuilt = _object_from_arrays(pindexes[keep], blks[keep])
        self._total -= len(removed)
        if rebuilt.npages:
            self._objects[oid] = rebuilt
        else:
            del self._objects[oid]
        obj.npages = rebuilt.npages
        return removed

    def free_all(self, oid: int) -> int:
        """Free every block of ``oid`` (swp_pager_meta_free_all). O(pages of oid).

        Returns how many blocks were freed; consecutive block numbers go back
        in one ``free_blocks`` call.
        """
        if type(oid) is not int or oid >> _VALUE_BITS:
            oid = _check_value(oid, "oid")
        obj = self._objects.pop(oid, None)
        if obj is None:
            return 0
        self._total -= obj.npages
        blks = obj.blocks_view().reshape(-1)
        blks = blks[blks >= 0]
        self._free_coalesced(blks)
        return len(blks)

    def transfer(
        self,
        src_oid: int,
        dst_oid: int,
        offset_pages: int,
        dst_npages: int,
        dst_resident: Callable[[int], bool],
    ) -> None:
        """Move ``src_oid``'s blocks into ``dst_oid`` for a collapse (swap_pager_copy).

        Source page ``p`` maps to destination page ``d = p - offset_pages``.
        Its block is freed when ``d`` lies outside ``[0, dst_npages)``, or when
        the destination already has a block at ``d`` or ``dst_resident(d)`` is
        true (the destination's copy wins); otherwise it moves to ``(dst, d)``.
        Afterwards the source has no blocks. ``dst_resident`` is called once
        for each in-range page that the destination has no block for, before
        anything changes, so an exception from it leaves both objects as they
        were. Cost: O(pages of src + pages of dst).
        """
        if type(src_oid) is not int or src_oid >> _VALUE_BITS:
            src_oid = _check_value(src_oid, "src_oid")
        if type(dst_oid) is not int or dst_oid >> _VALUE_BITS:
            dst_oid = _check_value(dst_oid, "dst_oid")
        offset_pages = _check_value(offset_pages, "offset_pages")
        dst_npages = _check_value(dst_npages, "dst_npages")
        if not callable(dst_resident):
            raise TypeError(f"dst_resident must be callable, got {type(dst_resident).__name__}")
        if src_oid == dst_oid:
            raise ValueError(f"src_oid and dst_oid must differ, both are {src_oid}")
        src = self._objects.get(src_oid)
        if src is None:
            return
        src_pindexes, src_blks = src.arrays()
        dst_pindexes = src_pindexes - offset_pages
        inside = (dst_pindexes >= 0) & (dst_pindexes < dst_npages)
        dst = self._objects.get(dst_oid)
        if dst is not None:
            inside &= ~np.isin(dst_pindexes, dst.arrays()[0])
        candidates = np.flatnonzero(inside)
        moving = np.zeros(len(src_blks), dtype=bool)
        for i, d in zip(candidates.tolist(), dst_pindexes[candidates].tolist(), strict=True):
            if not dst_resident(d):
                moving[i] = True
        del self._objects[src_oid]
        self._total -= src.npages
        moved_pindexes = dst_pindexes[moving]
        moved_blks = src_blks[moving]
        if len(moved_blks) > _LOOP_MAX_CHUNKS * SWAP_META_PAGES:
            if dst is not None:
                old_pindexes, old_blks = dst.arrays()
                merged_pindexes = np.concatenate((old_pindexes, moved_pindexes))
                merged_blks = np.concatenate((old_blks, moved_blks))
                order = np.argsort(merged_pindexes, kind="stable")
                moved_pindexes, moved_blks = merged_pindexes[order], merged_blks[order]
                self._total -= dst.npages
            self._objects[dst_oid] = _object_from_arrays(moved_pindexes, moved_blks)
            self._total += len(moved_pindexes)
        else:
            for d, blk in zip(moved_pindexes.tolist(), moved_blks.tolist(), strict=True):
                # The destination has no block at d, so build frees nothing.
                self.build(dst_oid, d, blk)
        self._free_coalesced(src_blks[~moving])

    # ------------------------------------------------------------------
    # queries

    def count(self, oid: int) -> int:
        """How many pages of ``oid`` have a block. O(1)."""
        if type(oid) is not int or oid >> _VALUE_BITS:
            oid = _check_value(oid, "oid")
        obj = self._objects.get(oid)
        return 0 if obj is None else obj.npages

    def total(self) -> int:
        """How many pages of all objects have a block. O(1)."""
        return self._total

    def pages(self, oid: int) -> Iterator[tuple[int, int]]:
        """``(pindex, blk)`` of every assigned page of ``oid``, ascending pindex.

        A snapshot taken at the call: the caller may change the metadata
        while iterating. O(pages of oid).
        """
        if type(oid) is not int or oid >> _VALUE_BITS:
            oid = _check_value(oid, "oid")
        obj = self._objects.get(oid)
        if obj is None:
            return iter(())
        pindexes, blks = obj.arrays()
        return zip(pindexes.tolist(), blks.tolist(), strict=True)

    def objects(self) -> Iterator[int]:
        """Ids of the objects with at least one block, ascending; a snapshot."""
        return iter(sorted(self._objects))

    def items(self) -> Iterator[tuple[int, int, int]]:
        """``(oid, pindex, blk)`` of everything, by oid then pindex; a snapshot.

        Used by swapoff and consistency checks. O(total pages).
        """
        oids, pindexes, blks = self.owner_arrays()
        return zip(oids.tolist(), pindexes.tolist(), blks.tolist(), strict=True)

    def owner_arrays(self) -> tuple[Int64Array, Int64Array, Int64Array]:
        """``(oids, pindexes, blks)`` of every assigned page as int64 arrays.

        Ordered by oid then pindex; fresh arrays the caller may keep. O(total
        pages), vectorised per object.
        """
        parts_oid: list[Int64Array] = []
        parts_pindex: list[Int64Array] = []
        parts_blk: list[Int64Array] = []
        for oid in sorted(self._objects):
            pindexes, blks = self._objects[oid].arrays()
            parts_oid.append(np.full(len(blks), oid, dtype=np.int64))
            parts_pindex.append(pindexes)
            parts_blk.append(blks)
        if not parts_blk:
            empty = np.empty(0, dtype=np.int64)
            return empty, empty.copy(), empty.copy()
        return np.concatenate(parts_oid), np.concatenate(parts_pindex), np.concatenate(parts_blk)

    def statistics(self) -> MetaStatistics:
        """Objects, chunks, assigned pages and approximate bytes. O(objects + leaves)."""
        chunks = 0
        bytes_used = sys.getsizeof(self) + sys.getsizeof(self._objects)
        for oid, obj in self._objects.items():
            chunks += len(obj.counts)
            bytes_used += obj.size_bytes() + sys.getsizeof(oid)
        return MetaStatistics(
            objects=len(self._objects), chunks=chunks, pages=self._total, bytes_used=bytes_used
        )

    def check(self) -> None:
        """Assert every invariant; raise InvariantViolation listing all problems.

        Per object: array lengths agree; every slot's count matches its
        assigned pages and is not zero (no empty chunk kept); slots and chunk
        tables point at each other; leaf counters are right and no empty leaf
        is kept; the page count is right and not zero. Overall: the total is
        right, no value lies outside its range, and no block is assigned
        twice. O(total pages), vectorised.
        """
        problems: list[str] = []
        total = 0
        for oid, obj in self._objects.items():
            if type(oid) is not int or not 0 <= oid <= _VALUE_MAX:
                problems.append(f"object id {oid!r} is not an int in [0, 2**63-1]")
            problems.extend(f"oid {oid}: {text}" for text in self._check_object(obj))
            total += obj.npages
        if total != self._total:
            problems.append(f"total() is {self._total} but the objects hold {total} pages")
        oids, pindexes, blks = self.owner_arrays()
        if len(blks):
            values, times = np.unique(blks, return_counts=True)
            for blk in values[times > 1][:20].tolist():
                owners = np.flatnonzero(blks == blk)[:4]
                where = ", ".join(f"(oid {oids[i]}, pindex {pindexes[i]})" for i in owners.tolist())
                problems.append(f"block {blk} is assigned more than once: {where}")
        if problems:
            raise InvariantViolation(problems)

    @staticmethod
    def _check_object(obj: _ObjectMeta) -> list[str]:
        problems: list[str] = []
        nslots = len(obj.counts)
        if len(obj.owners) != nslots or len(obj.blocks) != nslots * SWAP_META_PAGES:
            return [
                f"array lengths disagree: {nslots} counts, {len(obj.owners)} owners, "
                f"{len(obj.blocks)} block entries"
            ]
        if obj.blocks.typecode not in ("i", "q"):
            problems.append(f"blocks array has typecode {obj.blocks.typecode!r}")
        table = obj.blocks_view()
        if (table < SWAPBLK_NONE).any():
            problems.append(f"{int((table < SWAPBLK_NONE).sum())} block entries are below -1")
        assigned = (table >= 0).sum(axis=1)
        counts = np.frombuffer(obj.counts, dtype=np.uint8).astype(np.int64)
        problems.extend(
            f"slot {slot} counts {counts[slot]} pages but holds {assigned[slot]} blocks"
            for slot in np.flatnonzero(assigned != counts)[:20].tolist()
        )
        problems.extend(
            f"slot {slot} (chunk {obj.owners[slot]}) is empty but kept"
            for slot in np.flatnonzero(assigned == 0)[:20].tolist()
        )
        npages = int(assigned.sum())
        if obj.npages != npages:
            problems.append(f"count is {obj.npages} but the chunks hold {npages} pages")
        if obj.npages == 0:
            problems.append("object with no pages is kept")
        owners = obj.owners_view()
        if (owners < 0).any() or (owners > _VALUE_MAX >> _CHUNK_SHIFT).any():
            problems.append("a slot's chunk index is out of range")
        if len(np.unique(owners)) != nslots:
            problems.append("two slots hold the same chunk")
        seen_slots = 0
        for key, leaf in obj.leaves.items():
            if len(leaf) != _LEAF_CHUNKS + 1 or leaf.typecode != "i":
                problems.append(f"leaf {key} has {len(leaf)} entries of type {leaf.typecode!r}")
                continue
            slots = np.frombuffer(leaf, dtype=np.int32)[:_LEAF_CHUNKS].astype(np.int64)
            present = np.flatnonzero(slots >= 0)
            if leaf[_LEAF_COUNT] != len(present):
                problems.append(
                    f"leaf {key} counts {leaf[_LEAF_COUNT]} chunks but maps {len(present)}"
                )
            if len(present) == 0:
                problems.append(f"leaf {key} is empty but kept")
            if (slots < -1).any() or (slots >= nslots).any():
                problems.append(f"leaf {key} holds a slot number outside [-1, {nslots})")
                continue
            seen_slots += len(present)
            chunks = (key << _LEAF_SHIFT) + present
            mismatched = owners[slots[present]] != chunks
            problems.extend(
                f"leaf {key} maps chunk {chunk} to a slot owned by another chunk"
                for chunk in chunks[mismatched][:20].tolist()
            )
        if seen_slots != nslots:
            problems.append(f"leaves map {seen_slots} chunks but there are {nslots} slots")
        return problems

    # ------------------------------------------------------------------
    # helpers

    @staticmethod
    def _check_range(oid: int, start: int, npages: int) -> tuple[int, int, int]:
        if type(oid) is not int or oid >> _VALUE_BITS:
            oid = _check_value(oid, "oid")
        if type(start) is not int or start >> _VALUE_BITS:
            start = _check_value(start, "start")
        if type(npages) is not int or npages >> _VALUE_BITS:
            npages = _check_value(npages, "npages")
        return oid, start, npages

    @staticmethod
    def _leaf_keys(obj: _ObjectMeta, first: int, last: int) -> list[int]:
        """Keys of the object's leaves in [first, last], ascending."""
        if last - first + 1 <= len(obj.leaves):
            return [key for key in range(first, last + 1) if key in obj.leaves]
        return sorted(key for key in obj.leaves if first <= key <= last)

    def _free_coalesced(self, blks: list[int] | Int64Array) -> None:
        """Return blocks to the allocator, one call per run of consecutive numbers."""
        n = len(blks)
        if n == 0:
            return
        free_blocks = self._free_blocks
        if n < _NUMPY_COALESCE_MIN:
            ordered = sorted(blks.tolist() if isinstance(blks, np.ndarray) else blks)
            run_start = prev = ordered[0]
            for blk in ordered[1:]:
                if blk != prev + 1:
                    free_blocks(run_start, prev - run_start + 1)
                    run_start = blk
                prev = blk
            free_blocks(run_start, prev - run_start + 1)
            return
        ordered_array = np.sort(np.asarray(blks, dtype=np.int64))
        breaks = np.flatnonzero(np.diff(ordered_array) != 1) + 1
        starts = np.concatenate(([0], breaks)).tolist()
        ends = np.concatenate((breaks, [n])).tolist()
        firsts = ordered_array[starts].tolist()
        for blk, lo, hi in zip(firsts, starts, ends, strict=True):
            free_blocks(blk, hi - lo)
