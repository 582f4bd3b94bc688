"""The pager of closed objects (FreeBSD's dead_pager, vm_pager.c).

Closing an object gives it this pager in place of its own (``VMObject.pager``);
``VMObject.closed`` is just "its pager is the dead pager". A closed object
holds no pages, so every access faults, and the fault path asks the pager
first: here every request that would bring data in (``has_page``,
``has_pages``, ``page_run``, ``get_pages``, ``read_runs``) raises
``ObjectClosed`` naming the object, the one place that error is raised for
objects. Requests that only forget (``unswapped``, ``free_space``,
``dealloc``) do nothing: the object's store went with its own pager's
``dealloc``. A write of a closed object's page (a pageout scan that took it
before the close dropped it) fails with ``FAIL`` and leaves the page dirty
for the close to drop.

Paths that change state before they reach a pager (a file's resize, a
clone, a strategy request, a batched call's bookkeeping) ask
``VMObject.check_open``, which ends here too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NoReturn

from vmpager.errors import ObjectClosed
from vmpager.vm.pagerops import PagerResult

if TYPE_CHECKING:
    from vmpager.errors import DeviceError
    from vmpager.vm.object import VMObject
    from vmpager.vm.page import Page

__all__ = ["DEAD_PAGER", "DeadPager"]


class DeadPager:
    """The pager of every closed object; stateless, one instance (``DEAD_PAGER``)."""

    kind = "dead"

    def refuse(self, obj: VMObject) -> NoReturn:
        """Raise ``ObjectClosed`` naming ``obj`` (``VMObject.describe``)."""
        raise ObjectClosed(f"{obj.describe()} is closed")

    # -- requests that would bring data in: refused -------------------------------

    def has_page(self, obj: VMObject, pindex: int) -> bool:
        self.refuse(obj)

    def has_pages(self, obj: VMObject, start: int, npages: int) -> list[bool]:
        self.refuse(obj)

    def page_run(
        self, obj: VMObject, pindex: int, before_max: int, after_max: int
    ) -> tuple[int, int] | None:
        self.refuse(obj)

    def get_pages(self, obj: VMObject, pages: Sequence[Page], reqpage: int) -> PagerResult:
        self.refuse(obj)

    def read_runs(
        self, obj: VMObject, runs: Sequence[tuple[int, list[Page]]]
    ) -> DeviceError | None:
        self.refuse(obj)

    # -- writes: nothing takes them -----------------------------------------------

    def put_pages(self, obj: VMObject, pages: Sequence[Page], *, sync: bool) -> list[PagerResult]:
        for page in pages:
            page.writing = False  # stays dirty: the close drops it
        return [PagerResult.FAIL] * len(pages)

    # -- requests that only forget or advise: nothing to do -----------------------

    def readaround_npages(self, obj: VMObject, pindex: int, default_npages: int) -> int:
        return 0

    def cluster_bounds(self, obj: VMObject, pindex: int) -> tuple[int, int]:
        return pindex, pindex + 1

    def batches_pageout(self, obj: VMObject) -> bool:
        return False

    def unswapped(self, obj: VMObject, pindex: int) -> None:
        pass

    def free_space(self, obj: VMObject, start: int, npages: int) -> None:
        pass

    def dealloc(self, obj: VMObject) -> None:
        pass

    def check(self) -> None:
        """Nothing to check: the dead pager holds no state."""


#: The one dead pager.
DEAD_PAGER = DeadPager()
