"""The read-ahead policy: one ramp for every sequential stream of faults (vm_fault's
read-ahead), whether anonymous memory or a file.

A fault that continues a stream (the page after the last one read) doubles
the window, from the read-around window ``first`` up to ``maximum``; any
other fault is random and resets it to 0. The fault path and the vnode
pager's asynchronous windows both step through ``next_window``, and
``VMConfig.readaround_npages`` / ``VMConfig.readahead_max_npages`` bound both.
"""

from __future__ import annotations

__all__ = ["FILE_READAHEAD_MAX_NPAGES", "file_readahead_max_npages", "next_window"]

#: Ceiling of a file's synchronous read-ahead window, in pages (256 KiB of 4 KiB
#: pages). Files keep two such windows in flight asynchronously besides, so a
#: file stream has as much read ahead as an anonymous one at
#: ``VMConfig.readahead_max_npages`` (128).
FILE_READAHEAD_MAX_NPAGES = 64


def next_window(window: int, *, sequential: bool, first: int, maximum: int) -> int:
    """The window after ``window`` for a fault that is (or is not) ``sequential``. Pure, O(1)."""
    if not sequential:
        return 0
    return min(max(first, 2 * window), max(first, maximum))


def file_readahead_max_npages(anonymous_max_npages: int) -> int:
    """The ceiling of a file's window for the anonymous ceiling ``anonymous_max_npages``
    (``VMConfig.readahead_max_npages``): at most ``FILE_READAHEAD_MAX_NPAGES``."""
    return min(FILE_READAHEAD_MAX_NPAGES, anonymous_max_npages)
