"""Tuning of a VM: one frozen record, every quantity with its unit in its name."""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["VMConfig", "Watermarks", "WriteErrorPolicy", "watermarks"]


class WriteErrorPolicy(enum.Enum):
    """What a failed swap write means (the reference sources and their descendants differ).

    - ``NETBSD_1_48``: NetBSD ``uvm_pager.c`` 1.48 / OpenBSD: EAGAIN is transient (drop the cluster,
      retry the one page; the blocks go back to the free pool); any other error
      marks the blocks bad, and the page stays dirty and resident.
    - ``NETBSD``: modern NetBSD: ENOMEM is transient, everything else marks bad.
    - ``FREEBSD``: modern FreeBSD: never mark blocks bad; the page stays dirty
      and the blocks are freed for a later try.
    """

    NETBSD_1_48 = "netbsd-1.48"
    #: The former name of ``NETBSD_1_48``, kept so that existing code still works.
    SEED = "netbsd-1.48"

    @classmethod
    def _missing_(cls, value: object) -> WriteErrorPolicy | None:
        # "seed" was the value of NETBSD_1_48 before it named its source.
        return cls.NETBSD_1_48 if value == "seed" else None

    NETBSD = "netbsd"
    FREEBSD = "freebsd"


@dataclass(frozen=True, slots=True)
class VMConfig:
    """Knobs of one VM. Defaults follow the reference sources (NetBSD
    ``uvm_pager.c`` 1.48, FreeBSD ``swap_pager.c`` 2002) where they have a value.

    Frame counts are derived from the memory budget by ``VM``; the fields here
    are the policy around them.
    """

    #: Largest pageout cluster, in pages (MAX_PAGEOUT_CLUSTER / nsw_cluster_max).
    #: FreeBSD 2002 has 16 (selects it); 64 pages (256 KiB with 4 KiB pages) is
    #: what batched pageout fills. 256 (1 MiB writes) drains 1.3-1.85x and pages
    #: out behind a writer 1.3-1.4x faster, but batched random paging ran at
    #: 0.74-0.87x in every run side by side (docs/performance.md, "Pageout"):
    #: a switch for workloads that mostly write.
    cluster_max_npages: int = 64
    #: Read-around window on each side of a faulting page. FreeBSD 2002's
    #: swap_pager_haspage gives at most SWB_NPAGES / 2 - 1 = 7 (7 selects it);
    #: 8 keeps read-around and read-ahead windows powers of two (8 doubling to
    #: ``readahead_max_npages``). For anonymous memory it is the first
    #: read-ahead window of a sequential stream.
    readaround_npages: int = 8
    #: Anonymous memory reads ahead only for sequential faults (the window
    #: grows to ``readahead_max_npages``; random faults read their page alone)
    #: and a stream at full speed gives up the pages it left behind. False:
    #: FreeBSD 2002's fixed read-around of ``readaround_npages`` on each side.
    sequential_readahead: bool = True
    #: Largest read-ahead window of a sequential stream of faults on anonymous
    #: memory (VM_FAULT_READ_AHEAD_MAX).
    readahead_max_npages: int = 128
    #: The page daemon writes the dirty anonymous pages it finds together, in
    #: pageout order, up to ``cluster_max_npages`` per write whatever objects
    #: and offsets they have. False: FreeBSD 2002's clusters of neighbours in one
    #: object only.
    pageout_batching: bool = True
    #: Pageout clusters take idle dirty neighbours from any queue (NetBSD's
    #: PGO_DOACTCLUST). False: a cluster stops at the first active neighbour,
    #: as ``uvm_mk_pcluster`` called by the page daemon without that flag.
    pageout_cluster_active: bool = True
    #: The swap blocks of pages made dirty (their copies went stale) are given
    #: back to the swap space in sorted batches of this many, one free per run
    #: of neighbours, and before any allocation or report of swap use; 1 gives
    #: each back at once, as FreeBSD 2002 does.
    swap_free_batch_nblocks: int = 256
    #: Asynchronous swap writes in flight at once (swap_async_max).
    swap_async_max: int = 4
    #: Swap buffer headers (nswbuf); reads get half, sync writes a quarter.
    nswbuf: int = 32
    #: Page daemon wakes when free frames fall below this (v_free_min), in frames.
    free_min_nframes: int | None = None
    #: Page daemon works until this many frames are free (v_free_target).
    free_target_nframes: int | None = None
    #: Frames only page-ins may take, so reads of swapped data keep working when
    #: memory is full of dirty pages that swap cannot take.
    read_reserve_nframes: int = 4
    #: Pager map size (pager_map), in pages, and the part only the daemon may use.
    pager_map_npages: int = 1024
    pager_map_reserve_npages: int = 64
    #: What a failed swap write means.
    write_error_policy: WriteErrorPolicy = WriteErrorPolicy.NETBSD_1_48
    #: Run the page daemon in its own thread; when False, a thread that needs a
    #: frame runs the pageout scan itself with synchronous I/O (deterministic).
    daemon_thread: bool = True
    #: Worker threads that perform asynchronous device I/O.
    io_workers: int = 2
    #: Reads in flight at once when a batched call (``read_words``,
    #: ``read_pages``...) pages many pages in; bounded by the read slots
    #: (nswbuf / 2). A disk serves 16 reads in flight about 4x faster than one.
    batch_read_depth: int = 16
    #: Pages a batched call holds resident at once (it works in chunks of this
    #: many distinct pages); at most a quarter of the frames is used.
    batch_max_npages: int = 1024


@dataclass(frozen=True, slots=True)
class Watermarks:
    """The frame counts the page daemon works between, derived from a config.

    ``free_min_nframes`` and ``free_target_nframes`` include the read reserve
    (v_free_min, v_free_target); ``inactive_target`` is v_inactive_target.
    """

    read_reserve_nframes: int
    free_min_nframes: int
    free_target_nframes: int
    inactive_target: int


def watermarks(config: VMConfig, nframes: int) -> Watermarks:
    """The daemon's watermarks for ``nframes`` frames under ``config``. Pure, O(1)."""
    read_reserve = min(config.read_reserve_nframes, nframes // 4)
    free_min = config.free_min_nframes
    if free_min is None:
        free_min = max(1, nframes // 128)
        if config.sequential_readahead:
            # Room for a whole read-ahead when the daemon is woken.
            free_min = max(free_min, min(config.readahead_max_npages, nframes // 64))
    free_target = config.free_target_nframes
    if free_target is None:
        free_target = max(free_min + 1, 2 * free_min, config.cluster_max_npages)
        if config.pageout_batching:
            # Enough above the minimum to keep every asynchronous write slot busy.
            batches = free_min + config.cluster_max_npages * config.swap_async_max
            free_target = max(free_target, min(batches, nframes // 8))
    free_target = min(free_target, nframes // 2)
    free_min = min(free_min, max(free_target - 1, 1))
    free_min_nframes = free_min + read_reserve
    return Watermarks(
        read_reserve_nframes=read_reserve,
        free_min_nframes=free_min_nframes,
        free_target_nframes=max(free_target + read_reserve, free_min_nframes),
        inactive_target=max(nframes // 4, 2 * free_target, 1),
    )
