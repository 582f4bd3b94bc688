"""The pager table and the one place the pager contract is checked (uvmpagerops, vm_pager.c).

``PagerRegistry`` maps an object kind ("anonymous", "vnode", "device") to
its pager. ``get_pages`` and ``put_pages`` here wrap every call into a pager
with the contract's pre- and post-conditions, as FreeBSD's dispatcher does
with KASSERTs, so each pager stays small. The checks are ``assert``s: ``-O``
strips them, as a kernel without INVARIANTS drops its KASSERTs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from vmpager.vm.pagerops import BatchPager, Pager, PagerResult

if TYPE_CHECKING:
    from vmpager.errors import DeviceError
    from vmpager.vm.object import VMObject
    from vmpager.vm.page import Page

__all__ = ["PagerRegistry", "get_pages", "put_batch", "put_pages", "read_runs"]


class PagerRegistry:
    """Object kind -> pager."""

    def __init__(self) -> None:
        self._pagers: dict[str, Pager] = {}

    def register(self, kind: str, pager: Pager) -> None:
        if kind in self._pagers:
            raise ValueError(f"a pager for kind {kind!r} is registered already")
        self._pagers[kind] = pager

    def pager_for(self, obj: VMObject) -> Pager:
        """The pager of ``obj``'s kind (objects keep theirs in ``VMObject.pager``)."""
        pager = self._pagers.get(obj.kind)
        if pager is None:
            raise ValueError(f"no pager for objects of kind {obj.kind!r}: {self.kinds()}")
        return pager

    def kinds(self) -> list[str]:
        return list(self._pagers)


def _consecutive(pages: Sequence[Page]) -> bool:
    first = pages[0].pindex
    return pages[-1].pindex == first + len(pages) - 1 and all(
        p.pindex == first + i for i, p in enumerate(pages)
    )


_GET_RESULTS = frozenset((PagerResult.OK, PagerResult.ERROR, PagerResult.FAIL))


def get_pages(pager: Pager, obj: VMObject, pages: Sequence[Page], reqpage: int) -> PagerResult:
    """Call ``pager.get_pages`` with the contract checked on both sides.

    The page-in of every fault comes through here: the checks cost O(pages)
    attribute reads, one pass before and one after.
    """
    npages = len(pages)
    assert npages and 0 <= reqpage < npages, (npages, reqpage)
    resident = obj.pages
    if npages == 1:
        p = pages[0]
        assert p.obj is obj and p.busy and not p.writing and not p._dirty, p
        assert resident.get(p.pindex) is p, p
    else:
        assert _consecutive(pages), "get_pages: page indices must be consecutive"
        for p in pages:
            assert p.obj is obj and p.busy and not p.writing and not p._dirty, p
            assert resident.get(p.pindex) is p, p
    result = pager.get_pages(obj, pages, reqpage)
    assert result in _GET_RESULTS, result
    req = pages[reqpage]
    assert req.busy, "get_pages must leave the requested page busy"
    assert result is not PagerResult.OK or not req._dirty, req
    if result is PagerResult.OK and npages > 1:
        for i, p in enumerate(pages):
            assert i == reqpage or not p.busy, p
    return result


def put_pages(
    pager: Pager, obj: VMObject, pages: Sequence[Page], *, sync: bool
) -> list[PagerResult]:
    """Call ``pager.put_pages`` with the contract checked on both sides."""
    assert pages and _consecutive(pages), "put_pages: page indices must be consecutive"
    for p in pages:
        assert p.obj is obj and p.writing and p.dirty and not p.busy, p
    results = pager.put_pages(obj, pages, sync=sync)
    assert len(results) == len(pages), (len(results), len(pages))
    for p, r in zip(pages, results, strict=True):
        # A PEND page may be done already: its write can complete while the
        # pager waits for an I/O slot for a later part of the same call.
        if r is not PagerResult.PEND:
            assert not p.writing, p
            assert r is not PagerResult.OK or not p.dirty, p
    return results


def put_batch(pager: BatchPager, pages: Sequence[Page], *, sync: bool) -> list[PagerResult]:
    """Call ``pager.put_batch`` with its contract checked on both sides (pages of
    any objects, in any order; as ``put_pages`` but see the note on OK pages)."""
    assert pages, "put_batch: no pages"
    for p in pages:
        assert p.writing and p.dirty and not p.busy, p
        assert p.obj.pages.get(p.pindex) is p, p
    results = pager.put_batch(pages, sync=sync)
    assert len(results) == len(pages), (len(results), len(pages))
    allowed = (PagerResult.OK, PagerResult.PEND, PagerResult.FAIL, PagerResult.ERROR)
    for r in results:
        assert r in allowed or r is PagerResult.AGAIN, r
    # No per-page postcondition, unlike put_pages: a batch is written as several
    # transfers, each with the lock released, so a page whose run finished early
    # may be written to, or taken by another scan, while a later run is in flight.
    return results


def read_runs(
    pager: BatchPager, obj: VMObject, runs: Sequence[tuple[int, list[Page]]]
) -> DeviceError | None:
    """Call ``pager.read_runs`` with its contract checked on both sides: busy, clean,
    consecutive pages of ``obj`` in, idle pages (or freed ones after an error) out."""
    for _blk, pages in runs:
        assert pages and _consecutive(pages), "read_runs: page indices must be consecutive"
        for p in pages:
            assert p.obj is obj and p.busy and not p.writing and not p.dirty, p
            assert obj.pages.get(p.pindex) is p, p
    err = pager.read_runs(obj, runs)
    for _blk, pages in runs:
        for p in pages:
            if obj.pages.get(p.pindex) is p:
                assert not p.busy, p
            else:
                assert err is not None, f"read_runs freed {p!r} without an error"
    return err
