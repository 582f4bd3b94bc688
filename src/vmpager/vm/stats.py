"""Counters the VM keeps while running, and the frozen snapshot users get."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Counters", "VMStatistics"]


class Counters:
    """Mutable event counters; the VM lock guards them."""

    __slots__ = (
        "bad_blocks_marked",
        "clones",
        "cluster_hist",
        "collapses",
        "cow_copies",
        "faults",
        "frame_waits",
        "hits",
        "pagein_pages",
        "pageins",
        "pageout_fail_pages",
        "pageout_pages",
        "pageouts",
        "read_errors",
        "readaround_hits",
        "readaround_pages",
        "swap_exhausted",
        "write_errors",
        "zero_fills",
    )

    def __init__(self) -> None:
        self.faults = 0
        self.hits = 0
        self.zero_fills = 0
        self.cow_copies = 0
        self.clones = 0
        self.collapses = 0
        self.pageins = 0
        self.pagein_pages = 0
        self.pageouts = 0
        self.pageout_pages = 0
        self.pageout_fail_pages = 0
        self.readaround_pages = 0
        self.readaround_hits = 0
        self.read_errors = 0
        self.write_errors = 0
        self.bad_blocks_marked = 0
        self.frame_waits = 0
        self.swap_exhausted = 0
        self.cluster_hist: dict[int, int] = {}

    def note_cluster(self, npages: int) -> None:
        self.cluster_hist[npages] = self.cluster_hist.get(npages, 0) + 1


@dataclass(frozen=True, slots=True)
class VMStatistics:
    """A snapshot of a VM's activity and state (``VM.statistics()``)."""

    page_size: int
    #: Frames: the memory budget, and how they are used now.
    nframes: int
    free_nframes: int
    resident_npages: int
    active_npages: int
    inactive_npages: int
    dirty_npages: int
    #: Faults: every miss of a resident page; zero fills and copy-on-write copies among them.
    faults: int
    zero_fills: int
    cow_copies: int
    clones: int
    collapses: int
    #: Page-ins: read operations and the pages they brought in (read-around included).
    pageins: int
    pagein_pages: int
    readaround_pages: int
    readaround_hits: int
    #: Pageouts: write operations and pages written; pages swap could not take.
    pageouts: int
    pageout_pages: int
    pageout_fail_pages: int
    #: (cluster size in pages, number of writes) pairs, ascending.
    cluster_histogram: tuple[tuple[int, int], ...]
    #: Swap space in blocks (one block holds one page).
    swap_total_blocks: int
    swap_used_blocks: int
    swap_bad_blocks: int
    swap_almost_full: bool
    swap_full: bool
    #: Failures.
    read_errors: int
    write_errors: int
    bad_blocks_marked: int
    swap_exhausted: int
    frame_waits: int
    #: Asynchronous writes in flight, and the limit (swap_async_max).
    async_writes_in_flight: int
    swap_async_max: int
    objects: int
    daemon_scans: int

    @property
    def mean_cluster_npages(self) -> float:
        """Mean pages per pageout write."""
        return self.pageout_pages / self.pageouts if self.pageouts else 0.0
