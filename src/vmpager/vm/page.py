"""A resident page: one frame holding one page of one VM object (struct vm_page).

Flags are plain attributes (cheaper than a bit set on the hot path):

- ``busy``: exclusively held; the contents are being filled (page-in) and are
  not valid yet. Everyone else waits.
- ``writing``: a pageout is in flight (PG_SWAPINPROG on a write); the contents
  are valid and stable, so readers may copy them, writers wait.
- ``dirty``: the frame differs from the backing store (or there is none); a
  property that keeps the kernel's count of dirty pages (``Kernel.ndirty``).
- ``referenced``: accessed since the page daemon last looked.
- ``wanted``: a thread waits for ``busy``/``writing`` to clear.

The VM lock guards every field.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vmpager.vm.object import VMObject

__all__ = ["QUEUE_ACTIVE", "QUEUE_INACTIVE", "QUEUE_NONE", "QUEUE_WIRED", "Page"]

QUEUE_NONE = 0
QUEUE_ACTIVE = 1
QUEUE_INACTIVE = 2
QUEUE_WIRED = 3


class Page:
    """One resident page. Identity (obj, pindex, frame) is fixed for its life."""

    __slots__ = (
        "_dirty",
        "act_count",
        "busy",
        "frame",
        "obj",
        "pindex",
        "prefetched",
        "queue",
        "referenced",
        "wanted",
        "writing",
    )

    def __init__(self, obj: VMObject, pindex: int, frame: int) -> None:
        self.obj = obj
        self.pindex = pindex
        self.frame = frame
        self.busy = True
        self.writing = False
        self._dirty = False
        self.referenced = False
        self.wanted = False
        self.queue = QUEUE_NONE
        self.act_count = 0
        #: Read around a fault and not used yet (read-around hit accounting).
        self.prefetched = False

    @property
    def dirty(self) -> bool:
        """The frame differs from the backing store (or there is none)."""
        return self._dirty

    @dirty.setter
    def dirty(self, value: bool) -> None:
        # The kernel counts dirty pages (``Kernel.ndirty``): the write floor
        # (``Kernel.room_to_dirty``) asks on every write to a clean page.
        if value:
            if not self._dirty:
                self._dirty = True
                self.obj._kernel.ndirty += 1
        elif self._dirty:
            self._dirty = False
            self.obj._kernel.ndirty -= 1

    def __repr__(self) -> str:
        flags = "".join(
            c
            for c, on in (
                ("B", self.busy),
                ("W", self.writing),
                ("D", self.dirty),
                ("R", self.referenced),
            )
            if on
        )
        return f"<Page {self.obj.oid}:{self.pindex} frame={self.frame} q={self.queue} {flags}>"
