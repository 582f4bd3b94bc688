"""The standard paging workload: index sequences, page contents, expected results.

The workload every vmpager benchmark and ``vmpager run`` use, defined so that a
C program on the kernel's swap and vmpager produce the very same accesses:

1. A region of ``npages`` pages of ``page_size`` bytes.
2. Fill: every page is written; its content is splitmix64 words (``"random"``,
   incompressible) with word 0 then set to the page number, or only word 0 set
   to the page number and the rest zero (``"sparse"``), or the random words in
   the first two fifths of the page and zeros after them (``"compressible"``:
   lz4 and zstd shrink such a page about 2.4 times; the words are those of
   ``"random"``, so the stream stays the same).
3. Access phase: for each index of the sequence, read the 8-byte word 0 of that
   page and write it back plus 1. The sequences:

   - ``seq``: page ``i mod npages``; by default 3 passes (3 * npages accesses).
   - ``random``: page ``splitmix64() mod npages``; 1,000,000 accesses by default.
   - ``zipf``: a rank from Zipf(s=0.99, N=npages) by inverse CDF, scattered over
     the region as ``(rank * 0x9E3779B1) mod npages`` (a bijection because
     npages must be a power of two); 1,000,000 accesses by default.

One splitmix64 stream seeded with ``seed`` feeds everything: the random and
zipf sequences draw first, and the fill's words continue the same stream (the
seq sequence draws nothing, so the fill starts it). Because output ``n`` of
splitmix64 depends only on ``seed + (n + 1) * gamma``, any slice of the stream
-- the words of any page -- is computed directly, vectorised.

Floating point in the zipf draw follows the C reference step by step (weights
``1 / pow(r + 1, s)`` from the C library, summed in rank order in double
precision, the same binary search), so the sequences are identical bit for
bit. This module is independent of the VM.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal, get_args

import numpy as np
from numpy.typing import NDArray

from vmpager.errors import InvariantViolation
from vmpager.units import check_int

if TYPE_CHECKING:
    from vmpager.vm.stats import VMStatistics

__all__ = [
    "CONTENTS",
    "DEFAULT_ACCESSES",
    "DEFAULT_PASSES",
    "DEFAULT_SEED",
    "PATTERNS",
    "SPLITMIX64_GAMMA",
    "ZIPF_EXPONENT",
    "Content",
    "Pattern",
    "SplitMix64",
    "Workload",
    "access_checksum",
    "expected_word0",
    "index_sequence",
    "pattern_report",
    "splitmix64_stream",
    "stream_draws",
    "zipf_cdf",
]

Pattern = Literal["seq", "random", "zipf"]
Content = Literal["random", "sparse", "compressible"]

PATTERNS: Final[tuple[str, ...]] = get_args(Pattern)
CONTENTS: Final[tuple[str, ...]] = get_args(Content)

#: splitmix64's state increment (the golden ratio in 64-bit fixed point).
SPLITMIX64_GAMMA: Final = 0x9E3779B97F4A7C15
_MIX1: Final = 0xBF58476D1CE4E5B9
_MIX2: Final = 0x94D049BB133111EB
_MASK64: Final = (1 << 64) - 1

#: Seed of the standard workload's stream.
DEFAULT_SEED: Final = 42
#: Accesses of the random and zipf patterns unless told otherwise.
DEFAULT_ACCESSES: Final = 1_000_000
#: Passes over the region of the seq pattern unless told otherwise.
DEFAULT_PASSES: Final = 3
#: Exponent s of the zipf pattern.
ZIPF_EXPONENT: Final = 0.99
#: Multiplier that scatters zipf ranks over the region (odd, so a bijection mod 2**k).
ZIPF_SCATTER: Final = 0x9E3779B1
# Index sequences are stored as 32-bit page numbers by the C reference.
_MAX_NPAGES: Final = 1 << 32


class SplitMix64:
    """Scalar splitmix64, the reference the vectorised stream is tested against.

    ``next()`` costs a few Python integer operations; use
    :func:`splitmix64_stream` for anything longer than a handful of draws.
    """

    __slots__ = ("state",)

    def __init__(self, seed: int) -> None:
        self.state = check_int(seed, "seed", maximum=_MASK64)

    def next(self) -> int:
        """Advance the state and return the next 64-bit output."""
        self.state = (self.state + SPLITMIX64_GAMMA) & _MASK64
        z = self.state
        z = ((z ^ (z >> 30)) * _MIX1) & _MASK64
        z = ((z ^ (z >> 27)) * _MIX2) & _MASK64
        return z ^ (z >> 31)


def splitmix64_stream(seed: int, start: int, count: int) -> NDArray[np.uint64]:
    """Return outputs ``start .. start + count - 1`` (0-based) of splitmix64 seeded ``seed``.

    Output ``n`` is the mix of ``seed + (n + 1) * gamma`` (mod 2**64), so the
    slice is computed without drawing what precedes it. Cost: O(count) time,
    about 2 * 8 * count bytes of memory; does not block.
    """
    seed = check_int(seed, "seed", maximum=_MASK64)
    start = check_int(start, "start", maximum=_MASK64)
    count = check_int(count, "count", maximum=_MASK64 - start)
    # uint64 array arithmetic wraps mod 2**64 without warnings (unlike numpy scalars).
    z = np.arange(1, count + 1, dtype=np.uint64)
    z += np.uint64(start)
    z *= np.uint64(SPLITMIX64_GAMMA)
    z += np.uint64(seed)
    z ^= z >> np.uint64(30)
    z *= np.uint64(_MIX1)
    z ^= z >> np.uint64(27)
    z *= np.uint64(_MIX2)
    z ^= z >> np.uint64(31)
    return z


@functools.lru_cache(maxsize=4)
def _zipf_cdf_cached(npages: int, exponent: float) -> NDArray[np.float64]:
    # math.pow is the C library's pow, as in the C reference. numpy's SIMD power
    # differs from it in the last bit for a few percent of the ranks; at the
    # standard sizes the rounded sums happen to absorb that, but equality with
    # the C program should hold by construction, not by luck.
    weights = np.fromiter(
        (1.0 / math.pow(rank, exponent) for rank in range(1, npages + 1)),
        dtype=np.float64,
        count=npages,
    )
    # np.cumsum adds strictly left to right, as the C loop does.
    cdf = np.cumsum(weights)
    cdf.setflags(write=False)
    return cdf


def zipf_cdf(npages: int, exponent: float = ZIPF_EXPONENT) -> NDArray[np.float64]:
    """Cumulative Zipf weights: element r is the sum of ``1 / (k + 1) ** exponent``, k <= r.

    Summed in rank order in double precision (the C reference's rounding);
    the last element is H, the total weight. The result is read-only and
    cached for the last few arguments. Cost: O(npages), about 0.1 s per
    million pages on first use.
    """
    npages = check_int(npages, "npages", minimum=1, maximum=_MAX_NPAGES)
    if not isinstance(exponent, float) or not exponent > 0.0:
        raise ValueError(f"exponent must be a float > 0, got {exponent!r}")
    return _zipf_cdf_cached(npages, exponent)


def _check_pattern(pattern: str) -> Pattern:
    if pattern not in PATTERNS:
        raise ValueError(f"pattern must be one of {', '.join(PATTERNS)}; got {pattern!r}")
    return pattern  # type: ignore[return-value]


def _default_accesses(pattern: Pattern, npages: int, accesses: int | None) -> int:
    if accesses is None:
        return DEFAULT_PASSES * npages if pattern == "seq" else DEFAULT_ACCESSES
    return check_int(accesses, "accesses", maximum=1 << 40)


def stream_draws(pattern: Pattern, accesses: int) -> int:
    """How many splitmix64 outputs the index draw of ``pattern`` consumes.

    One per access for random and zipf, none for seq; the fill's words start
    at this position of the stream.
    """
    _check_pattern(pattern)
    accesses = check_int(accesses, "accesses")
    return 0 if pattern == "seq" else accesses


def index_sequence(
    pattern: Pattern, npages: int, *, seed: int = DEFAULT_SEED, accesses: int | None = None
) -> NDArray[np.int64]:
    """Return the page index of every access of the standard workload.

    ``accesses`` defaults to 3 * npages for seq and 1,000,000 otherwise. zipf
    requires ``npages`` to be a power of two (otherwise the scatter is not a
    bijection and the C reference refuses too). Cost: O(accesses) time and
    memory (8 bytes per access, plus the zipf CDF of npages doubles, cached);
    does not block. The result is a fresh, writable array.
    """
    pattern = _check_pattern(pattern)
    npages = check_int(npages, "npages", minimum=1, maximum=_MAX_NPAGES)
    seed = check_int(seed, "seed", maximum=_MASK64)
    naccesses = _default_accesses(pattern, npages, accesses)
    if pattern == "seq":
        return np.arange(naccesses, dtype=np.int64) % npages
    if pattern == "zipf" and npages & (npages - 1):
        raise ValueError(f"npages must be a power of two for the zipf pattern, got {npages}")
    draws = splitmix64_stream(seed, 0, naccesses)
    if pattern == "random":
        return (draws % np.uint64(npages)).astype(np.int64)
    cdf = zipf_cdf(npages)
    total_weight = float(cdf[-1])
    # Same operation order as the C reference: ((x >> 11) * 2**-53) * H.
    uniform = (draws >> np.uint64(11)).astype(np.float64)
    uniform *= 1.0 / 9007199254740992.0
    uniform *= total_weight
    # side="left": the first rank whose cumulative weight is >= u, which is
    # where the C binary search (cdf[mid] < u -> go right) stops; the C search
    # never leaves [0, npages - 1], hence the clamp.
    ranks = np.searchsorted(cdf, uniform, side="left").astype(np.uint64)
    np.minimum(ranks, np.uint64(npages - 1), out=ranks)
    ranks *= np.uint64(ZIPF_SCATTER)
    ranks &= np.uint64(npages - 1)
    return ranks.astype(np.int64)


def expected_word0(indices: NDArray[np.integer], npages: int) -> NDArray[np.uint64]:
    """Word 0 of every page after the fill and the accesses ``indices``.

    The fill sets word 0 of page p to p; each access adds 1. Cost: O(npages +
    len(indices)).
    """
    npages = check_int(npages, "npages", minimum=1, maximum=_MAX_NPAGES)
    _check_indices(indices, npages)
    counts = np.bincount(indices, minlength=npages).astype(np.uint64)
    counts += np.arange(npages, dtype=np.uint64)
    return counts


def access_checksum(indices: NDArray[np.integer], npages: int) -> int:
    """Sum mod 2**64 of the values the accesses ``indices`` read (before adding 1).

    The C programs print this sum; a page p accessed c times reads p, p + 1,
    ..., p + c - 1, which adds c * p + c * (c - 1) / 2. Cost: O(npages + len(indices)).
    """
    npages = check_int(npages, "npages", minimum=1, maximum=_MAX_NPAGES)
    _check_indices(indices, npages)
    return _sum_of_reads(np.bincount(indices, minlength=npages).astype(np.uint64))


def _sum_of_reads(counts: NDArray[np.uint64]) -> int:
    """Sum mod 2**64 over pages p of counts[p] * p + counts[p] * (counts[p] - 1) / 2."""
    pages = np.arange(len(counts), dtype=np.uint64)
    # Halve the even factor first so that only the final products wrap mod
    # 2**64, as the C sum does (a count of 0 gives 0 * ... = 0).
    odd = counts & np.uint64(1)
    less = counts - np.uint64(1)
    triangle = np.where(odd == 1, counts * (less >> np.uint64(1)), (counts >> np.uint64(1)) * less)
    return int((counts * pages + triangle).sum(dtype=np.uint64))


def _check_indices(indices: NDArray[np.integer], npages: int) -> None:
    if not isinstance(indices, np.ndarray) or indices.ndim != 1:
        raise TypeError("indices must be a one-dimensional numpy integer array")
    if not np.issubdtype(indices.dtype, np.integer):
        raise TypeError(f"indices must have an integer dtype, got {indices.dtype}")
    if indices.size and (int(indices.min()) < 0 or int(indices.max()) >= npages):
        raise ValueError(f"indices must lie in [0, {npages - 1}]")


@dataclass(frozen=True, eq=False)
class Workload:
    """One instance of the standard workload: its access sequence and page contents.

    Construction draws the whole index sequence (O(accesses) time and memory;
    about 0.2 s for the zipf default at 524,288 pages). Immutable afterwards;
    ``indices`` is a read-only array. Nothing here blocks.
    """

    npages: int
    pattern: Pattern
    seed: int = DEFAULT_SEED
    accesses: int | None = None
    page_size: int = 4096
    content: Content = "random"
    indices: NDArray[np.int64] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        _check_pattern(self.pattern)
        if self.content not in CONTENTS:
            raise ValueError(f"content must be one of {', '.join(CONTENTS)}; got {self.content!r}")
        check_int(self.page_size, "page_size", minimum=8, maximum=1 << 30, multiple=8)
        indices = index_sequence(self.pattern, self.npages, seed=self.seed, accesses=self.accesses)
        indices.setflags(write=False)
        # The dataclass is frozen for callers; filling in derived fields is its own business.
        object.__setattr__(self, "accesses", len(indices))
        object.__setattr__(self, "indices", indices)

    @property
    def naccesses(self) -> int:
        """Number of accesses of the access phase."""
        return len(self.indices)

    @property
    def words_per_page(self) -> int:
        """64-bit words in a page."""
        return self.page_size // 8

    @property
    def size_bytes(self) -> int:
        """Size of the region in bytes."""
        return self.npages * self.page_size

    @property
    def index_draws(self) -> int:
        """splitmix64 outputs the index draw consumed; the fill's words start here."""
        return stream_draws(self.pattern, self.naccesses)

    def fill_pages(self, first: int, count: int) -> NDArray[np.uint64]:
        """Content of pages ``first .. first + count - 1`` after the fill, as (count, words) uint64.

        Words are little-endian in memory on the machines we run on, so
        ``result.tobytes()`` is the bytes of the pages. Cost: O(count *
        page_size) time and about twice that in memory; callers fill large
        regions in chunks.
        """
        first = check_int(first, "first", maximum=self.npages)
        count = check_int(count, "count", maximum=self.npages - first)
        words = self.words_per_page
        if self.content == "sparse":
            pages = np.zeros((count, words), dtype=np.uint64)
        else:
            start = self.index_draws + first * words
            pages = splitmix64_stream(self.seed, start, count * words).reshape(count, words)
            if self.content == "compressible":
                pages[:, words * 2 // 5 :] = 0
        pages[:, 0] = np.arange(first, first + count, dtype=np.uint64)
        return pages

    def expected_word0(self, accesses_done: int | None = None) -> NDArray[np.uint64]:
        """Word 0 of every page after the fill and the first ``accesses_done`` accesses.

        ``accesses_done`` defaults to all of them (the end of the access phase).
        """
        done = self.naccesses if accesses_done is None else accesses_done
        done = check_int(done, "accesses_done", maximum=self.naccesses)
        return expected_word0(self.indices[:done], self.npages)

    def access_checksum(self, accesses_done: int | None = None) -> int:
        """Sum mod 2**64 of the words read by the first ``accesses_done`` accesses."""
        done = self.naccesses if accesses_done is None else accesses_done
        done = check_int(done, "accesses_done", maximum=self.naccesses)
        return access_checksum(self.indices[:done], self.npages)

    def check(self) -> None:
        """Assert the invariants: sizes, index range, seq shape, zipf power of two."""
        problems: list[str] = []
        if self.indices.dtype != np.int64 or self.indices.ndim != 1:
            problems.append(f"indices: dtype {self.indices.dtype}, ndim {self.indices.ndim}")
        if self.indices.flags.writeable:
            problems.append("indices are writable")
        if self.accesses != len(self.indices):
            problems.append(f"accesses {self.accesses} != len(indices) {len(self.indices)}")
        if self.indices.size and (
            int(self.indices.min()) < 0 or int(self.indices.max()) >= self.npages
        ):
            problems.append(f"an index lies outside [0, {self.npages - 1}]")
        if self.pattern == "seq" and not np.array_equal(
            self.indices, np.arange(len(self.indices)) % self.npages
        ):
            problems.append("seq indices are not i mod npages")
        if self.pattern == "zipf" and self.npages & (self.npages - 1):
            problems.append(f"zipf with npages {self.npages} not a power of two")
        if problems:
            raise InvariantViolation(problems)


def pattern_report(
    workload: Workload,
    *,
    memory: int,
    elapsed: float,
    fill_s: float,
    before: VMStatistics,
    after: VMStatistics,
    verified: bool,
    bad: int | None,
) -> dict[str, Any]:
    """The report of one pattern's run from the statistics before and after its access phase.

    One shape for ``vmpager run`` (calls or ``--mapped``), ``vmpager bench``
    and the benchmarks; callers add their own fields.
    """
    faults = after.faults - before.faults
    pageouts = after.pageouts - before.pageouts
    pageout_pages = after.pageout_pages - before.pageout_pages
    return {
        "pattern": workload.pattern,
        "size_bytes": workload.size_bytes,
        "memory_bytes": memory,
        "accesses": workload.naccesses,
        "seconds": round(elapsed, 3),
        "accesses_per_s": round(workload.naccesses / elapsed, 1),
        "fill_seconds": round(fill_s, 3),
        "faults": faults,
        "miss_ratio": round(faults / workload.naccesses, 4),
        "pageins": after.pageins - before.pageins,
        "pages_in": after.pagein_pages - before.pagein_pages,
        "pageouts": pageouts,
        "pages_out": pageout_pages,
        "mean_cluster_npages": round(pageout_pages / pageouts, 2) if pageouts else 0.0,
        "readaround_pages": after.readaround_pages - before.readaround_pages,
        "readaround_hits": after.readaround_hits - before.readaround_hits,
        "swap_used_blocks_at_end": after.swap_used_blocks,
        "verified_pages": workload.npages if verified else 0,
        "bad_pages": bad,
    }
