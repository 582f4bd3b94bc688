"""Shared page storage: the VM's hook for objects mapped into another process.

This is part of the VM's internal interface. An object whose ``storage`` is
set may have pages whose frame is, for a while, an alias of a page of
shared memory that another process maps (mapped/binding.py puts the page of
a memfd at the frame's address, so the frame and the other process's view
are one physical page, counted once against the budget). The VM itself
never needs to know: it reads and writes the frame as always. It tells the
storage two things, with the VM lock held:

- ``leaving_active(page)``: the page leaves the active queue (deactivated,
  wired or freed). The storage detaches the frame from the shared page (the
  contents stay in the frame) and revokes the other process's access, so an
  inactive page is one the other process must fault on to use again: that
  fault is the reference the page daemon's second chance looks for, and
  writes can no longer change a page the daemon may launder.
- ``leaving_active_pages(pages)``: the same for several pages at once (the
  page daemon's deactivations of one aging pass), so the storage can detach
  them together; none reaches the inactive queue before it returns.
- ``freeing(page)``: the page's frame is about to return to the free pool;
  the contents are no longer needed.

The storage may attach (alias) only pages that are on the active queue, so
the page daemon only ever launders and frees ordinary frames. ``check``
reports broken invariants of the storage.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from vmpager.vm.object import VMObject
    from vmpager.vm.page import Page

__all__ = ["PageStorage"]


class PageStorage(Protocol):
    def leaving_active(self, page: Page) -> None:
        """``page`` (of the object) leaves the active queue. VM lock held; must not block long."""

    def leaving_active_pages(self, pages: list[Page]) -> None:
        """``leaving_active`` for each of ``pages`` (of the object), together. VM lock held."""

    def freeing(self, page: Page) -> None:
        """``page``'s frame is about to be freed. VM lock held."""

    def check(self, obj: VMObject) -> list[str]:
        """Broken invariants of the storage of ``obj`` (empty when consistent). VM lock held."""
