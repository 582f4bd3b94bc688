"""The conformance suite every pager passes (swap, vnode, device).

A *subject* is one pager on a fresh small world with one object whose
store holds known contents. ``check_pager(make_subject)`` runs every check;
``CONFORMANCE_CHECKS`` lists them for ``pytest.mark.parametrize``::

    @pytest.mark.parametrize("check", CONFORMANCE_CHECKS, ids=lambda c: c.__name__)
    def test_conformance(check, tmp_path):
        check(lambda: vnode_subject(tmp_path))

Each check drives the pager the way the VM does: with the VM lock held, on
pages that are not resident, through the registry's contract-checked
``get_pages``/``put_pages`` (and ``pager_put`` for clusters), then asserts
the semantics of ``pager/protocol.py``; ``vm.check()`` runs at the end of
every check and the subject's world is closed.

Where pagers differ by nature, the subject says so, and the check follows:

- ``stored``: the pages the store holds. Swap holds only pages paged out;
  a file and device memory hold every page of the object.
- ``unswapped_forgets``: after ``unswapped`` the store no longer has the
  page (swap frees its block); a file or device memory keeps its stale
  bytes until the next write-back, so ``has_page`` stays True.
- ``free_space_forgets``: likewise for ``free_space`` (a file's pages are
  its contents, and device memory is not the VM's to free).
- ``released()``: what ``dealloc`` must have given back once the object is
  closed (swap blocks; the file descriptor; the buffer export).

Page contents are whole pages; for an object whose size is not a multiple
of the page size, the last page reads as its bytes followed by zeros.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from vmpager.testing.worlds import PAGE, small_vm
from vmpager.vm.object import VMObject
from vmpager.vm.page import QUEUE_INACTIVE, Page
from vmpager.vm.pagerops import Pager, PagerResult
from vmpager.vm.put import pager_put
from vmpager.vm.registry import get_pages, put_pages
from vmpager.vm.system import VM

__all__ = [
    "CONFORMANCE_CHECKS",
    "PagerSubject",
    "SubjectFactory",
    "check_pager",
    "device_subject",
    "swap_subject",
    "vnode_subject",
]

#: Pages of the object every subject maps; the stores hold most of them.
NPAGES = 11
#: Bytes of the last page for the subjects that have a partial one.
TAIL_BYTES = 100


@dataclass
class PagerSubject:
    """One pager under test; see the module docstring for the fields' meaning."""

    name: str
    vm: VM
    pager: Pager
    obj: VMObject
    #: pindex -> the page's contents on the store (full page, zeros past the end).
    contents: dict[int, bytes]
    stored: frozenset[int]
    unswapped_forgets: bool
    free_space_forgets: bool
    released: Callable[[], bool]
    cleanup: Callable[[], None] = field(default=lambda: None)

    @property
    def absent(self) -> list[int]:
        return [p for p in range(self.obj.npages) if p not in self.stored]


SubjectFactory = Callable[[], PagerSubject]


def _page_contents(seed: int, pindex: int, nbytes: int = PAGE) -> bytes:
    data = random.Random(seed * 1_000_003 + pindex).randbytes(nbytes)
    return data + bytes(PAGE - nbytes)


# -- subjects ------------------------------------------------------------------------


def swap_subject() -> PagerSubject:
    """The swap pager: an anonymous object, pages 0..8 paged out, 9 and 10 never written."""
    vm, _ = small_vm(nframes=16, swap_nblocks=64)
    obj = vm.allocate(NPAGES * PAGE)
    contents = {p: _page_contents(1, p) for p in range(NPAGES - 2)}
    for pindex, data in contents.items():
        obj.write(pindex * PAGE, data)
    vm.pageout()  # every page goes to swap and its frame is freed
    with vm.kernel.cond:
        stored = frozenset(p for p in range(NPAGES) if vm.swap_pager.has_page(obj, p))
        assert not obj.pages, "swap subject: pages still resident after a full pageout"
    assert stored == set(contents), f"swap subject: stored {sorted(stored)}"

    def released() -> bool:
        return obj.oid not in set(vm.swap_pager.meta.objects()) and vm.space.statistics().used == 0

    return PagerSubject(
        "swap", vm, vm.swap_pager, obj, contents, stored, True, True, released, vm.close
    )


