"""Building a pageout cluster around a dirty page (NetBSD uvm_pager.c 1.48 ``uvm_mk_pcluster``).

Writing neighbours together turns many small writes into one large one. The
cluster grows from a dirty center page backward, then forward, over pages
that are resident, dirty and idle (neither busy nor already being written),
inside the pager's cluster window and the caller's range; it stops at the
first page that does not qualify. Every page taken is marked ``writing``.

``active=False`` is the reference's call without ``PGO_DOACTCLUST``: the
cluster also stops at the first neighbour on the active queue (the 1.48 text
stops at any resident neighbour; later NetBSD at active ones, which is what
is followed). ``active=True`` (``PGO_DOACTCLUST``, the default of the page
daemon here, ``VMConfig.pageout_cluster_active``) takes idle dirty
neighbours from any queue: they need writing anyway, one transfer costs
little more than a page, and a page being written stays resident and
readable.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vmpager.vm.page import QUEUE_ACTIVE

if TYPE_CHECKING:
    from vmpager.vm.object import VMObject
    from vmpager.vm.page import Page

__all__ = ["make_put_cluster"]


def make_put_cluster(
    obj: VMObject, center: Page, lo: int, hi: int, max_npages: int, *, active: bool = True
) -> list[Page]:
    """Return the cluster around ``center`` in page-index order, all marked writing.

    ``[lo, hi)`` is the window the pager allows intersected with the
    caller's range. As in the reference, a window wider than ``max_npages`` (the
    caller's cluster array) means no clustering: the center page alone.
    ``active=False`` stops at active neighbours (no ``PGO_DOACTCLUST``).
    The caller holds the VM lock, and ``center`` is dirty and idle.
    Cost: O(cluster size) dictionary look-ups.
    """
    assert center.dirty and not center.busy and not center.writing, center
    center.writing = True
    if hi - lo > max_npages:
        return [center]
    pages = obj.pages
    before: list[Page] = []
    pindex = center.pindex - 1
    while pindex >= lo:
        page = pages.get(pindex)
        if page is None or not _qualifies(page, active):
            break
        page.writing = True
        before.append(page)
        pindex -= 1
    after: list[Page] = []
    pindex = center.pindex + 1
    while pindex < hi:
        page = pages.get(pindex)
        if page is None or not _qualifies(page, active):
            break
        page.writing = True
        after.append(page)
        pindex += 1
    before.reverse()
    before.append(center)
    before.extend(after)
    return before


def _qualifies(page: Page, active: bool) -> bool:
    if not page.dirty or page.busy or page.writing:
        return False
    return active or page.queue != QUEUE_ACTIVE
