"""The page queues the page daemon scans: active and inactive (vm_pagequeue).

A resident page is on exactly one of: the active queue, the inactive queue,
the wired set (never paged out), or no queue while it is busy being filled.
Queues are ordered dicts: the head is the oldest page, ``move_to_end``
requeues in O(1).

Policy (FreeBSD's, simplified): pages enter active when faulted in by a
caller and inactive when read around; the daemon ages active pages with an
activity count (``act_count``: +ACT_ADVANCE when referenced, -ACT_DECLINE
when not) and deactivates those that reach zero; on the inactive queue a
referenced page is reactivated, a clean one freed and a dirty one laundered.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vmpager.errors import InvariantViolation
from vmpager.vm.page import QUEUE_ACTIVE, QUEUE_INACTIVE, QUEUE_NONE, QUEUE_WIRED, Page

if TYPE_CHECKING:
    from vmpager.vm.storage import PageStorage

__all__ = ["ACT_ADVANCE", "ACT_DECLINE", "ACT_INIT", "ACT_MAX", "PageQueues", "QueueStatistics"]

ACT_INIT = 0
ACT_ADVANCE = 3
ACT_DECLINE = 1
ACT_MAX = 64


@dataclass(frozen=True, slots=True)
class QueueStatistics:
    active: int
    inactive: int
    wired: int


class PageQueues:
    """Active and inactive queues plus the wired set; the VM lock guards them."""

    def __init__(self) -> None:
        self.active: OrderedDict[Page, None] = OrderedDict()
        self.inactive: OrderedDict[Page, None] = OrderedDict()
        self.wired: set[Page] = set()

    def remove(self, page: Page) -> None:
        """Take ``page`` off whatever queue it is on. O(1)."""
        q = page.queue
        if q == QUEUE_ACTIVE:
            del self.active[page]
            storage = page.obj.storage
            if storage is not None:  # mapped objects: vm/storage.py
                page.queue = QUEUE_NONE
                storage.leaving_active(page)
        elif q == QUEUE_INACTIVE:
            del self.inactive[page]
        elif q == QUEUE_WIRED:
            self.wired.discard(page)
        page.queue = QUEUE_NONE

    def activate(self, page: Page) -> None:
        """Put ``page`` at the tail of the active queue. O(1)."""
        if page.queue == QUEUE_ACTIVE:
            self.active.move_to_end(page)
            return
        self.remove(page)
        self.active[page] = None
        page.queue = QUEUE_ACTIVE
        if page.act_count < ACT_INIT:
            page.act_count = ACT_INIT

    def deactivate(self, page: Page) -> None:
        """Put ``page`` at the tail of the inactive queue. O(1)."""
        if page.queue == QUEUE_INACTIVE:
            self.inactive.move_to_end(page)
            return
        self.remove(page)
        self.inactive[page] = None
        page.queue = QUEUE_INACTIVE

    def deactivate_pages(self, pages: list[Page]) -> None:
        """Put active ``pages`` at the tail of the inactive queue, in order.

        For mapped objects the storage is told once for all of an object's pages
        (``PageStorage.leaving_active_pages``: the bound ones are unbound in runs)
        before any of them reaches the inactive queue. O(len(pages)).
        """
        active = self.active
        leaving: dict[int, tuple[PageStorage, list[Page]]] = {}
        for page in pages:
            if page.queue != QUEUE_ACTIVE:
                raise ValueError(f"pages: {page!r} is not on the active queue")
        for page in pages:
            del active[page]
            page.queue = QUEUE_NONE
            storage = page.obj.storage
            if storage is not None:  # mapped objects: vm/storage.py
                entry = leaving.get(id(storage))
                if entry is None:
                    leaving[id(storage)] = (storage, [page])
                else:
                    entry[1].append(page)
        for storage, group in leaving.values():
            storage.leaving_active_pages(group)
        inactive = self.inactive
        for page in pages:
            inactive[page] = None
            page.queue = QUEUE_INACTIVE

    def deactivate_noreuse(self, page: Page) -> None:
        """Put ``page`` at the head of the inactive queue: the next the daemon looks at. O(1).

        For pages the program is done with (vm_page_deactivate_noreuse).
        """
        q = page.queue
        if q != QUEUE_INACTIVE:
            if q == QUEUE_ACTIVE and page.obj.storage is None:
                del self.active[page]  # remove(), inlined: a stream gives up a page per fault
            else:
                self.remove(page)
            self.inactive[page] = None
            page.queue = QUEUE_INACTIVE
        self.inactive.move_to_end(page, last=False)

    def wire(self, page: Page) -> None:
        self.remove(page)
        self.wired.add(page)
        page.queue = QUEUE_WIRED

    def statistics(self) -> QueueStatistics:
        return QueueStatistics(len(self.active), len(self.inactive), len(self.wired))

    def check(self) -> None:
        """Raise ``InvariantViolation`` listing every broken invariant (``problems``)."""
        found = self.problems()
        if found:
            raise InvariantViolation(found)

    def problems(self) -> list[str]:
        problems: list[str] = []
        for name, queue, tag in (
            ("active", self.active, QUEUE_ACTIVE),
            ("inactive", self.inactive, QUEUE_INACTIVE),
        ):
            for page in queue:
                if page.queue != tag:
                    problems.append(f"{page!r} is on the {name} queue but tagged {page.queue}")
        for page in self.wired:
            if page.queue != QUEUE_WIRED:
                problems.append(f"{page!r} is wired but tagged {page.queue}")
        return problems
