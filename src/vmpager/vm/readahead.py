"""The read-ahead policy: one ramp for every sequential stream of faults (vm_fault's
read-ahead), whether anonymous memory or a file.

A fault that continues a stream (the page after the last one read) doubles
the window, from the read-around window ``first`` up to ``maximum``; any
other fault is random and resets it to 0. The fault path and the vnode
pager's asynchronous windows both step through ``next_window``, and
``VMConfig.readaround_npages`` / ``VMConfig.readahead_max_npages`` bound both.
"""

from __future__ import annotations

__all__ = ["next_window"]


def next_window(window: int, *, sequential: bool, first: int, maximum: int) -> int:
    """The window after ``window`` for a fault that is (or is not) ``sequential``. Pure, O(1)."""
    if not sequential:
        return 0
    return min(max(first, 2 * window), max(first, maximum))
