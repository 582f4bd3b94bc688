"""Bounded in-flight I/O classes (getpbuf(&nsw_rcount), nsw_wcount_sync/async).

Reads, synchronous writes and asynchronous writes each draw from their own
pool of swap buffer headers, so a burst of async pageouts cannot starve the
fault path of read buffers. The async limit (``swap_async_max``) can change
while running; it is clamped as FreeBSD's ``swap_pager_putpages`` (2002)
clamps it, to [1, nswbuf // 2], and a decrease takes effect as in-flight
writes finish.

The caller holds the VM lock; ``acquire`` waits on the VM condition (which
releases the lock while waiting).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from vmpager.io.request import IOKind

__all__ = ["InflightLimits", "InflightStatistics"]


@dataclass(frozen=True, slots=True)
class InflightStatistics:
    read_limit: int
    write_sync_limit: int
    write_async_limit: int
    reads_in_flight: int
    writes_sync_in_flight: int
    writes_async_in_flight: int
    waits: int


class InflightLimits:
    """Counting pools of I/O slots, one per ``IOKind``."""

    def __init__(self, cond: threading.Condition, nswbuf: int, swap_async_max: int) -> None:
        if nswbuf < 2:
            raise ValueError(f"nswbuf must be >= 2, got {nswbuf}")
        self._cond = cond
        self.nswbuf = nswbuf
        self._limit = {
            IOKind.READ: (nswbuf + 1) // 2,
            IOKind.WRITE_SYNC: (nswbuf + 3) // 4,
            IOKind.WRITE_ASYNC: 1,
        }
        self._in_flight = dict.fromkeys(IOKind, 0)
        self._waits = 0
        self._limit[IOKind.WRITE_ASYNC] = self._clamp(swap_async_max)

    @property
    def async_max(self) -> int:
        return self._limit[IOKind.WRITE_ASYNC]

    def set_async_max(self, value: int) -> int:
        """Change the async write limit; returns the clamped value in force."""
        clamped = self._clamp(value)
        self._limit[IOKind.WRITE_ASYNC] = clamped
        self._cond.notify_all()  # a raised limit frees waiters; the caller holds the lock
        return clamped

    def _clamp(self, value: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"swap_async_max must be an int, got {value!r}")
        return min(max(value, 1), self.nswbuf // 2)

    def acquire(self, kind: IOKind) -> None:
        """Take a slot of ``kind``, waiting (lock released) while none is free."""
        while self._in_flight[kind] >= self._limit[kind]:
            self._waits += 1
            self._cond.wait()
        self._in_flight[kind] += 1

    def try_acquire(self, kind: IOKind) -> bool:
        if self._in_flight[kind] >= self._limit[kind]:
            return False
        self._in_flight[kind] += 1
        return True

    def release(self, kind: IOKind) -> None:
        if self._in_flight[kind] <= 0:
            raise AssertionError(f"{kind.value} slot released but none in flight")
        self._in_flight[kind] -= 1
        self._cond.notify_all()

    def in_flight(self, kind: IOKind) -> int:
        return self._in_flight[kind]

    def statistics(self) -> InflightStatistics:
        return InflightStatistics(
            self._limit[IOKind.READ],
            self._limit[IOKind.WRITE_SYNC],
            self._limit[IOKind.WRITE_ASYNC],
            self._in_flight[IOKind.READ],
            self._in_flight[IOKind.WRITE_SYNC],
            self._in_flight[IOKind.WRITE_ASYNC],
            self._waits,
        )
