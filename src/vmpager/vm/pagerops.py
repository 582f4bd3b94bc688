"""The pager interface (struct pagerops) and its result codes (VM_PAGER_*).

A pager moves pages of one kind of VM object between frames and a backing
store. The VM calls it with the VM lock held; a pager releases the lock only
around device transfers, and only while every page it works on is marked busy
(page-in) or writing (pageout), so no other thread can touch them.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from vmpager.errors import DeviceError
    from vmpager.swap.meta import SwapMeta
    from vmpager.swap.space import SwapSpaceStatistics
    from vmpager.vm.object import VMObject
    from vmpager.vm.page import Page

__all__ = ["BatchPager", "CheckedPager", "Pager", "PagerResult", "SwapPagerOps"]


class PagerResult(enum.Enum):
    """Outcome of a pager operation: the VM_PAGER_* codes of NetBSD ``uvm_pager.c`` 1.48
    and FreeBSD ``swap_pager.c`` 2002, same meanings."""

    OK = "ok"  #: pages now hold valid data / are on the store
    BAD = "bad"  #: index outside the object
    FAIL = "fail"  #: the store does not have (get) or cannot take (put) the page
    PEND = "pend"  #: asynchronous I/O started; the completion reports the outcome
    ERROR = "error"  #: the store failed the transfer (hard error)
    AGAIN = "again"  #: transient failure; retrying may succeed


class Pager(Protocol):
    """What the VM asks of a pager. ``registry.PagerDispatch`` checks the contract."""

    #: Name of the object kind this pager serves ("swap", "vnode", "device").
    kind: str

    def has_page(self, obj: VMObject, pindex: int) -> bool:
        """True when the backing store holds page ``pindex``. No I/O."""
        ...

    def has_pages(self, obj: VMObject, start: int, npages: int) -> list[bool]:
        """``has_page`` for pages ``start .. start + npages - 1`` at once. No I/O."""
        ...

    def page_run(
        self, obj: VMObject, pindex: int, before_max: int, after_max: int
    ) -> tuple[int, int] | None:
        """``(before, after)``: pages around ``pindex`` that one transfer can read
        together with it (contiguous on the store, not crossing a device or
        stripe), capped at the maxima; None when the store lacks ``pindex``.
        """
        ...

    def get_pages(self, obj: VMObject, pages: Sequence[Page], reqpage: int) -> PagerResult:
        """Fill ``pages`` (consecutive, busy, frames assigned) from the store.

        On OK every page holds valid clean data; ``pages[reqpage]`` stays busy
        for the caller, the others are unbusied and put on the inactive queue.
        On ERROR the pages other than ``reqpage`` are freed and the caller must
        free ``reqpage``; the error is recorded for the caller to raise.
        """
        ...

    def put_pages(self, obj: VMObject, pages: Sequence[Page], *, sync: bool) -> list[PagerResult]:
        """Write dirty ``pages`` (consecutive, marked writing); one result each.

        PEND pages complete later through the I/O engine; for the others the
        pager has already finished the completion work (clean on OK, dirty on
        anything else).
        """
        ...

    def readaround_npages(self, obj: VMObject, pindex: int, default_npages: int) -> int:
        """The read-around window for a fault at ``pindex`` (``default_npages``
        unless the pager ramps it up for sequential access). O(1)."""
        ...

    def cluster_bounds(self, obj: VMObject, pindex: int) -> tuple[int, int]:
        """``[lo, hi)``: the page indices a pageout cluster around ``pindex`` may span."""
        ...

    def batches_pageout(self, obj: VMObject) -> bool:
        """May the page daemon write ``obj``'s dirty pages with the swap pager's
        ``put_batch``, together with pages of other objects (True only for swap
        pages with no reservation: their blocks are chosen at write time)? O(1)."""
        ...

    def unswapped(self, obj: VMObject, pindex: int) -> None:
        """The resident page was modified: its store copy, if any, is stale."""
        ...

    def free_space(self, obj: VMObject, start: int, npages: int) -> None:
        """Forget the store's copies of pages ``[start, start + npages)``."""
        ...

    def dealloc(self, obj: VMObject) -> None:
        """The object is gone: release everything the store holds for it."""
        ...


class CheckedPager(Pager, Protocol):
    """A pager with consistency checks of its own (``vm/invariants.py`` calls them)."""

    def check(self) -> None:
        """Raise ``InvariantViolation`` listing every inconsistency. Lock held."""
        ...


class BatchPager(Pager, Protocol):
    """The batched paths: pages of many places in one call (``vm/registry.py`` checks
    their contract as for ``get_pages`` / ``put_pages``)."""

    def run_limit(self, blk: int) -> int:
        """The most blocks one transfer starting at ``blk`` may span."""
        ...

    def block_of(self, obj: VMObject, pindex: int) -> int:
        """The store block holding page ``pindex``, or ``SWAPBLK_NONE``. No I/O."""
        ...

    def read_runs(
        self, obj: VMObject, runs: Sequence[tuple[int, list[Page]]]
    ) -> DeviceError | None:
        """Read runs ``(blk, pages)`` of busy, clean, consecutive pages of ``obj``,
        many in flight at once; on return the pages are valid and idle, or freed
        where a read failed (that error returned)."""
        ...

    def put_batch(self, pages: Sequence[Page], *, sync: bool) -> list[PagerResult]:
        """Write dirty pages of any objects together; one result per page, as
        ``put_pages``."""
        ...


class SwapPagerOps(BatchPager, Protocol):
    """What the VM asks of the pager of anonymous memory beyond the pager contract:
    its metadata, reservations, deferred frees and strategy I/O."""

    meta: SwapMeta

    def marks_bad(self, err: DeviceError) -> bool:
        """Does the write-error policy mark the blocks of a write that failed with
        ``err`` bad?"""
        ...

    def space_statistics(self) -> SwapSpaceStatistics:
        """The swap space's use, deferred frees of stale copies done first. Lock held."""
        ...

    def blocks_in_use(self, index: int) -> npt.NDArray[np.int64]:
        """Blocks of device ``index`` that hold pages (deferred frees done first)."""
        ...

    def describe_free(self) -> str:
        """Free swap in words (deferred frees done first)."""
        ...

    def reserve(self, obj: VMObject, start: int, npages: int) -> bool:
        """Assign blocks to pages ``[start, start + npages)`` now; False when swap is short."""
        ...

    def release_block(self, obj: VMObject, pindex: int) -> None:
        """Free page ``pindex``'s block and its reservation (swapoff moves it)."""
        ...

    def release_reservation(self, holder: VMObject, former: VMObject) -> None:
        """Move ``former``'s reservation bookkeeping to ``holder`` (clones)."""
        ...

    def strategy(
        self, obj: VMObject, op: str, offset: int, buffer: memoryview | None, length: int
    ) -> None:
        """Direct I/O between ``buffer`` and ``obj``'s swap (read, write, delete). Lock held;
        blocks until done."""
        ...

    def check(self) -> None:
        """Raise ``InvariantViolation`` listing every inconsistency. Lock held."""
        ...
