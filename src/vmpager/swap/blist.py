"""FreeBSD's radix-tree bitmap allocator ("blist") for swap blocks.

A :class:`Blist` manages ``nblocks`` blocks, each free or allocated, and hands
out contiguous runs of them. Placement is FreeBSD's: address-ordered first fit
starting at a cursor; after each allocation the cursor moves to the end of the
run (to block 0 when that is the end of the space); a search that finds nothing
from the cursor is repeated once from block 0.

Layout
------
The bitmap is cut into *leaves* of ``leaf_bits`` blocks; a leaf is one Python
int whose bit ``b`` is set when block ``leaf_base + b`` is free. Python ints
are immutable, so every all-free leaf of a new blist is the same object: a
blist of 2**32 blocks costs two lists of pointers at creation (16 bytes per
leaf) and grows to about one bit per block only where it is used.

Above the leaves sits a radix tree of *meta* levels with ``fanout`` children
per node, up to a single root. Each node (leaf or meta) has

* a bitmap (meta nodes only) of which children still hold a free block, so a
  search skips exhausted subtrees with a few bit operations, and
* a *size hint*: an upper bound on the longest run that can be allocated
  starting inside the node (it may be too high, never too low). A search for
  ``count`` blocks does not enter a node whose hint is below ``count``.

Hint rules. A search that scans a whole meta node without success lowers its
hint to ``count - 1``; a leaf search that fails records the leaf's longest
free run (exact, a few shift-and steps). As in FreeBSD, a node whose last
block is free keeps an unbounded hint, because a run starting in it may
continue into the next node and grow when blocks there are freed; such a node
is marked ``_CROSSING`` when its own search failed. Freeing blocks makes the
hints on the path to them unbounded, stopping at the first node that already
is: the tree keeps "an unbounded node has an unbounded parent" (which is what
``_CROSSING`` and the hint 0 of exhausted nodes are for), so in the common case
a free touches no hint at all.

With hints, a failing search is cut short at the highest node that cannot
hold the request, so searches cost O(fanout x height) = O(log nblocks) node
visits instead of a scan of the bitmap.

Why these widths: CPython pays about the same per operation on a 1024-bit int
as on a 64-bit one (the interpreter dominates), so wide leaves make the tree
shallow and let the common case -- the run lies in the cursor's leaf -- be a
handful of big-int operations: a run of ``count`` free bits is found with
``ceil(log2(count))`` shift-and steps and ``(m & -m).bit_length()``. Narrower
leaves send more requests down the tree walk; wider ones make every big-int
operation dearer (measurements in ``docs/blist.md``). A fan-out of 64 keeps a
2**20-block blist at two meta levels and a 2**32-block one at four.

Cost: ``alloc`` is one mask test when the run starts at the cursor (the usual
case), O(log2(count)) big-int operations when it starts later in the cursor's
leaf, else O(fanout x height) node visits plus O(count / leaf_bits) for runs
that span leaves. ``free`` and ``fill`` are O(height + count / leaf_bits).
Memory: about 1.4 bits per block once every leaf is materialised, 16 bytes per
leaf of pointers before; see ``docs/blist.md``.

Concurrency: a blist is not thread-safe; the caller holds the VM lock. No
method blocks.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from vmpager.errors import InvariantViolation
from vmpager.units import check_int

__all__ = [
    "DEFAULT_FANOUT",
    "DEFAULT_LEAF_BITS",
    "MAX_NBLOCKS",
    "Blist",
    "BlistStatistics",
    "GapHistogram",
]

#: Blocks per leaf bitmap (one Python int per leaf).
DEFAULT_LEAF_BITS = 1024
#: Children per meta node.
DEFAULT_FANOUT = 64
#: Largest supported space. Creation costs 16 bytes per leaf of pointers, so
#: 2**40 blocks with the default leaves would take 16 GiB before any use.
MAX_NBLOCKS = 1 << 40

#: Hint of a node that may hold a run of any length. Invariant: the parent of
#: a node with this hint has it too, so a free can stop raising hints at the
#: first node that already has it.
_UNBOUNDED = 1 << 62
#: Also "any length", for a node whose search from its start failed only
#: because its top run did not continue far enough into the next node. Such a
#: node cannot be lowered (the next node may gain free blocks), but none of its
#: children is _UNBOUNDED any more, so its parent may be lowered.
_CROSSING = _UNBOUNDED - 1

#: Size classes of the free-run histogram: Fibonacci numbers, as FreeBSD's
#: ``blist_stats`` uses (bucket i holds runs of FIB[i] .. FIB[i + 1] - 1).
_FIB: tuple[int, ...] = (
    1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233, 377, 610, 987, 1597, 2584,
    4181, 6765, 10946, 17711, 28657, 46368, 75025, 121393, 196418, 317811,
    514229, 832040, 1346269, 2178309, 3524578,
)  # fmt: skip


#: Requests up to this many blocks take the fast paths of alloc and free.
_FAST_MAX = 64
#: _RUNS[n]: n low bits set.
_RUNS: tuple[int, ...] = tuple((1 << n) - 1 for n in range(_FAST_MAX + 1))


def _shift_steps(count: int) -> tuple[int, ...]:
    """Shift amounts with which ``_run_starts`` turns single free bits into runs of ``count``."""
    steps: list[int] = []
    covered = 1
    while covered < count:
        step = covered if covered <= count - covered else count - covered
        steps.append(step)
        covered += step
    return tuple(steps)


#: _SHIFTS[n]: the shift-and steps for runs of n blocks.
_SHIFTS: tuple[tuple[int, ...], ...] = tuple(_shift_steps(n) for n in range(_FAST_MAX + 1))


def _run_starts(bits: int, count: int) -> int:
    """Mask of positions ``p`` where bits ``p .. p + count - 1`` of ``bits`` are all set.

    ``ceil(log2(count))`` shift-and steps: after each step a set bit stands
    for a run twice as long (or exactly as long as needed in the last step).
    """
    covered = 1
    while covered < count:
        step = covered if covered <= count - covered else count - covered
        bits &= bits >> step
        covered += step
    return bits


def _longest_run(bits: int) -> int:
    """Length of the longest run of set bits in a non-negative ``bits``.

    Doubles the run length while runs that long exist, then refines by
    halving steps: about ``2 log2(longest)`` big-int operations.
    """
    if not bits:
        return 0
    length = 1
    while True:
        longer = bits & (bits >> length)
        if not longer:
            break
        bits = longer
        length <<= 1
    # Runs of `length` blocks start at the set bits of `bits`; none of 2 * length.
    step = length >> 1
    while step:
        longer = bits & (bits >> step)
        if longer:
            bits = longer
            length += step
        step >>= 1
    return length


def _trailing_ones(bits: int) -> int:
    """Number of consecutive set bits from bit 0 of a non-negative ``bits``."""
    return (~bits & (bits + 1)).bit_length() - 1


def _nonempty_bitmap(children: list[int]) -> int:
    """Bitmap with bit ``d`` set when ``children[d]`` is non-zero (has a free block)."""
    zeros = children.count(0)
    if zeros == 0:
        return (1 << len(children)) - 1
    if zeros == len(children):
        return 0
    return sum(1 << d for d, child in enumerate(children) if child)


def _hints_for(nodes: list[int]) -> list[int]:
    """Fresh hints: unbounded for nodes with a free block, 0 for exhausted ones."""
    if not nodes.count(0):
        return [_UNBOUNDED] * len(nodes)
    return [_UNBOUNDED if node else 0 for node in nodes]


@dataclass(frozen=True, slots=True)
class GapHistogram:
    """Free runs ("gaps") of a blist by size, like FreeBSD's ``blist_stats``.

    ``buckets`` lists ``(min_len, max_len, nruns)`` for every non-empty size
    class; size classes are Fibonacci ranges (1, 2, 3-4, 5-7, 8-12, ...), the
    last one open-ended (``max_len`` is then the longest run).
    """

    nruns: int
    free_blocks: int
    longest: int
    average: int
    buckets: tuple[tuple[int, int, int], ...]

    def format(self) -> str:
        """Render the histogram as text, one size class per line."""
        lines = [
            f"number of maximal free ranges: {self.nruns}",
            f"largest free range: {self.longest}",
            f"average maximal free range size: {self.average}",
            "number of maximal free ranges of different sizes:",
            "               count  |  size range",
            "               -----  |  ----------",
        ]
        for lo, hi, n in self.buckets:
            span = str(lo) if lo == hi else f"{lo} to {hi}"
            lines.append(f"{n:20d}  |  {span}")
        return "\n".join(lines) + "\n"


@dataclass(frozen=True, slots=True)
class BlistStatistics:
    """State and counters of one blist.

    ``alloc_retries`` counts searches that found nothing from the cursor and
    were repeated from block 0; ``slow_searches`` counts allocations that had
    to walk the tree (the rest were served from the cursor's leaf).
    """

    nblocks: int
    free_blocks: int
    used_blocks: int
    cursor: int
    leaf_bits: int
    fanout: int
    height: int
    nleaves: int
    materialised_leaves: int
    alloc_calls: int
    alloc_failures: int
    alloc_retries: int
    slow_searches: int
    free_calls: int
    fill_calls: int
    blocks_filled: int


class Blist:
    """A radix-tree bitmap allocator over blocks ``0 .. nblocks - 1``.

    All blocks are free at creation. ``leaf_bits`` and ``fanout`` (powers of
    two, ``leaf_bits >= 2``, ``fanout >= 2``) set the tree's geometry; the
    defaults suit swap spaces from a few blocks to 2**40. Not thread-safe:
    the caller holds the VM lock.
    """

    __slots__ = (
        "_alloc_calls",
        "_alloc_failures",
        "_alloc_retries",
        "_avail",
        "_blocks_filled",
        "_cursor",
        "_fanout",
        "_fill_calls",
        "_free_calls",
        "_fshift",
        "_full_leaf",
        "_hints",
        "_lbits",
        "_leaf_hints",
        "_leaves",
        "_lmask",
        "_lshift",
        "_nblocks",
        "_nleaves",
        "_nonempty",
        "_slow_searches",
    )

    def __init__(
        self,
        nblocks: int,
        *,
        leaf_bits: int = DEFAULT_LEAF_BITS,
        fanout: int = DEFAULT_FANOUT,
    ) -> None:
        nblocks = check_int(nblocks, "nblocks", minimum=1, maximum=MAX_NBLOCKS)
        leaf_bits = check_int(leaf_bits, "leaf_bits", minimum=2, maximum=1 << 16)
        fanout = check_int(fanout, "fanout", minimum=2, maximum=1 << 12)
        if leaf_bits & (leaf_bits - 1):
            raise ValueError(f"leaf_bits must be a power of two, got {leaf_bits}")
        if fanout & (fanout - 1):
            raise ValueError(f"fanout must be a power of two, got {fanout}")
        self._lbits = leaf_bits
        self._lshift = leaf_bits.bit_length() - 1
        self._lmask = leaf_bits - 1
        self._fanout = fanout
        self._fshift = fanout.bit_length() - 1
        self._full_leaf = (1 << leaf_bits) - 1
        self._nblocks = 0
        self._nleaves = 0
        self._leaves: list[int] = []
        # _hints[0] are the leaves' hints, _hints[k] those of meta level k;
        # _nonempty[k] (k >= 1) the child bitmaps of meta level k; the last
        # level holds the root alone. _nonempty[0] is an unused placeholder.
        self._hints: list[list[int]] = []
        self._nonempty: list[list[int]] = []
        self._cursor = 0
        self._avail = 0
        self._alloc_calls = 0
        self._alloc_failures = 0
        self._alloc_retries = 0
        self._slow_searches = 0
        self._free_calls = 0
        self._fill_calls = 0
        self._blocks_filled = 0
        self._build(nblocks, self._tail_leaves(0, nblocks, free=True), nblocks)

    # ------------------------------------------------------------------
    # construction

    def _tail_leaves(self, first_block: int, end_block: int, *, free: bool) -> list[int]:
        """Leaves for blocks ``first_block .. end_block - 1`` (leaf aligned start).

        All free leaves share one int object, so a huge blist costs a list of
        pointers until it is used.
        """
        nleaves = -(-(end_block - first_block) // self._lbits)
        if not free:
            return [0] * nleaves
        leaves = [self._full_leaf] * nleaves
        tail = (end_block - first_block) & self._lmask
        if tail:
            leaves[-1] = (1 << tail) - 1
        return leaves

    def _build(self, nblocks: int, leaves: list[int], avail: int) -> None:
        """Install ``leaves`` (``avail`` free blocks) for ``nblocks`` blocks; rebuild the tree.

        Every hint becomes unbounded, which is always a valid upper bound.

        O(nleaves) list operations; meta nodes over runs of all-free or
        all-allocated leaves are built with C-level list scans.
        """
        fshift = self._fshift
        fanout = self._fanout
        self._nblocks = nblocks
        self._nleaves = len(leaves)
        self._leaves = leaves
        hints = [_hints_for(leaves)]
        nonempty: list[list[int]] = [[]]
        level: list[int] = leaves
        while True:
            nnodes = -(-len(level) // fanout)
            bitmaps = [0] * nnodes
            for node in range(nnodes):
                bitmaps[node] = _nonempty_bitmap(level[node << fshift : (node + 1) << fshift])
            hints.append(_hints_for(bitmaps))
            nonempty.append(bitmaps)
            level = bitmaps
            if nnodes == 1:
                break
        self._hints = hints
        self._leaf_hints = hints[0]
        self._nonempty = nonempty
        self._avail = avail

    # ------------------------------------------------------------------
    # public API

    @property
    def nblocks(self) -> int:
        """Number of blocks the blist manages."""
        return self._nblocks

    @property
    def cursor(self) -> int:
        """Block where the next first-fit search starts."""
        return self._cursor

    def avail(self) -> int:
        """Number of free blocks. O(1)."""
        return self._avail

    def alloc(self, count: int, maxcount: int | None = None) -> tuple[int, int] | None:
        """Allocate a run of at least ``count`` and at most ``maxcount`` blocks.

        Returns ``(first_block, nblocks_taken)`` with ``count <= nblocks_taken
        <= maxcount`` (``maxcount`` defaults to ``count``), or ``None`` when no
        free run of ``count`` blocks exists anywhere.

        Placement (FreeBSD's ``blist_alloc(bl, &count, maxcount)``): the first
        block ``b >= cursor`` such that ``b .. b + count - 1`` are free; if
        there is none, the first such ``b >= 0``. From ``b`` it takes as many
        free blocks as follow contiguously, up to ``maxcount``. The cursor then
        moves to the end of the run (0 if that is the end of the space).

        Raises ``ValueError``/``TypeError`` for ``count < 1`` or ``maxcount <
        count``. Cost: O(log nblocks) node visits plus O(taken / leaf_bits);
        a run of up to 64 blocks found in the cursor's leaf costs a few big-int
        operations.
        """
        if maxcount is None and count.__class__ is int and 0 < count <= _FAST_MAX:
            # Fast path: the run lies in the cursor's leaf. A run that fits
            # there is the first fit: an earlier candidate would have to start
            # at or after the cursor and reach past the leaf, hence start later.
            cursor = self._cursor
            leaf_index = cursor >> self._lshift
            offset = cursor & self._lmask
            leaves = self._leaves
            bits = leaves[leaf_index]
            mask = _RUNS[count] << offset
            if bits & mask != mask:
                starts = bits >> offset
                for step in _SHIFTS[count]:
                    starts &= starts >> step
                if not starts:
                    if bits >> self._lmask:
                        # The top block is free: a run may cross into the next leaf.
                        return self._alloc_slow(count, count)
                    # Nothing starts in this leaf from the cursor on: remember the
                    # leaf's longest run and go on from the next leaf.
                    longest = _longest_run(bits)
                    leaf_hints = self._hints[0]
                    if leaf_hints[leaf_index] > longest:
                        leaf_hints[leaf_index] = longest
                    return self._place(count, count, (leaf_index + 1) << self._lshift)
                skip = (starts & -starts).bit_length() - 1
                cursor += skip
                mask <<= skip
            bits ^= mask
            leaves[leaf_index] = bits
            if not bits:
                self._clear_nonempty(leaf_index)
            end = cursor + count
            self._cursor = end if end != self._nblocks else 0
            self._avail -= count
            self._alloc_calls += 1
            return cursor, count
        return self._alloc_slow(count, maxcount)

    def _alloc_slow(self, count: int, maxcount: int | None) -> tuple[int, int] | None:
        """``alloc`` by a walk of the tree from the cursor (and from 0), validating arguments."""
        if maxcount is None:
            count = maxcount = check_int(count, "count", minimum=1)
        else:
            count = check_int(count, "count", minimum=1)
            maxcount = check_int(maxcount, "maxcount", minimum=count)
        return self._place(count, maxcount, self._cursor)

    def _place(self, count: int, maxcount: int, start: int) -> tuple[int, int] | None:
        """Allocate by a walk of the tree: first fit from ``start``, then once from block 0.

        ``start`` is the cursor, or a later block when the blocks from the
        cursor up to ``start`` are known to hold no candidate.
        """
        self._alloc_calls += 1
        if count > self._avail:
            self._alloc_failures += 1
            return None
        self._slow_searches += 1
        blk = self._find(start, count)
        # A walk that began past the cursor's leaf did not cover the tree from
        # block 0, so repeat it even when the cursor is 0: then the hints on
        # the way record the failure.
        if blk < 0 and (self._cursor or start):
            self._alloc_retries += 1
            blk = self._find(0, count)
        if blk < 0:
            self._alloc_failures += 1
            return None
        taken = count if maxcount == count else self._free_run_length(blk, maxcount)
        self._take(blk, taken)
        self._avail -= taken
        end = blk + taken
        self._cursor = 0 if end == self._nblocks else end
        return blk, taken

    def free(self, blk: int, count: int) -> None:
        """Free blocks ``blk .. blk + count - 1``, which must all be allocated.

        Raises ``ValueError`` (and changes nothing) when the range leaves the
        space or any block in it is already free (a double free). Cost:
        O(height + count / leaf_bits).
        """
        if blk.__class__ is int and count.__class__ is int and 0 < count <= _FAST_MAX and blk >= 0:
            # Fast path: the range lies in one leaf.
            offset = blk & self._lmask
            if offset + count <= self._lbits and blk + count <= self._nblocks:
                leaf_index = blk >> self._lshift
                leaves = self._leaves
                bits = leaves[leaf_index]
                mask = _RUNS[count] << offset
                if not bits & mask:
                    leaves[leaf_index] = bits | mask
                    if not bits:
                        self._set_nonempty(leaf_index)
                    if self._leaf_hints[leaf_index] is not _UNBOUNDED:
                        self._raise_hints(leaf_index)
                    self._avail += count
                    self._free_calls += 1
                    return
        blk, count = self._check_range(blk, count)
        first_free = self._first_free_in(blk, count)
        if first_free >= 0:
            raise ValueError(
                f"double free: block {first_free} of blocks [{blk}, {blk + count}) is already free"
            )
        self._free_calls += 1
        self._release(blk, count)
        self._avail += count

    def fill(self, blk: int, count: int) -> int:
        """Allocate blocks ``blk .. blk + count - 1`` whatever their state.

        Returns how many of them were free before (and are now taken). Used
        for reservations, bad blocks and swapoff. The cursor does not move.
        Raises ``ValueError`` when the range leaves the space. Cost:
        O(height + count / leaf_bits).
        """
        blk, count = self._check_range(blk, count)
        taken = self._take(blk, count)
        self._avail -= taken
        self._fill_calls += 1
        self._blocks_filled += taken
        return taken

    def resize(self, nblocks: int, free_new: bool = True) -> None:
        """Change the number of blocks to ``nblocks``.

        Growing adds blocks that are free when ``free_new`` is true, else
        allocated (to be freed later by the caller). Shrinking drops the blocks
        ``nblocks ..`` and refuses with ``ValueError`` (changing nothing) if any
        of them is allocated: free or move them first. As FreeBSD's
        ``blist_resize`` (which builds a new blist), the cursor returns to 0.
        Hints are reset to unbounded. Cost: O(nleaves) list operations.
        """
        nblocks = check_int(nblocks, "nblocks", minimum=1, maximum=MAX_NBLOCKS)
        old = self._nblocks
        lbits = self._lbits
        if nblocks < old:
            drop = old - nblocks
            run = self._free_run_length(nblocks, drop)
            if run < drop:
                raise ValueError(
                    f"cannot shrink to nblocks={nblocks}: block {nblocks + run} in "
                    f"[{nblocks}, {old}) is allocated"
                )
            leaves = self._leaves[: -(-nblocks // lbits)]
            tail = nblocks & self._lmask
            if tail:
                leaves[-1] &= (1 << tail) - 1
            avail = self._avail - drop
        else:
            leaves = list(self._leaves)
            last_base = (len(leaves) - 1) << self._lshift
            leaf_end = last_base + lbits
            if free_new and old < leaf_end:
                upto = min(nblocks, leaf_end)
                leaves[-1] |= ((1 << (upto - old)) - 1) << (old - last_base)
            if nblocks > leaf_end:
                leaves += self._tail_leaves(leaf_end, nblocks, free=free_new)
            avail = self._avail + (nblocks - old if free_new else 0)
        self._build(nblocks, leaves, avail)
        self._cursor = 0

    def gap_histogram(self) -> GapHistogram:
        """Count the maximal free runs by size class (FreeBSD's ``blist_stats``).

        Cost: one pass over the leaves; all-free and all-allocated leaves cost
        a comparison each.
        """
        counts = [0] * len(_FIB)
        nruns = 0
        longest = 0
        total = 0
        for _start, length in self._free_runs():
            nruns += 1
            total += length
            longest = max(longest, length)
            lo, hi = 0, len(_FIB)
            while hi - lo > 1:
                mid = (lo + hi) >> 1
                if _FIB[mid] <= length:
                    lo = mid
                else:
                    hi = mid
            counts[lo] += 1
        buckets: list[tuple[int, int, int]] = []
        for i, n in enumerate(counts):
            if n:
                upper = _FIB[i + 1] - 1 if i + 1 < len(_FIB) else longest
                buckets.append((_FIB[i], min(upper, longest), n))
        return GapHistogram(
            nruns=nruns,
            free_blocks=total,
            longest=longest,
            average=total // nruns if nruns else 0,
            buckets=tuple(buckets),
        )

    def statistics(self) -> BlistStatistics:
        """Return the state and counters as a frozen dataclass. O(nleaves) for the leaf count."""
        full = self._full_leaf
        materialised = sum(1 for leaf in self._leaves if leaf and leaf is not full)
        return BlistStatistics(
            nblocks=self._nblocks,
            free_blocks=self._avail,
            used_blocks=self._nblocks - self._avail,
            cursor=self._cursor,
            leaf_bits=self._lbits,
            fanout=self._fanout,
            height=len(self._hints) - 1,
            nleaves=self._nleaves,
            materialised_leaves=materialised,
            alloc_calls=self._alloc_calls,
            alloc_failures=self._alloc_failures,
            alloc_retries=self._alloc_retries,
            slow_searches=self._slow_searches,
            free_calls=self._free_calls,
            fill_calls=self._fill_calls,
            blocks_filled=self._blocks_filled,
        )

    def is_free(self, blk: int) -> bool:
        """True when block ``blk`` is free. O(1)."""
        blk = check_int(blk, "blk", maximum=self._nblocks - 1)
        return bool(self._leaves[blk >> self._lshift] >> (blk & self._lmask) & 1)

    def free_runs(self) -> Iterator[tuple[int, int]]:
        """Yield ``(first_block, length)`` of every maximal free run, in address order."""
        return self._free_runs()

    def __len__(self) -> int:
        return self._nblocks

    def __repr__(self) -> str:
        return f"Blist(nblocks={self._nblocks}, free={self._avail}, cursor={self._cursor})"

    # ------------------------------------------------------------------
    # search

    def _find(self, start: int, count: int) -> int:
        """First block ``b >= start`` with ``b .. b + count - 1`` free, or -1.

        Lowers the hints of nodes it scans completely without success.
        """
        top = len(self._hints) - 1
        if self._hints[top][0] < count:
            return -1
        return self._meta_find(top, 0, start, count)

    def _meta_find(self, level: int, node: int, start: int, count: int) -> int:
        fshift = self._fshift
        child_shift = self._lshift + (level - 1) * fshift
        base = node << (child_shift + fshift)
        if start > base:
            digit = (start - base) >> child_shift
            from_start = False
        else:
            digit = 0
            from_start = True
        mask = self._nonempty[level][node] >> digit << digit
        child_hints = self._hints[level - 1]
        first_child = node << fshift
        while mask:
            low = mask & -mask
            child = first_child + low.bit_length() - 1
            if child_hints[child] >= count:
                if level == 1:
                    found = self._leaf_find(child, start, count)
                else:
                    found = self._meta_find(level - 1, child, start, count)
                if found >= 0:
                    return found
            mask ^= low
        if from_start:
            # Every child now has a hint below count, 0, or _CROSSING.
            hints = self._hints[level]
            if self._is_free_or_past(((node + 1) << (child_shift + fshift)) - 1):
                if hints[node] is _UNBOUNDED:
                    hints[node] = _CROSSING
            elif hints[node] >= count:
                hints[node] = count - 1
        return -1

    def _leaf_find(self, leaf: int, start: int, count: int) -> int:
        """First fit for ``count`` blocks starting in ``leaf`` at or after ``start``, or -1.

        A run wholly inside the leaf is found by shift-and steps; failing
        that, the free run reaching the leaf's top is a candidate if it
        continues far enough into the next leaves. On failure with the top
        block taken, the leaf's hint becomes its longest free run.
        """
        base = leaf << self._lshift
        bits = self._leaves[leaf]
        offset = start - base if start > base else 0
        window = bits >> offset
        if count <= _FAST_MAX:
            starts = window
            for step in _SHIFTS[count]:
                starts &= starts >> step
        else:
            starts = _run_starts(window, count)
        if starts:
            return base + offset + (starts & -starts).bit_length() - 1
        if not bits >> self._lmask:
            longest = _longest_run(bits)
            hints = self._hints[0]
            if hints[leaf] > longest:
                hints[leaf] = longest
            return -1
        # The top block is free: the run reaching it may continue in the next leaves.
        top_run = (~bits & self._full_leaf).bit_length()
        blk = base + (top_run if top_run > offset else offset)
        if self._free_run_length(blk, count) >= count:
            return blk
        # Not far enough. The hint stays unbounded: freeing blocks in the next
        # leaf could make this run long enough.
        self._leaf_hints[leaf] = _CROSSING
        return -1

    def _is_free_or_past(self, blk: int) -> bool:
        """True when ``blk`` is a free block (False for blocks past the end)."""
        if blk >= self._nblocks:
            return False
        return bool(self._leaves[blk >> self._lshift] >> (blk & self._lmask) & 1)

    def _free_run_length(self, blk: int, limit: int) -> int:
        """``min(limit, length of the free run starting at blk)``. O(1 + limit / leaf_bits)."""
        lshift = self._lshift
        leaves = self._leaves
        leaf = blk >> lshift
        offset = blk & self._lmask
        if leaf >= self._nleaves:
            return 0
        run = _trailing_ones(leaves[leaf] >> offset)
        width = self._lbits - offset
        if run < width or run >= limit:
            return min(run, limit)
        full = self._full_leaf
        nleaves = self._nleaves
        leaf += 1
        while run < limit and leaf < nleaves:
            bits = leaves[leaf]
            if bits == full:
                run += self._lbits
                leaf += 1
                continue
            run += _trailing_ones(bits)
            break
        return min(run, limit)

    def _first_free_in(self, blk: int, count: int) -> int:
        """First free block in ``blk .. blk + count - 1``, or -1 if all are allocated.

        Whole leaves in the middle of the range are scanned at C speed.
        """
        lshift = self._lshift
        leaves = self._leaves
        first, head_mask, last, tail_mask = self._span(blk, count)
        bits = leaves[first] & head_mask
        if not bits and last != first:
            middle = leaves[first + 1 : last]
            if middle.count(0) != len(middle):
                for index, leaf_bits in enumerate(middle):
                    if leaf_bits:
                        first += 1 + index
                        bits = leaf_bits
                        break
            else:
                first = last
                bits = leaves[last] & tail_mask
        if not bits:
            return -1
        return (first << lshift) + (bits & -bits).bit_length() - 1

    def _span(self, blk: int, count: int) -> tuple[int, int, int, int]:
        """Split ``blk .. blk + count - 1`` into leaves.

        Returns ``(first_leaf, first_mask, last_leaf, last_mask)``: the masks
        select the range's bits in its first and last leaf (the same leaf when
        ``first_leaf == last_leaf``); leaves in between are wholly inside.
        """
        lshift = self._lshift
        lmask = self._lmask
        end = blk + count
        first = blk >> lshift
        last = (end - 1) >> lshift
        if first == last:
            mask = ((1 << count) - 1) << (blk & lmask)
            return first, mask, last, mask
        head_mask = self._full_leaf ^ ((1 << (blk & lmask)) - 1)
        tail_mask = (2 << ((end - 1) & lmask)) - 1
        return first, head_mask, last, tail_mask

    # ------------------------------------------------------------------
    # updates

    def _take(self, blk: int, count: int) -> int:
        """Mark ``blk .. blk + count - 1`` allocated; return how many were free.

        Hints stay valid (taking blocks only shortens runs); meta bitmaps lose
        the children that become fully allocated.
        """
        leaves = self._leaves
        first, head_mask, last, tail_mask = self._span(blk, count)
        bits = leaves[first]
        hit = bits & head_mask
        taken = hit.bit_count()
        if hit:
            bits ^= hit
            leaves[first] = bits
            if not bits and first == last:
                self._clear_nonempty(first)
        if first == last:
            return taken
        if last - first > 1:
            middle = leaves[first + 1 : last]
            full = middle.count(self._full_leaf)
            if full == len(middle):
                taken += full * self._lbits
            else:
                taken += sum(map(int.bit_count, middle))
            leaves[first + 1 : last] = [0] * len(middle)
        bits = leaves[last]
        hit = bits & tail_mask
        if hit:
            taken += hit.bit_count()
            leaves[last] = bits ^ hit
        self._refresh_nonempty(first, last)
        return taken

    def _clear_nonempty(self, leaf: int) -> None:
        """Leaf ``leaf`` became fully allocated: clear its bit up the tree as far as needed."""
        fshift = self._fshift
        fmask = self._fanout - 1
        node = leaf
        nonempty = self._nonempty
        hints = self._hints
        hints[0][leaf] = 0
        for level in range(1, len(nonempty)):
            parent = node >> fshift
            bitmaps = nonempty[level]
            bits = bitmaps[parent] & ~(1 << (node & fmask))
            bitmaps[parent] = bits
            if bits:
                return
            hints[level][parent] = 0
            node = parent

    def _refresh_nonempty(self, first_leaf: int, last_leaf: int) -> None:
        """Recompute the meta bitmaps above leaves ``first_leaf .. last_leaf``.

        O((last_leaf - first_leaf) / fanout + height) node rebuilds.
        """
        fshift = self._fshift
        lo, hi = first_leaf, last_leaf
        children: list[int] = self._leaves
        hints = self._hints
        for child in range(lo, hi + 1):
            if not children[child]:
                hints[0][child] = 0
        for level in range(1, len(hints)):
            bitmaps = self._nonempty[level]
            level_hints = hints[level]
            lo >>= fshift
            hi >>= fshift
            for node in range(lo, hi + 1):
                bits = _nonempty_bitmap(children[node << fshift : (node + 1) << fshift])
                bitmaps[node] = bits
                if not bits:
                    level_hints[node] = 0
            children = bitmaps

    def _release(self, blk: int, count: int) -> None:
        """Mark ``blk .. blk + count - 1`` (all allocated) free; raise hints and bitmaps above."""
        fshift = self._fshift
        leaves = self._leaves
        first, head_mask, last, tail_mask = self._span(blk, count)
        was_empty = not leaves[first]
        leaves[first] |= head_mask
        if first != last:
            if last - first > 1:
                leaves[first + 1 : last] = [self._full_leaf] * (last - first - 1)
            leaves[last] |= tail_mask
            self._refresh_nonempty(first, last)
        elif was_empty:
            self._set_nonempty(first)
        lo, hi = first, last
        for level_hints in self._hints:
            level_hints[lo : hi + 1] = [_UNBOUNDED] * (hi - lo + 1)
            lo >>= fshift
            hi >>= fshift

    def _raise_hints(self, leaf: int) -> None:
        """Blocks of ``leaf`` were freed: make the hints on its path unbounded.

        Stops at the first node already unbounded: its ancestors are too.
        """
        fshift = self._fshift
        node = leaf
        for hints in self._hints:
            if hints[node] is _UNBOUNDED:
                return
            hints[node] = _UNBOUNDED
            node >>= fshift

    def _set_nonempty(self, leaf: int) -> None:
        """Leaf ``leaf`` gained its first free block: set its bit up the tree as far as needed."""
        fshift = self._fshift
        fmask = self._fanout - 1
        node = leaf
        for bitmaps in self._nonempty[1:]:
            parent = node >> fshift
            bits = bitmaps[parent]
            bitmaps[parent] = bits | (1 << (node & fmask))
            if bits:
                return
            node = parent

    def _check_range(self, blk: int, count: int) -> tuple[int, int]:
        blk = check_int(blk, "blk", maximum=self._nblocks - 1)
        count = check_int(count, "count", minimum=1, maximum=self._nblocks - blk)
        return blk, count

    # ------------------------------------------------------------------
    # inspection

    def _free_runs(self) -> Iterator[tuple[int, int]]:
        full = self._full_leaf
        lbits = self._lbits
        run_start = -1
        base = 0
        for bits in self._leaves:
            if bits == full:
                if run_start < 0:
                    run_start = base
            elif not bits:
                if run_start >= 0:
                    yield run_start, base - run_start
                    run_start = -1
            else:
                # Bit transitions: set in `edges` where a bit differs from the one below it.
                edges = bits ^ (bits << 1)
                if run_start >= 0:
                    edges ^= 1
                edges &= (1 << lbits) - 1
                while edges:
                    low = edges & -edges
                    pos = base + low.bit_length() - 1
                    if run_start < 0:
                        run_start = pos
                    else:
                        yield run_start, pos - run_start
                        run_start = -1
                    edges ^= low
            base += lbits
        if run_start >= 0:
            yield run_start, min(base, self._nblocks) - run_start

    def check(self) -> None:
        """Assert every invariant; raise ``InvariantViolation`` listing all broken ones.

        Checks leaf shape and the blocks past the end, the free count, the
        cursor, every meta bitmap, and that every hint bounds the runs that can
        start in its node (unbounded when the node's last block is free).
        Cost: O(nleaves + nruns x height).
        """
        problems: list[str] = []
        nblocks = self._nblocks
        lbits = self._lbits
        fshift = self._fshift
        leaves = self._leaves
        nleaves = -(-nblocks // lbits)
        if self._nleaves != nleaves or len(leaves) != nleaves:
            problems.append(f"{len(leaves)} leaves (recorded {self._nleaves}), expected {nleaves}")
            raise InvariantViolation(problems)
        for index, bits in enumerate(leaves):
            if bits < 0 or bits >> lbits:
                problems.append(f"leaf {index} has bits outside 0..{lbits - 1}: {bits:#x}")
        tail = nblocks & self._lmask
        if tail and leaves[-1] >> tail:
            problems.append(f"blocks past the end ({nblocks}) are marked free")
        counted = sum(bits.bit_count() for bits in leaves if bits)
        if counted != self._avail:
            problems.append(f"avail is {self._avail} but {counted} blocks are free")
        if not 0 <= self._cursor < nblocks:
            problems.append(f"cursor {self._cursor} outside [0, {nblocks})")
        levels = len(self._hints)
        if len(self._nonempty) != levels or len(self._hints[-1]) != 1:
            problems.append("tree levels are inconsistent")
            raise InvariantViolation(problems)
        children: list[int] = leaves
        for level in range(1, levels):
            bitmaps = self._nonempty[level]
            expected_nodes = -(-len(children) // self._fanout)
            if len(bitmaps) != expected_nodes or len(self._hints[level]) != expected_nodes:
                problems.append(
                    f"level {level} has {len(bitmaps)} nodes, expected {expected_nodes}"
                )
                raise InvariantViolation(problems)
            for node, bits in enumerate(bitmaps):
                expected = _nonempty_bitmap(children[node << fshift : (node + 1) << fshift])
                if bits != expected:
                    problems.append(
                        f"level {level} node {node} bitmap {bits:#x}, children say {expected:#x}"
                    )
            children = bitmaps
        if len(self._hints[0]) != nleaves:
            problems.append(f"{len(self._hints[0])} leaf hints for {nleaves} leaves")
            raise InvariantViolation(problems)
        runs = list(self._free_runs())
        for level in range(levels):
            shift = self._lshift + level * fshift
            hints = self._hints[level]
            parent_hints = self._hints[level + 1] if level + 1 < levels else None
            for node, hint in enumerate(hints):
                if hint >= _CROSSING and hint not in (_CROSSING, _UNBOUNDED):
                    problems.append(f"level {level} node {node}: hint {hint} out of range")
                if hint < _CROSSING and self._is_free_or_past(((node + 1) << shift) - 1):
                    problems.append(
                        f"level {level} node {node}: last block free but hint {hint} is bounded"
                    )
                if (
                    hint is _UNBOUNDED
                    and parent_hints is not None
                    and parent_hints[node >> fshift] is not _UNBOUNDED
                ):
                    problems.append(
                        f"level {level} node {node} is unbounded but its parent's hint is "
                        f"{parent_hints[node >> fshift]}"
                    )
            for start, length in runs:
                node = start >> shift
                if hints[node] < length:
                    problems.append(
                        f"level {level} node {node}: hint {hints[node]} < free run of "
                        f"{length} at block {start}"
                    )
                # Later nodes the run reaches have their last block free (covered
                # above) or contain the run's end.
                last = (start + length - 1) >> shift
                if last != node and hints[last] < start + length - (last << shift):
                    problems.append(
                        f"level {level} node {last}: hint {hints[last]} < free run reaching "
                        f"block {start + length - 1}"
                    )
        if problems:
            raise InvariantViolation(problems)
