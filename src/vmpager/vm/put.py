"""The high-level pageout routine (NetBSD ``uvm_pager_put``, ``uvm_pager.c`` 1.48).

``pager_put`` clusters around a dirty page and writes the cluster through
the object's pager. When the write fails transiently (AGAIN) and there was a
cluster, it drops the cluster and retries the one page it was asked for, as
the reference does for EAGAIN; after a hard error (ERROR) or a refusal
(FAIL: no swap block at all, the swap pager having halved its runs down to
single blocks) it does not retry. The pages it gives up on stay dirty and
resident, so nothing is lost: the next pageout tries again, elsewhere.

How ``uvm_pager_dropcluster`` maps here: the swap pager finishes every page
of a synchronous write itself (its iodone runs before ``put_pages``
returns), through ``SwapPager._drop_cluster``, which is the reference's
dropcluster with ``PGO_REALLOCSWAP``. Two departures follow from that, both
kept on purpose:

- the retried page gets a fresh block: the failed transfer's blocks,
  the centre page's included, were given back before ``pager_put`` sees
  the result, where the reference keeps the centre's slot (``swblk``) and
  frees the others; a transient error says nothing about which block, and
  any free block serves;
- a hard error marks bad the blocks of the failed transfer only: a cluster
  here may be written as several transfers (the swap pager halves runs on
  fragmented swap), and the blocks of those that succeeded hold good data.
  In the reference a cluster is always one transfer, so "the cluster" and
  "the failed transfer" are the same blocks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vmpager.vm.cluster import make_put_cluster
from vmpager.vm.pagerops import Pager, PagerResult
from vmpager.vm.registry import put_pages

if TYPE_CHECKING:
    from vmpager.vm.object import VMObject
    from vmpager.vm.page import Page

__all__ = ["PutOutcome", "pager_put"]


class PutOutcome:
    """What ``pager_put`` did: the center page's result and the cluster written."""

    __slots__ = ("cluster_npages", "result", "retried")

    def __init__(self, result: PagerResult, cluster_npages: int, retried: bool) -> None:
        self.result = result
        self.cluster_npages = cluster_npages
        self.retried = retried


def pager_put(
    pager: Pager,
    obj: VMObject,
    center: Page,
    *,
    sync: bool,
    max_npages: int,
    lo: int | None = None,
    hi: int | None = None,
    active: bool = True,
) -> PutOutcome:
    """Page out ``center`` (dirty, idle) with the dirty neighbours it can take.

    ``[lo, hi)`` limits the cluster (the reference's start/stop without
    PGO_ALLPAGES); ``active=False`` leaves active neighbours out (no
    PGO_DOACTCLUST). Returns the outcome for ``center``: OK (written, clean),
    PEND (asynchronous write started), or FAIL/ERROR/AGAIN (still dirty).
    The caller holds the VM lock; the pager may release it during I/O.
    """
    wlo, whi = pager.cluster_bounds(obj, center.pindex)
    if lo is not None:
        wlo = max(wlo, lo)
    if hi is not None:
        whi = min(whi, hi)
    cluster = make_put_cluster(obj, center, wlo, whi, max_npages, active=active)
    results = put_pages(pager, obj, cluster, sync=sync)
    result = results[cluster.index(center)]
    if result is PagerResult.AGAIN and len(cluster) > 1 and center.dirty and not center.writing:
        # Transient failure of a cluster: retry the one page we were asked for.
        center.writing = True
        retry = put_pages(pager, obj, [center], sync=sync)
        return PutOutcome(retry[0], len(cluster), True)
    return PutOutcome(result, len(cluster), False)