def vnode_subject(directory: str | os.PathLike[str] | None = None) -> PagerSubject:
    """The vnode pager: a file of 10 pages and 100 bytes, mapped "r+"."""
    owned = directory is None
    where = (
        Path(tempfile.mkdtemp(prefix="vnode-subject-")) if directory is None else Path(directory)
    )
    path = where / f"subject-{random.randrange(1 << 30)}"
    contents = {p: _page_contents(2, p) for p in range(NPAGES - 1)}
    contents[NPAGES - 1] = _page_contents(2, NPAGES - 1, TAIL_BYTES)
    path.write_bytes(b"".join(contents.values())[: (NPAGES - 1) * PAGE + TAIL_BYTES])
    vm, _ = small_vm(nframes=16, swap_nblocks=16)
    obj = vm.map_file(str(path), "r+")

    def released() -> bool:
        return getattr(obj, "fd", None) == -1 and vm.vnode_pager.statistics().objects == 0

    def cleanup() -> None:
        vm.close()
        if owned:
            shutil.rmtree(where, ignore_errors=True)

    return PagerSubject(
        "vnode",
        vm,
        vm.vnode_pager,
        obj,
        contents,
        frozenset(range(NPAGES)),
        False,
        False,
        released,
        cleanup,
    )


def device_subject() -> PagerSubject:
    """The device pager: a bytearray of 10 pages and 100 bytes."""
    contents = {p: _page_contents(3, p) for p in range(NPAGES - 1)}
    contents[NPAGES - 1] = _page_contents(3, NPAGES - 1, TAIL_BYTES)
    memory = bytearray(b"".join(contents.values())[: (NPAGES - 1) * PAGE + TAIL_BYTES])
    vm, _ = small_vm(nframes=16, swap_nblocks=16)
    obj = vm.map_device(memory)

    def released() -> bool:
        try:
            memory.extend(b"")  # refused while the buffer is exported
            memory.append(0)
            memory.pop()
        except BufferError:
            return False
        return vm.device_pager.statistics().objects == 0

    return PagerSubject(
        "device",
        vm,
        vm.device_pager,
        obj,
        contents,
        frozenset(range(NPAGES)),
        False,
        False,
        released,
        vm.close,
    )


# -- helpers ---------------------------------------------------------------------------


@contextmanager
def _subject(make_subject: SubjectFactory) -> Iterator[PagerSubject]:
    subject = make_subject()
    try:
        yield subject
        subject.vm.check()
    finally:
        subject.cleanup()


def _busy_pages(subject: PagerSubject, first: int, npages: int) -> list[Page]:
    """Fresh busy pages with frames, as the fault path makes them (lock held)."""
    vm, obj = subject.vm, subject.obj
    pages = []
    for pindex in range(first, first + npages):
        assert pindex not in obj.pages, f"{subject.name}: page {pindex} already resident"
        frame = vm.frames.alloc()
        assert frame is not None, f"{subject.name}: no free frame"
        vm.frames.array[frame].fill(0xA5)  # garbage the pager must overwrite
        page = Page(obj, pindex, frame)
        obj.pages[pindex] = page
        pages.append(page)
    return pages


def _dirty_page(subject: PagerSubject, pindex: int, data: bytes) -> Page:
    """A resident page holding ``data``, modified as a write fault leaves it (lock held)."""
    vm, obj = subject.vm, subject.obj
    (page,) = _busy_pages(subject, pindex, 1)
    vm.frames.array[page.frame] = memoryview(data)
    subject.pager.unswapped(obj, pindex)
    page.busy = False
    page.dirty = True
    vm.queues.activate(page)
    return page


def _frame(subject: PagerSubject, page: Page) -> bytes:
    return bytes(subject.vm.frames.frame_view(page.frame))


def _finish(subject: PagerSubject, page: Page) -> None:
    """What the fault path does with the requested page after an OK."""
    page.busy = False
    subject.vm.queues.activate(page)
    subject.vm.kernel.cond.notify_all()


def _evict(subject: PagerSubject, pages: list[Page]) -> None:
    for page in pages:
        assert not page.dirty and not page.busy and not page.writing, page
        subject.vm.kernel.free_page(page)


def _read_back(subject: PagerSubject, pindex: int) -> bytes:
    """Read one page through get_pages alone and drop it again (lock held)."""
    (page,) = _busy_pages(subject, pindex, 1)
    result = get_pages(subject.pager, subject.obj, [page], 0)
    assert result is PagerResult.OK, f"{subject.name}: get_pages({pindex}) gave {result}"
    data = _frame(subject, page)
    _finish(subject, page)
    _evict(subject, [page])
    return data


