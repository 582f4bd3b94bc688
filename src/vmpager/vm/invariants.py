"""The VM's invariants, checked across every part (frames, queues, pagers, swap, chains).

``problems(kernel)`` lists each broken invariant in words (empty when all
hold); ``VM.check`` raises ``InvariantViolation`` with that list. The caller
holds the kernel's lock. O(resident pages + swap blocks in use).
"""

from __future__ import annotations

import numpy as np

from vmpager.errors import InvariantViolation
from vmpager.vm import shadow
from vmpager.vm.kernel import Kernel
from vmpager.vm.page import QUEUE_NONE, Page

__all__ = ["problems"]


def problems(kernel: Kernel) -> list[str]:
    """Every broken invariant of the VM, in words (lock held)."""
    found: list[str] = []
    # Every part checks itself (one convention: check() raises InvariantViolation).
    for part, checker in (
        ("frames", kernel.frames.check),
        ("queues", kernel.queues.check),
        ("pager map", kernel.pagermap.check),
        ("swap space", kernel.space.check),
        ("swap pager", kernel.swap_pager.check),
        ("vnode pager", kernel.vnode_pager.check),
        ("device pager", kernel.device_pager.check),
    ):
        try:
            checker()
        except InvariantViolation as exc:
            found += [f"{part}: {problem}" for problem in exc.problems]
    # Frames: each is free or held by exactly one resident page.
    owner: dict[int, Page] = {}
    queued = 0
    ndirty = 0
    for obj in kernel.objects.values():
        if obj.storage is not None:  # mapped objects: vm/storage.py
            found += obj.storage.check(obj)
        for pindex, page in obj.pages.items():
            where = f"page {obj.oid}:{pindex}"
            if page.obj is not obj or page.pindex != pindex:
                found.append(f"{where}: recorded as {page!r}")
            if not 0 <= pindex < obj.npages:
                found.append(f"{where}: index outside the object ({obj.npages} pages)")
            if page.frame in owner:
                found.append(f"{where}: frame {page.frame} also holds {owner[page.frame]!r}")
            owner[page.frame] = page
            if kernel.frames.is_free(page.frame):
                found.append(f"{where}: its frame {page.frame} is on the free list")
            if page.dirty:
                ndirty += 1
            if page.writing and not page.dirty:
                found.append(f"{where}: being written but clean")
            if page.queue == QUEUE_NONE and not page.busy:
                found.append(f"{where}: idle but on no queue")
            if page.queue != QUEUE_NONE:
                queued += 1
    if len(owner) + kernel.frames.free_nframes != kernel.frames.nframes:
        found.append(
            f"frames: {len(owner)} resident + {kernel.frames.free_nframes} free "
            f"!= {kernel.frames.nframes}"
        )
    if ndirty != kernel.ndirty:
        found.append(f"dirty pages: {ndirty} resident but {kernel.ndirty} counted")
    nqueued = len(kernel.queues.active) + len(kernel.queues.inactive) + len(kernel.queues.wired)
    if nqueued != queued:
        found.append(f"queues hold {nqueued} pages but {queued} resident pages are queued")
    # Swap: every used block is owned by exactly one page (meta checks uniqueness).
    stats = kernel.swap_pager.space_statistics()
    owned = kernel.swap_pager.meta.total()
    if stats.used != owned:
        found.append(f"swap: {stats.used} blocks allocated but {owned} owned by pages")
    found += _check_block_owners(kernel)
    if stats.free + stats.used + stats.bad != stats.total:
        found.append(
            f"swap: free {stats.free} + used {stats.used} + bad {stats.bad} != {stats.total}"
        )
    found += shadow.check_chains(kernel, kernel.objects)
    for oid in kernel.swap_pager.meta.objects():
        if oid not in kernel.objects:
            found.append(f"swap: blocks owned by object {oid}, which is gone")
    return found


def _check_block_owners(kernel: Kernel) -> list[str]:
    """Blocks pages own that the swap space has not allocated, and the reverse.

    The counts may agree while the sets differ (a page pointing at a free
    block, which the allocator will hand out again). O(blocks in use).
    """
    oids, pindexes, blks = kernel.swap_pager.meta.owner_arrays()
    parts = [kernel.swap_pager.blocks_in_use(index) for index, _ in kernel.space.devices()]
    used = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
    found: list[str] = []
    stray = np.flatnonzero(~np.isin(blks, used))
    for k in stray[:10].tolist():
        found.append(f"swap: block {blks[k]} of page {oids[k]}:{pindexes[k]} is not allocated")
    if len(stray) > 10:
        found.append(f"swap: and {len(stray) - 10} more owned blocks not allocated")
    orphans = np.setdiff1d(used, blks)
    if len(orphans):
        found.append(
            f"swap: {len(orphans)} allocated blocks have no owner (first: {orphans[:5].tolist()})"
        )
    return found
