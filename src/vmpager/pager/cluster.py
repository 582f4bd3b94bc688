"""Building a pageout cluster around a dirty page (uvm_mk_pcluster).

Writing neighbours together turns many small writes into one large one. The
cluster grows from a dirty center page backward, then forward, over pages
that are resident, dirty and idle (neither busy nor already being written),
inside the pager's cluster window and the caller's range; it stops at the
first page that does not qualify. Every page taken is marked ``writing``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vmpager.vm.object import VMObject
    from vmpager.vm.page import Page

__all__ = ["make_put_cluster"]


def make_put_cluster(obj: VMObject, center: Page, lo: int, hi: int, max_npages: int) -> list[Page]:
    """Return the cluster around ``center`` in page-index order, all marked writing.

    ``[lo, hi)`` is the window the pager allows intersected with the
    caller's range. As in the seed, a window wider than ``max_npages`` (the
    caller's cluster array) means no clustering: the center page alone.
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
        if page is None or not page.dirty or page.busy or page.writing:
            break
        page.writing = True
        before.append(page)
        pindex -= 1
    after: list[Page] = []
    pindex = center.pindex + 1
    while pindex < hi:
        page = pages.get(pindex)
        if page is None or not page.dirty or page.busy or page.writing:
            break
        page.writing = True
        after.append(page)
        pindex += 1
    before.reverse()
    before.append(center)
    before.extend(after)
    return before
