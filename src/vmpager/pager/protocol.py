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
    from vmpager.vm.object import VMObject
    from vmpager.vm.page import Page

__all__ = ["Pager", "PagerResult"]


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

    def cluster_bounds(self, obj: VMObject, pindex: int) -> tuple[int, int]:
        """``[lo, hi)``: the page indices a pageout cluster around ``pindex`` may span."""
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