def _new_contents(subject: PagerSubject, pindex: int, tag: int) -> bytes:
    """New contents for a page: zeros past the end of the object, as the VM keeps them."""
    valid = min(PAGE, subject.obj.size - pindex * PAGE)
    return _page_contents(100 + tag, pindex, valid)


# -- the checks --------------------------------------------------------------------------


def check_has_page(make_subject: SubjectFactory) -> None:
    """True exactly for the pages the store holds; False past the end of the object."""
    with _subject(make_subject) as s, s.vm.kernel.cond:
        for pindex in range(s.obj.npages):
            assert s.pager.has_page(s.obj, pindex) == (pindex in s.stored), (
                f"{s.name}: has_page({pindex})"
            )
        assert not s.pager.has_page(s.obj, s.obj.npages), f"{s.name}: has_page past the end"


def check_page_run(make_subject: SubjectFactory) -> None:
    """None for pages the store lacks; otherwise a run inside the caps, the object and the store."""
    with _subject(make_subject) as s, s.vm.kernel.cond:
        for before_max, after_max in ((0, 0), (2, 3), (8, 8)):
            for pindex in range(s.obj.npages):
                run = s.pager.page_run(s.obj, pindex, before_max, after_max)
                what = f"{s.name}: page_run({pindex}, {before_max}, {after_max}) = {run}"
                if pindex not in s.stored:
                    assert run is None, what
                    continue
                assert run is not None, what
                before, after = run
                assert 0 <= before <= before_max and 0 <= after <= after_max, what
                assert pindex - before >= 0 and pindex + after < s.obj.npages, what
                for other in range(pindex - before, pindex + after + 1):
                    assert s.pager.has_page(s.obj, other), f"{what}: {other} not stored"


def check_get_pages_single(make_subject: SubjectFactory) -> None:
    """Each stored page reads back alone; the requested page stays busy for the caller."""
    with _subject(make_subject) as s, s.vm.kernel.cond:
        for pindex in sorted(s.stored):
            (page,) = _busy_pages(s, pindex, 1)
            result = get_pages(s.pager, s.obj, [page], 0)
            assert result is PagerResult.OK, f"{s.name}: get_pages({pindex}) gave {result}"
            assert page.busy and not page.dirty, f"{s.name}: {page!r} after get_pages"
            assert _frame(s, page) == s.contents[pindex], f"{s.name}: contents of {pindex}"
            _finish(s, page)
            _evict(s, [page])


def check_get_pages_run(make_subject: SubjectFactory) -> None:
    """A run from ``page_run`` reads in one call; the other pages end unbusy and inactive."""
    with _subject(make_subject) as s, s.vm.kernel.cond:
        for pindex in sorted(s.stored):
            run = s.pager.page_run(s.obj, pindex, 3, 3)
            assert run is not None
            before, after = run
            pages = _busy_pages(s, pindex - before, before + 1 + after)
            result = get_pages(s.pager, s.obj, pages, before)
            assert result is PagerResult.OK, f"{s.name}: run at {pindex} gave {result}"
            for page in pages:
                assert _frame(s, page) == s.contents[page.pindex], (
                    f"{s.name}: contents of {page.pindex} in the run at {pindex}"
                )
                if page is not pages[before]:
                    assert not page.busy and page.queue == QUEUE_INACTIVE, (
                        f"{s.name}: read-around {page!r} not unbusied onto the inactive queue"
                    )
            assert pages[before].busy
            _finish(s, pages[before])
            _evict(s, pages)


def check_get_pages_absent(make_subject: SubjectFactory) -> None:
    """A page the store lacks gives FAIL and stays busy for the caller to free."""
    with _subject(make_subject) as s, s.vm.kernel.cond:
        for pindex in s.absent:
            (page,) = _busy_pages(s, pindex, 1)
            result = get_pages(s.pager, s.obj, [page], 0)
            assert result is PagerResult.FAIL, f"{s.name}: get_pages({pindex}) gave {result}"
            s.vm.kernel.free_page(page)


