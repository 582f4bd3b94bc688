"""The swap-allocator workload that measures a blist (FreeBSD's blist as reference).

Defined in the project's benchmark notes: a blist of ``nblocks`` blocks is
filled to ``fill`` with runs of 1..16 blocks, then ``nops`` operations
alternate between allocating a run of 1..16 blocks and freeing a random live
run. A placement checksum over every successful allocation proves that the
allocator placed every run where FreeBSD's address-ordered first fit from a
cursor would.

The random numbers are splitmix64 seeded 12345. Every operation draws exactly
one number whatever happens, so the whole stream can be computed up front,
vectorised with numpy: that is harness cost, not allocator cost.

Used by ``benchmarks/blist_bench.py`` and by the test that pins the checksum.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

__all__ = [
    "GOLDEN_GAMMA",
    "Allocator",
    "WorkloadResult",
    "run_workload",
    "splitmix64",
    "splitmix64_stream",
]

#: splitmix64's state increment.
GOLDEN_GAMMA = 0x9E3779B97F4A7C15
_MASK64 = (1 << 64) - 1
#: Multiplier of the placement checksum.
_CHECKSUM_FACTOR = 1000003


def splitmix64(state: int) -> tuple[int, int]:
    """One splitmix64 step: return ``(new_state, output)`` (all mod 2**64)."""
    state = (state + GOLDEN_GAMMA) & _MASK64
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return state, z ^ (z >> 31)


def splitmix64_stream(seed: int, count: int, *, skip: int = 0) -> list[int]:
    """Outputs ``skip .. skip + count - 1`` of splitmix64 seeded ``seed``, as Python ints.

    The k-th state is ``seed + (k + 1) * gamma`` mod 2**64, so numpy computes
    the stream without a Python loop (uint64 arithmetic wraps like C's).
    """
    index = np.arange(skip + 1, skip + count + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = np.uint64(seed & _MASK64) + index * np.uint64(GOLDEN_GAMMA)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    values: list[int] = z.tolist()
    return values


class Allocator(Protocol):
    """What the workload needs of an allocator (a ``Blist`` or a reference model)."""

    def alloc(self, count: int, /) -> tuple[int, int] | None: ...

    def free(self, blk: int, count: int, /) -> None: ...

    def avail(self) -> int: ...


@dataclass(frozen=True, slots=True)
class WorkloadResult:
    """Outcome of one run: placement summary and the timed phase's duration.

    ``trace`` (when recorded) lists the timed phase's calls in order: an int
    ``n`` for ``alloc(n)``, a pair ``(blk, n)`` for ``free(blk, n)``.
    """

    nblocks: int
    fill: float
    nops: int
    fill_allocs: int
    failures: int
    free_blocks: int
    live_runs: int
    checksum: int
    seconds: float
    trace: tuple[int | tuple[int, int], ...] | None = None


def run_workload(
    allocator: Allocator,
    nblocks: int,
    fill: float,
    nops: int,
    *,
    seed: int = 12345,
    clock: Callable[[], float] | None = None,
    record: bool = False,
) -> WorkloadResult:
    """Run the workload against a fresh, all-free ``allocator`` of ``nblocks`` blocks.

    The fill phase allocates runs of ``1 + (r mod 16)`` until no more than
    ``nblocks - floor(fill * nblocks)`` blocks are free; the timed phase runs
    ``nops`` operations (even: allocate, odd: free a random live run). Only the
    timed phase is measured with ``clock`` (0.0 without one). ``record`` keeps
    the timed phase's calls for replay. Raises ``RuntimeError`` if the fill
    phase cannot make progress.
    """
    target = nblocks - int(fill * nblocks)
    # Each fill allocation takes at least one block; failures are bounded below.
    budget = nblocks - target + 1024
    randoms = splitmix64_stream(seed, budget + nops)
    alloc = allocator.alloc
    free = allocator.free
    avail = allocator.avail
    live: list[tuple[int, int]] = []
    checksum = 0
    failures = 0
    draw = 0
    while avail() > target:
        if draw >= budget:
            raise RuntimeError(f"fill phase made no progress after {draw} allocations")
        got = alloc(1 + randoms[draw] % 16)
        draw += 1
        if got is None:
            failures += 1
            continue
        live.append(got)
        checksum = (checksum * _CHECKSUM_FACTOR + got[0]) & _MASK64
    fill_allocs = len(live)
    stream = randoms[draw : draw + nops]
    trace: list[int | tuple[int, int]] = []
    started = clock() if clock is not None else 0.0
    if record:
        for op, r in enumerate(stream):
            if op & 1:
                j = r % len(live)
                run = live[j]
                trace.append(run)
                free(*run)
                live[j] = live[-1]
                live.pop()
            else:
                trace.append(1 + r % 16)
                got = alloc(1 + r % 16)
                if got is None:
                    failures += 1
                    continue
                live.append(got)
                checksum = (checksum * _CHECKSUM_FACTOR + got[0]) & _MASK64
    else:
        for op, r in enumerate(stream):
            if op & 1:
                j = r % len(live)
                blk, n = live[j]
                free(blk, n)
                live[j] = live[-1]
                live.pop()
            else:
                got = alloc(1 + r % 16)
                if got is None:
                    failures += 1
                    continue
                live.append(got)
                checksum = (checksum * _CHECKSUM_FACTOR + got[0]) & _MASK64
    seconds = clock() - started if clock is not None else 0.0
    return WorkloadResult(
        nblocks=nblocks,
        fill=fill,
        nops=nops,
        fill_allocs=fill_allocs,
        failures=failures,
        free_blocks=avail(),
        live_runs=len(live),
        checksum=checksum,
        seconds=seconds,
        trace=tuple(trace) if record else None,
    )
