"""The high-level pageout routine (uvm_pager_put, uvm_pager_dropcluster).

``pager_put`` clusters around a dirty page and writes the cluster through
the object's pager. When the write fails transiently (AGAIN) and there was a
cluster, it drops the cluster and retries the one page it was asked for;
it does the same when the pager found no room for the whole cluster (FAIL:
free swap too fragmented for a run that long), as NetBSD's page daemon
settles for fewer swap slots than it asked for. After a hard error it does
not retry. The pages it gives up on stay dirty and
resident, so nothing is lost: the next pageout tries again, elsewhere.

How the seed's dropcluster maps here: the swap pager finishes every page of
a synchronous write itself (its iodone runs before ``put_pages`` returns):
pages of a failed transfer are already released, dirty, and their swap
blocks given back (transient) or marked bad (hard), which is the seed's
``PGO_REALLOCSWAP`` drop. What is left for ``pager_put`` is the retry.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vmpager.pager.cluster import make_put_cluster
from vmpager.pager.protocol import Pager, PagerResult
from vmpager.pager.registry import put_pages

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
) -> PutOutcome:
    """Page out ``center`` (dirty, idle) with the dirty neighbours it can take.

    ``[lo, hi)`` limits the cluster (the seed's start/stop without
    PGO_ALLPAGES). Returns the outcome for ``center``: OK (written, clean),
    PEND (asynchronous write started), or FAIL/ERROR/AGAIN (still dirty).
    The caller holds the VM lock; the pager may release it during I/O.
    """
    wlo, whi = pager.cluster_bounds(obj, center.pindex)
    if lo is not None:
        wlo = max(wlo, lo)
    if hi is not None:
        whi = min(whi, hi)
    cluster = make_put_cluster(obj, center, wlo, whi, max_npages)
    results = put_pages(pager, obj, cluster, sync=sync)
    result = results[cluster.index(center)]
    retry_on = (PagerResult.AGAIN, PagerResult.FAIL)
    if result in retry_on and len(cluster) > 1 and center.dirty and not center.writing:
        # Transient failure of a cluster, or no run of blocks as long as the
        # cluster (fragmented swap): retry the one page we were asked for.
        center.writing = True
        retry = put_pages(pager, obj, [center], sync=sync)
        return PutOutcome(retry[0], len(cluster), True)
    return PutOutcome(result, len(cluster), False)
