"""The pager map: a bounded pool of I/O mappings, with a window reserved for the page daemon.

In the kernel every paging transfer needs kernel virtual addresses to map its
pages (NetBSD ``uvm_pagermapin``, ``uvm_pager.c`` 1.48); the pool is
bounded, ordinary callers sleep when it is exhausted, and the page daemon
falls back on one reserved window (``emergva``) so that pageout, which is
what frees memory, always makes progress.

Here a mapping is the list of frame views a transfer hands to the device.
The pool is counted in pages: ``size_npages`` in all, of which the last
``reserve_npages`` form the daemon's window. As ``emergva``, the window is
exclusive: one daemon transfer at a time uses it, whatever its size, and a
second daemon transfer that finds the general pool full waits for it (or for
the general pool). A mapping is held for the whole transfer: an asynchronous
write keeps its mapping until its completion (``uvm_aio_aiodone`` calls
``uvm_pagermapout``). The caller holds the VM lock; waiting releases it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from vmpager.errors import InvariantViolation

__all__ = ["PagerMap", "PagerMapStatistics"]


@dataclass(frozen=True, slots=True)
class PagerMapStatistics:
    size_npages: int
    reserve_npages: int
    in_use_npages: int
    reserve_in_use_npages: int
    mappings: int
    waits: int
    reserve_uses: int
    high_water_npages: int


class PagerMap:
    """Counts mapped pages; ``map_in`` blocks (or fails) when the pool is spent."""

    def __init__(self, cond: threading.Condition, size_npages: int, reserve_npages: int) -> None:
        if size_npages < 1 or not 0 <= reserve_npages < size_npages:
            raise ValueError(
                "pager map: need size_npages >= 1 and 0 <= reserve_npages < size_npages, "
                f"got {size_npages} and {reserve_npages}"
            )
        self._cond = cond
        self.size_npages = size_npages
        self.reserve_npages = reserve_npages
        self._general_npages = size_npages - reserve_npages
        self._in_use = 0
        self._reserve_in_use = 0
        self._mappings = 0
        self._waits = 0
        self._reserve_uses = 0
        self._high_water = 0

    def map_in(self, npages: int, *, daemon: bool) -> int:
        """Reserve ``npages`` of mapping, waiting while the pool is spent; see ``try_map_in``."""
        token = self.try_map_in(npages, daemon=daemon, wait=True)
        assert token is not None
        return token

    def try_map_in(self, npages: int, *, daemon: bool, wait: bool = False) -> int | None:
        """Reserve ``npages`` of mapping; returns a token for ``map_out``.

        Ordinary callers use the general pool and wait while it is full
        (``wait=False``: return None instead). The page daemon takes the
        general pool when it can and the reserved window otherwise, waiting
        only while the window itself is in use (it never returns None); a
        daemon transfer larger than the window (the reference has
        ``KASSERT(npages <= MAXBSIZE >> PAGE_SHIFT)``; pageouts here never
        are, a window holds a cluster) waits for the general pool. A request
        larger than the general pool is a ValueError naming the range.
        O(1) unless it waits.
        """
        general = self._general_npages
        if isinstance(npages, bool) or not isinstance(npages, int) or not 1 <= npages <= general:
            raise ValueError(f"npages must be in [1, {general}], got {npages!r}")
        window = daemon and npages <= self.reserve_npages
        while True:
            if self._in_use + npages <= self._general_npages:
                self._in_use += npages
                token = npages
                break
            if window:
                if not self._reserve_in_use:
                    self._reserve_in_use = npages
                    self._reserve_uses += 1
                    token = -npages  # negative: the reserved window
                    break
            elif not wait:
                return None
            self._waits += 1
            self._cond.wait()
        self._mappings += 1
        self._high_water = max(self._high_water, self._in_use + self._reserve_in_use)
        return token

    def map_out(self, token: int) -> None:
        """Give a mapping back and wake the waiters."""
        if token > 0:
            if token > self._in_use:
                raise AssertionError("pager map: more pages unmapped than mapped")
            self._in_use -= token
        else:
            if -token != self._reserve_in_use:
                raise AssertionError("pager map: reserved window unmapped twice")
            self._reserve_in_use = 0
        self._mappings -= 1
        self._cond.notify_all()

    def statistics(self) -> PagerMapStatistics:
        return PagerMapStatistics(
            self.size_npages,
            self.reserve_npages,
            self._in_use,
            self._reserve_in_use,
            self._mappings,
            self._waits,
            self._reserve_uses,
            self._high_water,
        )

    def check(self) -> None:
        """Raise ``InvariantViolation`` listing every broken invariant (``problems``)."""
        found = self.problems()
        if found:
            raise InvariantViolation(found)

    def problems(self) -> list[str]:
        problems = []
        if not 0 <= self._in_use <= self._general_npages:
            problems.append(f"pager map general pool use {self._in_use} out of range")
        if not 0 <= self._reserve_in_use <= self.reserve_npages:
            problems.append(f"pager map reserve use {self._reserve_in_use} out of range")
        return problems
