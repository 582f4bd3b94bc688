"""Direct block I/O on swap-backed objects (swap_pager_strategy, getchainbuf & co).

A cacheless path for block-device users (FreeBSD's md(4)): reads and writes
go between the caller's buffer and the swap devices without passing through
frames. Requests cover whole pages (else ``ValueError``, FreeBSD's
EINVAL). A page with no swap block reads as zeros; a write allocates
blocks; a delete frees them. A request is split where blocks stop being
contiguous or a stripe/device ends, into chained child requests that the
I/O engine performs, at most ``CHAIN_MAX_INFLIGHT`` at a time per parent;
as ``vm_pager_chain_iodone`` (FreeBSD ``swap_pager.c`` 2002) each failed
child overwrites the parent's error, so the error raised is that of the
last child to fail.

Writes: while swap has room for the whole request, it goes to freshly
allocated blocks and each page is switched to them only when its transfer
succeeded, so a failed write leaves the page's previous contents readable
(the new blocks are freed, or marked bad after a hard error under the
reference's policy), never a torn mixture; this departs from FreeBSD's
``swap_pager_strategy``, which writes over a page's block in place. When
swap cannot give the whole request fresh blocks, the write falls back on the
reference's way: pages that own a block are written in place (an overwrite
succeeds on a full swap; a failed in-place write leaves those pages'
contents undefined, as a disk's, and raises), and only pages without a block
need new ones (all or nothing: ``SwapExhausted``, nothing written).

Coherence with resident pages of the same object (FreeBSD's swap_pager_strategy
assumed there were none): for the duration of a request its page range is fenced, so
faults on those pages wait; a read takes resident pages from their frames
(they are at least as new as swap); a write or delete first drops resident
pages of the range (waiting for busy ones), so later faults see the new
blocks. Objects with a backing chain (clones) are served through the normal
paths, which walk the chain.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vmpager.errors import DeviceError, SwapExhausted
from vmpager.io.request import IOKind, IORequest
from vmpager.swap.meta import SWAPBLK_NONE
from vmpager.vm.object import NOT_RESERVED, RESERVED_UNWRITTEN, RESERVED_WRITTEN, checked_range

if TYPE_CHECKING:
    from vmpager.vm.kernel import Kernel
    from vmpager.vm.object import VMObject
    from vmpager.vm.pagerops import SwapPagerOps

__all__ = ["CHAIN_MAX_INFLIGHT", "strategy"]

#: Child requests in flight per parent (getchainbuf's waitchainbuf(bp, 4, 0), FreeBSD 2002).
CHAIN_MAX_INFLIGHT = 4


@dataclass(eq=False)
class _Chain:
    """A parent request and its children (the chain buffer bookkeeping)."""

    outstanding: int = 0
    issued: int = 0
    errors: list[tuple[IORequest[object], DeviceError]] = field(default_factory=list)
    done: list[IORequest[object]] = field(default_factory=list)


def _check_request(vm: Kernel, obj: VMObject, offset: int, length: int) -> tuple[int, int]:
    ps = vm.page_size
    if offset % ps or length % ps:
        raise ValueError(
            f"strategy requests must cover whole pages of {ps} bytes (EINVAL): "
            f"offset {offset}, length {length}"
        )
    checked_range(obj, offset, length)
    return offset // ps, length // ps


def _swap_pager(vm: Kernel) -> SwapPagerOps:
    """The swap pager, whose strategy this module is."""
    return vm.swap_pager


def strategy(
    vm: Kernel, obj: VMObject, op: str, offset: int, buffer: memoryview | None, length: int
) -> None:
    """Perform one strategy request; blocks until every child request is done.

    ``op`` is "read" (fills ``buffer``), "write" (stores ``buffer``) or
    "delete" (frees the range; ``buffer`` is None). Raises ``DeviceError``
    (first child failure), ``SwapExhausted`` (a write found no swap; nothing
    was written) or ``ValueError`` (a request not made of whole pages).
    """
    first, npages = _check_request(vm, obj, offset, length)
    if npages == 0:
        return
    with vm.cond:
        obj.check_open()
        fence = (first, first + npages)
        while any(s < fence[1] and fence[0] < e for s, e in obj.strategy_ranges):
            vm.cond.wait()
        obj.strategy_ranges.append(fence)
        try:
            if op == "read":
                assert buffer is not None
                _wait_unbusy(vm, obj, first, first + npages)
                _read(vm, obj, first, npages, buffer)
            elif op == "write":
                assert buffer is not None
                vm.drop_pages(obj, first, first + npages)
                _write(vm, obj, first, npages, buffer)
            elif op == "delete":
                vm.drop_pages(obj, first, first + npages)
                _swap_pager(vm).free_space(obj, first, npages)
            else:
                raise ValueError(f"op must be 'read', 'write' or 'delete', got {op!r}")
        finally:
            obj.strategy_ranges.remove(fence)
            vm.cond.notify_all()


def _wait_unbusy(vm: Kernel, obj: VMObject, start: int, end: int) -> None:
    """Wait for faults already under way in the range to finish filling their pages."""
    while True:
        busy = next((p for i, p in obj.pages.items() if start <= i < end and p.busy), None)
        if busy is None:
            return
        vm.wait_page(busy)


def _runs(vm: Kernel, blocks: list[int], first: int) -> list[tuple[int, int, int]]:
    """``(index, blk, n)``: maximal runs of contiguous blocks inside one stripe."""
    runs: list[tuple[int, int, int]] = []
    i = 0
    space = vm.space
    while i < len(blocks):
        blk = blocks[i]
        if blk == SWAPBLK_NONE:
            i += 1
            continue
        limit = space.run_limit(blk)
        n = 1
        while i + n < len(blocks) and n < limit and blocks[i + n] == blk + n:
            n += 1
        runs.append((i, blk, n))
        i += n
    return runs


def _issue(vm: Kernel, chain: _Chain, kind: IOKind, blk: int, buffers: list[memoryview]) -> None:
    """flushchainbuf: hand a child to the engine once fewer than the limit are out."""
    while chain.outstanding >= CHAIN_MAX_INFLIGHT:
        vm.cond.wait()

    def child_done(request: IORequest[object]) -> None:
        chain.outstanding -= 1
        chain.done.append(request)
        if request.error is not None:
            chain.errors.append((request, request.error))
        vm.cond.notify_all()

    chain.outstanding += 1
    chain.issued += 1
    vm.engine.submit(IORequest(kind, blk, buffers, [], child_done))


def _wait(vm: Kernel, chain: _Chain) -> None:
    """waitchainbuf: wait for every child of the chain."""
    while chain.outstanding:
        vm.cond.wait()


def _read(vm: Kernel, obj: VMObject, first: int, npages: int, buffer: memoryview) -> None:
    ps = vm.page_size
    blocks = _swap_pager(vm).meta.lookup_range(obj.oid, first, npages).tolist()
    state = obj.reserve_state
    fview = vm.frames.view
    for i in range(npages):
        page = obj.pages.get(first + i)
        if page is not None and not page.busy:
            # Resident pages are at least as new as their swap copies.
            start = page.frame * ps
            buffer[i * ps : (i + 1) * ps] = fview[start : start + ps]
            blocks[i] = SWAPBLK_NONE
        elif blocks[i] == SWAPBLK_NONE or (
            state is not None and state[first + i] == RESERVED_UNWRITTEN
        ):
            buffer[i * ps : (i + 1) * ps] = bytes(ps)
            blocks[i] = SWAPBLK_NONE
    chain = _Chain()
    for i, blk, n in _runs(vm, blocks, first):
        bufs = [buffer[(i + j) * ps : (i + j + 1) * ps] for j in range(n)]
        _issue(vm, chain, IOKind.READ, blk, bufs)
        vm.counters.pageins += 1
        vm.counters.pagein_pages += n
    _wait(vm, chain)
    if chain.errors:
        vm.counters.read_errors += len(chain.errors)
        raise chain.errors[0][1]


def _alloc_fresh(vm: Kernel, npages: int) -> list[tuple[int, int, int]] | None:
    """Fresh runs ``(index, blk, n)`` for all ``npages`` pages, or None (nothing kept)."""
    space = vm.space
    cluster_max = vm.config.cluster_max_npages
    runs: list[tuple[int, int, int]] = []
    i = 0
    while i < npages:
        got = space.alloc(min(cluster_max, npages - i), min_count=1)
        if got is None:
            for _, blk, n in runs:
                space.free(blk, n)
            vm.note_swap_freed()
            return None
        blk, n = got
        runs.append((i, blk, n))
        i += n
    return runs


def _alloc_in_place(
    vm: Kernel, obj: VMObject, first: int, npages: int
) -> list[tuple[int, int, int, bool]]:
    """Runs ``(index, blk, n, fresh)`` writing over the blocks the pages own.

    FreeBSD ``swap_pager_strategy`` (2002): a page with a block is written
    in place; a page without one gets a fresh block. All or nothing:
    ``SwapExhausted`` (nothing taken) when a page without a block finds none.
    """
    space = vm.space
    blocks = _swap_pager(vm).meta.lookup_range(obj.oid, first, npages).tolist()
    missing = npages - _owned(blocks)
    fresh = [False] * npages
    taken: list[tuple[int, int]] = []
    i = 0
    while i < npages:
        if blocks[i] != SWAPBLK_NONE:
            i += 1
            continue
        want = 1
        while i + want < npages and blocks[i + want] == SWAPBLK_NONE:
            want += 1
        got = space.alloc(min(want, vm.config.cluster_max_npages), min_count=1)
        if got is None:
            for blk, n in taken:
                space.free(blk, n)
            vm.note_swap_freed()
            raise SwapExhausted(
                f"strategy write of {npages} pages: {missing} have no swap block and "
                f"{space.describe_free()} (ENOSPC)"
            )
        blk, n = got
        taken.append((blk, n))
        for j in range(n):
            blocks[i + j] = blk + j
            fresh[i + j] = True
        i += n
    runs: list[tuple[int, int, int, bool]] = []
    i = 0
    while i < npages:
        blk = blocks[i]
        limit = space.run_limit(blk)
        n = 1
        while (
            i + n < npages and n < limit and blocks[i + n] == blk + n and fresh[i + n] == fresh[i]
        ):
            n += 1
        runs.append((i, blk, n, fresh[i]))
        i += n
    return runs


def _owned(blocks: list[int]) -> int:
    return sum(1 for b in blocks if b != SWAPBLK_NONE)


def _write(vm: Kernel, obj: VMObject, first: int, npages: int, buffer: memoryview) -> None:
    """Write the pages: to fresh blocks, switched to on success, while swap has room;
    else over the blocks the pages own (the reference's way), fresh ones only for
    pages without a block."""
    ps = vm.page_size
    space = vm.space
    fresh_runs = _alloc_fresh(vm, npages)
    if fresh_runs is not None:
        runs = [(i, blk, n, True) for i, blk, n in fresh_runs]
    else:
        runs = _alloc_in_place(vm, obj, first, npages)
    chain = _Chain()
    kind = IOKind.WRITE_ASYNC
    for i, blk, n, _ in runs:
        bufs = [buffer[(i + j) * ps : (i + j + 1) * ps] for j in range(n)]
        _issue(vm, chain, kind, blk, bufs)
        vm.counters.pageouts += 1
        vm.counters.pageout_pages += n
    _wait(vm, chain)
    failed = {req.blk for req, _ in chain.errors}
    obj.swap_backed = True
    meta = _swap_pager(vm).meta
    state = obj.reserve_state
    for i, blk, n, fresh in runs:
        if blk in failed:
            continue
        for j in range(n):
            pindex = first + i + j
            if fresh:
                meta.build(obj.oid, pindex, blk + j)  # frees the previous copy
                if state is not None:
                    state[pindex] = NOT_RESERVED
            elif state is not None and state[pindex]:
                state[pindex] = RESERVED_WRITTEN  # the reserved block now holds data
    if chain.errors:
        vm.counters.write_errors += len(chain.errors)
        policy_bad = _swap_pager(vm).marks_bad
        in_place = {blk for _, blk, _, fresh in runs if not fresh}
        for request, err in chain.errors:
            if request.blk in in_place:
                # Still the page's block: its contents are now undefined, as a
                # disk's after a failed write; the caller gets the error.
                continue
            if policy_bad(err):
                space.mark_bad(request.blk, request.npages)
                vm.counters.bad_blocks_marked += request.npages
            else:
                space.free(request.blk, request.npages)
        # vm_pager_chain_iodone: each failed child overwrites the parent's
        # error, so the one raised is the last to complete.
        raise chain.errors[-1][1]