def check_put_then_get(make_subject: SubjectFactory) -> None:
    """A page written with put_pages is clean, on the store, and reads back."""
    with _subject(make_subject) as s, s.vm.kernel.cond:
        for pindex in (0, s.obj.npages // 2, s.obj.npages - 1):
            data = _new_contents(s, pindex, 1)
            page = _dirty_page(s, pindex, data)
            page.writing = True
            results = put_pages(s.pager, s.obj, [page], sync=True)
            assert results == [PagerResult.OK], f"{s.name}: put_pages({pindex}) gave {results}"
            assert not page.dirty and not page.writing, f"{s.name}: {page!r} after put"
            _evict(s, [page])
            assert s.pager.has_page(s.obj, pindex), f"{s.name}: page {pindex} lost"
            assert _read_back(s, pindex) == data, f"{s.name}: page {pindex} read back"


def check_put_cluster(make_subject: SubjectFactory) -> None:
    """``pager_put`` clusters dirty neighbours inside ``cluster_bounds`` and writes them."""
    with _subject(make_subject) as s, s.vm.kernel.cond:
        lo, hi = s.pager.cluster_bounds(s.obj, 1)
        data = {p: _new_contents(s, p, 2) for p in range(lo, hi)}
        pages = [_dirty_page(s, p, d) for p, d in data.items()]
        max_npages = s.vm.config.cluster_max_npages
        outcome = pager_put(
            s.pager, s.obj, pages[len(pages) // 2], sync=True, max_npages=max_npages
        )
        assert outcome.result is PagerResult.OK, f"{s.name}: pager_put gave {outcome.result}"
        assert outcome.cluster_npages == hi - lo, (
            f"{s.name}: cluster of {outcome.cluster_npages} pages, window [{lo}, {hi})"
        )
        for page in pages:
            assert not page.dirty and not page.writing, f"{s.name}: {page!r} after the cluster"
        _evict(s, pages)
        for pindex, expected in data.items():
            assert _read_back(s, pindex) == expected, f"{s.name}: clustered page {pindex}"


def check_cluster_bounds(make_subject: SubjectFactory) -> None:
    """The window holds the page, lies inside the object, and spans one maximal transfer."""
    with _subject(make_subject) as s, s.vm.kernel.cond:
        max_npages = s.vm.config.cluster_max_npages
        for pindex in range(s.obj.npages):
            lo, hi = s.pager.cluster_bounds(s.obj, pindex)
            what = f"{s.name}: cluster_bounds({pindex}) = [{lo}, {hi})"
            assert 0 <= lo <= pindex < hi <= s.obj.npages, what
            assert hi - lo <= max_npages, what


def check_unswapped(make_subject: SubjectFactory) -> None:
    """After ``unswapped`` the store forgets the page, or keeps a stale copy (see docstring)."""
    with _subject(make_subject) as s, s.vm.kernel.cond:
        for pindex in sorted(s.stored)[:3]:
            s.pager.unswapped(s.obj, pindex)
            expected = not s.unswapped_forgets
            assert s.pager.has_page(s.obj, pindex) == expected, f"{s.name}: unswapped({pindex})"
        s.pager.unswapped(s.obj, s.obj.npages - 1)  # harmless on any page


def check_free_space(make_subject: SubjectFactory) -> None:
    """``free_space`` forgets a range (swap) or leaves the store alone (files, memory)."""
    with _subject(make_subject) as s, s.vm.kernel.cond:
        s.pager.free_space(s.obj, 2, 3)
        for pindex in range(s.obj.npages):
            forgotten = s.free_space_forgets and 2 <= pindex < 5
            expected = pindex in s.stored and not forgotten
            assert s.pager.has_page(s.obj, pindex) == expected, f"{s.name}: free_space, {pindex}"
        for pindex in sorted(s.stored):
            if not (s.free_space_forgets and 2 <= pindex < 5):
                assert _read_back(s, pindex) == s.contents[pindex], f"{s.name}: {pindex}"


def check_dealloc(make_subject: SubjectFactory) -> None:
    """Closing the object deallocates: the store gives back what it held."""
    with _subject(make_subject) as s:
        with s.vm.kernel.cond:
            page = _dirty_page(s, 0, _new_contents(s, 0, 3))
            assert not page.busy
        s.obj.close()
        assert s.obj.closed
        with s.vm.kernel.cond:
            assert s.released(), f"{s.name}: dealloc did not release the store"
            assert s.obj.oid not in {o.oid for o in s.vm.kernel.objects.values()}


CONFORMANCE_CHECKS: list[Callable[[SubjectFactory], None]] = [
    check_has_page,
    check_page_run,
    check_get_pages_single,
    check_get_pages_run,
    check_get_pages_absent,
    check_put_then_get,
    check_put_cluster,
    check_cluster_bounds,
    check_unswapped,
    check_free_space,
    check_dealloc,
]


def check_pager(make_subject: SubjectFactory) -> None:
    """Run every conformance check against the pager ``make_subject`` builds."""
    for check in CONFORMANCE_CHECKS:
        check(make_subject)
