"""The vnode pager: regular files as VM objects (uvm_vnodeops, FreeBSD vnode_pager.c).

This module holds the pager operations (page-in, read-ahead, write-back,
resize, the cache of file objects) and ``map_file``; the objects themselves
are in ``pager/file_object.py`` and the vectored transfers in ``io/vectored.py``.

``map_file(vm, path)`` returns a ``VnodeObject``: the pages of the file,
cached in the VM's frames and paged by the page daemon like any other
object, except that their backing store is the file itself:

- a fault reads the page from the file with ``os.preadv``; when the faults
  of an object run sequentially (each at the page after the last one read),
  the same transfer reads ahead, and each sequential fault doubles the
  window (vm_fault's read-ahead), from the VM's read-around window up to
  ``readahead_max_npages``; a random fault reads one page. In a VM with a
  page daemon thread, a sequential fault also puts the next two windows in
  flight asynchronously (on the VM's fan-out helpers: ``Fanout.submit``);
  the reader reaching a window issues the next one, so transfers overlap
  with the reader's work;
- the partial last page reads as zeros past end of file, and its tail is
  never written: every transfer is clipped to the object's size;
- dirty pages go back to the file in clusters through ``pager_put`` (the
  page daemon, and ``flush()``, which is msync); clean pages are simply
  dropped, so file pages never take swap;
- the object's size is the file's size. A write past the end extends the
  file first (``ftruncate``, the gap reads as zeros); ``truncate(size)``
  shrinks or extends it;
- two maps of one file (same ``st_dev``/``st_ino``) share one object, whose
  ``refcount`` counts its maps and the private maps over it; ``close()``
  flushes and drops one map;
- ``private=True``: a copy-on-write mapping, an anonymous shadow object over
  the shared file object. Reads come from the file object's pages; the
  first write to a page copies it into the shadow; modified pages go to swap,
  never to the file.

The OS page cache: the file descriptor is advised ``POSIX_FADV_RANDOM`` (no
kernel read-ahead: the fault path reads ahead itself) and every range read
or written is advised ``POSIX_FADV_DONTNEED`` right after the transfer, so
file data lives in the VM's frames and not a second time in the kernel's
cache. Pages still under kernel write-back when advised stay cached until the
file system is done with them.

Coherence with other writers of the file is not provided (there is no
shared page cache to keep coherent). One case is detected: a file shrunk by
someone else. A page-in that finds the file shorter than the object raises
``FileShrunkError`` naming the file; a write-back checks the file's size
first and fails the same way instead of extending the file again, leaving
the pages dirty (``truncate()`` to the new size forgets them).

Every pager method runs with the VM lock held; file transfers run with it
released while the pages involved are busy (page-in) or writing (pageout).
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from vmpager.errors import TRANSIENT_ERRNOS, DeviceError, InvariantViolation
from vmpager.io.request import IOKind
from vmpager.io.vectored import drop_cache, preadv_all, pwritev_all
from vmpager.pager.file_object import PrivateFileObject, VnodeObject, unlocked
from vmpager.vm import readahead
from vmpager.vm.object import VMObject
from vmpager.vm.page import Page
from vmpager.vm.pagerops import PagerResult
from vmpager.vm.put import pager_put

if TYPE_CHECKING:
    from vmpager.vm.kernel import Kernel

__all__ = [
    "FileShrunkError",
    "PrivateFileObject",
    "VnodeObject",
    "VnodePager",
    "VnodePagerStatistics",
    "map_file",
]

log = logging.getLogger("vmpager.vnode")

#: Asynchronous read-ahead windows kept in flight ahead of a sequential reader.
ASYNC_READAHEAD_WINDOWS = 2


class FileShrunkError(DeviceError):
    """The file is shorter than its object: someone else truncated it.

    Raised by an access whose page-in finds the page's bytes gone, and by a
    write-back that would extend the file again. ``device`` is the path,
    ``block`` the page index, ``file_size`` what the file holds now.
    """

    def __init__(self, path: str, pindex: int, file_size: int, object_size: int) -> None:
        self.file_size = file_size
        self.object_size = object_size
        super().__init__(
            errno.ENXIO,
            path,
            pindex,
            f"page {pindex} lies past the end of the file, which was shrunk to "
            f"{file_size} bytes by someone else; the object holds {object_size} bytes",
        )

    def __reduce__(self) -> tuple[type[DeviceError], tuple[int, str, int]]:
        # Pickles as a plain DeviceError: the constructor differs.
        return (DeviceError, (self.errno or errno.ENXIO, self.device, self.block))


@dataclass(frozen=True, slots=True)
class VnodePagerStatistics:
    """Counters of the vnode pager since the VM started (``VnodePager.statistics()``)."""

    objects: int
    maps: int
    pageins: int
    pagein_pages: int
    pagein_bytes: int
    #: Asynchronous read-ahead transfers (included in pageins) and their pages.
    async_pageins: int
    async_pagein_pages: int
    pageouts: int
    pageout_pages: int
    pageout_bytes: int
    flushes: int
    read_errors: int
    write_errors: int
    shrink_errors: int


@dataclass(slots=True)
class _VnodeCounts:
    """The vnode pager's running counters (``VnodePagerStatistics`` without the
    gauges), updated under the VM lock."""

    pageins: int = 0
    pagein_pages: int = 0
    pagein_bytes: int = 0
    async_pageins: int = 0
    async_pagein_pages: int = 0
    pageouts: int = 0
    pageout_pages: int = 0
    pageout_bytes: int = 0
    flushes: int = 0
    read_errors: int = 0
    write_errors: int = 0
    shrink_errors: int = 0


def _advise_dropped(fd: int, offset: int, nbytes: int) -> None:
    """Drop a range we now hold in frames from the kernel's cache (advice only)."""
    try:
        drop_cache(fd, offset, nbytes)
    except OSError:  # some file systems refuse the advice
        pass


def _new_page(obj: VnodeObject, pindex: int, frame: int) -> Page:
    """A busy read-ahead page of ``obj`` in ``frame`` (lock held)."""
    page = Page(obj, pindex, frame)
    page.prefetched = True
    obj.pages[pindex] = page
    return page


@dataclass(slots=True, eq=False)
class _AsyncRead:
    """One read-ahead transfer: busy pages, their frame views, the file range."""

    obj: VnodeObject
    pages: list[Page]
    views: list[memoryview]
    offset: int
    expected: int
    fd: int
    token: int


class VnodePager:
    """The pager of kind "vnode": one per VM, with the cache of file objects.

    Every method runs with the VM lock held.
    """

    kind = "vnode"

    def __init__(self, vm: Kernel) -> None:
        self._kernel = vm
        self._cache: dict[tuple[int, int], VnodeObject] = {}
        #: Ceiling of the sequential read-ahead window, in pages.
        self.readahead_max_npages = readahead.file_readahead_max_npages(
            vm.config.readahead_max_npages
        )
        #: Read-ahead windows kept in flight asynchronously; 0 turns it off.
        #: Off in VMs without a daemon thread, which stay deterministic.
        self.async_readahead_windows = ASYNC_READAHEAD_WINDOWS if vm.config.daemon_thread else 0
        self._counts = _VnodeCounts()

    # -- maps ------------------------------------------------------------------------

    def open(self, path: str, *, writable: bool) -> VnodeObject:
        """The shared object of the file at ``path``, with one more map counted.

        Opens the file outside the lock; a second map of the same file (same
        device and inode) shares the first one's object and, if it needs to
        write and the first did not, upgrades its descriptor to read-write.
        """
        vm = self._kernel
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
        fd = os.open(path, flags)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ValueError(f"path must name a regular file, got {path!r}")
            key = (st.st_dev, st.st_ino)
            with vm.cond:
                vm.check_open()
                obj = self._cache.get(key)
                if obj is not None and not obj.closed:
                    obj.refcount += 1
                    if writable and not obj.writable:
                        obj._retired_fds.append(obj.fd)
                        obj.fd = fd
                        obj.writable = True
                        fd = -1
                    return obj
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
                except OSError:
                    pass
                obj = VnodeObject(vm, self, path, fd, key, st.st_size, writable)
                vm.register_object(obj)
                self._cache[key] = obj
                fd = -1
                return obj
        finally:
            if fd >= 0:
                os.close(fd)

    # -- size ------------------------------------------------------------------------

    def resize(self, obj: VnodeObject, size_bytes: int) -> None:
        """Set the size of ``obj`` and its file (truncate, or a write past the end).

        Shrinking waits until no page past the new end is busy or being
        written, cuts the file, forgets those pages and zeroes the tail of
        the new last page. Growing extends the file with zeros unless it is
        already longer. Raises ``DeviceError`` naming the file when
        ``ftruncate`` fails (nothing changed then).
        """
        vm = self._kernel
        ps = vm.page_size
        new_npages = -(-size_bytes // ps)
        if size_bytes < obj.size_bytes:
            first = size_bytes // ps  # the first page whose contents change
            while True:
                waiting = next(
                    (p for i, p in obj.pages.items() if i >= first and (p.busy or p.writing)),
                    None,
                )
                if waiting is None:
                    break
                vm.wait_page(waiting)
            self._ftruncate(obj, size_bytes)
            for cut in [p for i, p in obj.pages.items() if i >= new_npages]:
                vm.free_page(cut)
            tail = size_bytes % ps
            last = obj.pages.get(first) if tail else None
            if last is not None:
                vm.frames.array[last.frame, tail:] = 0
        elif size_bytes > obj.size_bytes:
            try:
                file_size = os.fstat(obj.fd).st_size
            except OSError as exc:
                raise DeviceError(exc.errno or errno.EIO, obj.path, 0, "fstat") from exc
            if file_size < size_bytes:
                self._ftruncate(obj, size_bytes)
            self._forget_shadow_holes(obj, obj.npages, new_npages)
        obj.size_bytes = size_bytes
        obj.npages = new_npages

    def _forget_shadow_holes(self, obj: VnodeObject, start: int, end: int) -> None:
        """The file grows over pages ``[start, end)``: private maps see it.

        A private map read past the end of a file that had shrunk got a clean
        zero-filled page of its own (the file had nothing there). Now that the
        file has data there, such a page would hide it: clean, idle pages of
        private maps (shadows of ``obj``) in the range are freed, so their next
        read comes from their swap copy if they have one, else from the file.
        A clean page is one the page daemon may free at any time, so nothing is
        lost. Cost: O(objects + resident pages of the shadows). Lock held.
        """
        vm = self._kernel
        for shadow in list(vm.objects.values()):
            if shadow.backing is not obj:
                continue
            lo, hi = start - shadow.backing_offset, end - shadow.backing_offset
            for page in [p for i, p in shadow.pages.items() if lo <= i < hi]:
                if not (page.dirty or page.busy or page.writing):
                    vm.free_page(page)

    def _ftruncate(self, obj: VnodeObject, size_bytes: int) -> None:
        try:
            os.ftruncate(obj.fd, size_bytes)
        except OSError as exc:
            raise DeviceError(
                exc.errno or errno.EIO, obj.path, size_bytes // self._kernel.page_size, "ftruncate"
            ) from exc

    # -- msync -------------------------------------------------------------------------

    def flush(self, obj: VnodeObject) -> DeviceError | None:
        """Write back every page of ``obj`` dirty now, in clusters; returns the first error.

        Waits for pages being filled or written by others. A page whose
        write fails hard stays dirty, is not tried again by this flush, and
        the first such error is returned; a transient failure is retried
        once by ``pager_put``. Pages dirtied during the flush are written when
        it reaches them.
        Cost: O(resident pages) plus the writes.
        """
        vm = self._kernel
        self._counts.flushes += 1
        todo = sorted(i for i, p in obj.pages.items() if p.dirty)
        error: DeviceError | None = None
        max_npages = vm.config.cluster_max_npages
        failed: set[int] = set()
        obj._flush_failed = failed
        try:
            k = 0
            while k < len(todo):
                page = obj.pages.get(todo[k])
                if page is None or not page.dirty or page.pindex in failed:
                    k += 1
                    continue
                if page.busy or page.writing:
                    vm.wait_page(page)
                    continue
                obj._write_error = None
                outcome = pager_put(self, obj, page, sync=True, max_npages=max_npages)
                if outcome.result is not PagerResult.OK and error is None:
                    error = obj._write_error or DeviceError(
                        errno.EIO, obj.path, page.pindex, f"write-back: {outcome.result.value}"
                    )
                k += 1
        finally:
            obj._flush_failed = None
        return error

    # -- the pager interface ------------------------------------------------------------

    @staticmethod
    def _sequential(obj: VnodeObject, pindex: int) -> bool:
        return pindex == obj.next_read_pindex or pindex == 0

    def readaround_npages(self, obj: VMObject, pindex: int, default_npages: int) -> int:
        """The fault path's read-around window for a fault at ``pindex`` of ``obj``.

        Ramps up as vm_fault's read-ahead does: each sequential fault doubles
        the window, from the VM's read-around window up to
        ``readahead_max_npages``; a random fault starts over (and reads one
        page, see ``page_run``). O(1).
        """
        vobj = cast(VnodeObject, obj)
        vobj.readahead_npages = readahead.next_window(
            vobj.readahead_npages,
            sequential=self._sequential(vobj, pindex),
            first=default_npages,
            maximum=self.readahead_max_npages,
        )
        return max(vobj.readahead_npages, default_npages)

    def has_page(self, obj: VMObject, pindex: int) -> bool:
        """Every page inside the file is on the store (holes read as zeros)."""
        return 0 <= pindex < obj.npages

    def has_pages(self, obj: VMObject, start: int, npages: int) -> list[bool]:
        """``has_page`` for ``npages`` pages from ``start``. O(npages), no I/O."""
        return [self.has_page(obj, start + i) for i in range(npages)]

    def page_run(
        self, obj: VMObject, pindex: int, before_max: int, after_max: int
    ) -> tuple[int, int] | None:
        """Read-ahead for sequential faults, one page for random ones.

        Sequential means the fault is at the page after the last one read
        (or at page 0). Never reads behind: a file read backwards is rare.
        """
        if not 0 <= pindex < obj.npages:
            return None
        if not self._sequential(cast(VnodeObject, obj), pindex):
            return 0, 0
        return 0, max(0, min(after_max, obj.npages - 1 - pindex))

    def batches_pageout(self, obj: VMObject) -> bool:
        return False  # a file's pages go back to the file, cluster by cluster

    def cluster_bounds(self, obj: VMObject, pindex: int) -> tuple[int, int]:
        # uvn_cluster: the aligned window of one maximal transfer around pindex.
        n = self._kernel.config.cluster_max_npages
        lo = pindex - pindex % n
        return lo, min(lo + n, obj.npages)

    def get_pages(self, obj: VMObject, pages: Sequence[Page], reqpage: int) -> PagerResult:
        """Read ``pages`` from the file in one vectored read; zero the tail past EOF.

        A short read means the file shrank under us: if the requested page
        is whole, the read-around pages past the new end are dropped and the
        result is OK; otherwise ``FileShrunkError`` is noted and the result is
        ERROR.
        """
        vm = self._kernel
        vobj = cast(VnodeObject, obj)
        ps = vm.page_size
        first = pages[0].pindex
        offset = first * ps
        size = vobj.size_bytes
        if first + len(pages) > vobj.npages:
            return PagerResult.FAIL
        frames = vm.frames
        fview = frames.view
        views = [fview[p.frame * ps : p.frame * ps + ps] for p in pages]
        tail = size - (first + len(pages) - 1) * ps
        expected = len(pages) * ps
        if tail < ps:
            views[-1] = views[-1][:tail]
            expected -= ps - tail
        fd = vobj.fd
        error: DeviceError | None = None
        got = 0
        file_size = -1
        vm.inflight.acquire(IOKind.READ)
        token = vm.pagermap.map_in(len(pages), daemon=vm.in_daemon())
        lock = vm.lock
        lock.release()  # the pages are busy: nobody else touches them
        try:
            try:
                got = preadv_all(fd, views, offset, expected)
                if got < expected:
                    file_size = os.fstat(fd).st_size
            except OSError as exc:
                error = DeviceError(exc.errno or errno.EIO, vobj.path, first + got // ps)
            _advise_dropped(fd, offset, got)
        finally:
            lock.acquire()
            vm.pagermap.map_out(token)
            vm.inflight.release(IOKind.READ)
        self._counts.pageins += 1
        self._counts.pagein_pages += len(pages)
        self._counts.pagein_bytes += got
        vm.counters.pageins += 1
        vm.counters.pagein_pages += len(pages)
        # Whole pages read; the page holding the short read's end is incomplete.
        nvalid = len(pages) if got >= expected else got // ps
        if error is None and reqpage >= nvalid:
            error = FileShrunkError(vobj.path, first + nvalid, max(file_size, 0), size)
            self._counts.shrink_errors += 1
        if error is not None:
            log.error("vnode_pager: pagein failed: %s", error)
            self._counts.read_errors += 1
            vm.counters.read_errors += 1
            for i, page in enumerate(pages):
                if i != reqpage:
                    page.busy = False
                    vm.free_page(page)
            vm.note_read_error(error)
            vm.cond.notify_all()
            return PagerResult.ERROR
        if tail < ps:
            frames.array[pages[-1].frame, tail:] = 0
        for i, page in enumerate(pages):
            if i == reqpage:
                continue  # stays busy for the caller
            page.busy = False
            if i < nvalid:
                page.dirty = False
                vm.queues.deactivate(page)
            else:
                vm.free_page(page)  # past the end of the shrunk file
        sequential = self._sequential(vobj, first + reqpage)
        vobj.next_read_pindex = first + nvalid
        if sequential and self.async_readahead_windows and nvalid == len(pages):
            self._start_pipeline(vobj, first + nvalid)
        if len(pages) > 1:
            vm.cond.notify_all()  # read-around pages are no longer busy
        return PagerResult.OK

    # -- asynchronous read-ahead ------------------------------------------------------

    def _start_pipeline(self, obj: VnodeObject, pindex: int) -> None:
        """A sequential fault read up to ``pindex``: put the next windows in flight."""
        obj.ra_starts.clear()
        obj.ra_next_pindex = pindex
        for _ in range(self.async_readahead_windows):
            if not self._issue_window(obj):
                break
        obj.ra_trigger_pindex = obj.ra_starts[0] if obj.ra_starts else -1

    def readahead_reached(self, obj: VnodeObject) -> None:
        """The reader touched the first page of the oldest window: issue one more.

        The window grows by doubling up to ``readahead_max_npages``. O(window).
        """
        if obj.ra_starts:
            obj.ra_starts.popleft()
        if self.async_readahead_windows:
            self._issue_window(obj)
        obj.ra_trigger_pindex = obj.ra_starts[0] if obj.ra_starts else -1

    def _issue_window(self, obj: VnodeObject) -> bool:
        """Start an asynchronous read of the window at ``obj.ra_next_pindex``.

        Takes frames only above the daemon's minimum, stops at the first
        resident page or the end of the object, and needs a read slot and a
        pager map without waiting; returns False when it started nothing.
        The pages are busy until the read completes (faults on them wait).
        """
        vm = self._kernel
        start = obj.ra_next_pindex
        window = min(
            readahead.next_window(
                obj.readahead_npages,
                sequential=True,
                first=vm.config.readaround_npages,
                maximum=self.readahead_max_npages,
            ),
            obj.npages - start,
        )
        if window <= 0 or start in obj.pages or not vm.inflight.try_acquire(IOKind.READ):
            return False
        token = vm.pagermap.try_map_in(window, daemon=False, wait=False)
        if token is None:
            vm.inflight.release(IOKind.READ)
            return False
        pages: list[Page] = []
        for pindex in range(start, start + window):
            if pindex in obj.pages:
                break
            frame = vm.alloc_frame_for_readaround()
            if frame is None:
                break
            page = _new_page(obj, pindex, frame)
            pages.append(page)
        if not pages:
            vm.pagermap.map_out(token)
            vm.inflight.release(IOKind.READ)
            return False
        obj.readahead_npages = window
        obj.ra_starts.append(start)
        obj.ra_next_pindex = start + len(pages)
        obj.next_read_pindex = obj.ra_next_pindex
        obj.async_reads += 1
        ps = vm.page_size
        fview = vm.frames.view
        views = [fview[p.frame * ps : p.frame * ps + ps] for p in pages]
        expected = len(pages) * ps
        tail = obj.size_bytes - (start + len(pages) - 1) * ps
        if tail < ps:
            views[-1] = views[-1][:tail]
            expected -= ps - tail
        # The transfer runs on a fan-out helper (the VM's I/O threads for
        # reads nobody waits for); its read slot bounds how many are queued.
        job = _AsyncRead(obj, pages, views, start * ps, expected, obj.fd, token)
        try:
            vm.fanout.submit(self._read_window, job)
        except RuntimeError:  # the VM is closing: drop the window, the pages stay readable
            self._async_done(job, -1)
            return False
        return True

    def _read_window(self, job: _AsyncRead) -> None:
        """One read-ahead transfer, on a fan-out helper: read without the lock,
        complete with it. Never raises (nobody waits for it) and never leaves
        the pages busy."""
        got = -1
        try:
            got = preadv_all(job.fd, job.views, job.offset, job.expected)
            _advise_dropped(job.fd, job.offset, got)
        except OSError as exc:
            log.info("vnode_pager: read-ahead of %s failed: %s", job.obj.path, exc)
        except BaseException:
            log.exception("vnode_pager: read-ahead of %s", job.obj.path)
        with self._kernel.cond:
            self._async_done(job, got)

    def _async_done(self, job: _AsyncRead, got: int) -> None:
        """Completion of a read-ahead (lock held): whole pages become clean and
        inactive; pages the read did not fill are dropped (a fault reads them
        again, and reports any error)."""
        vm = self._kernel
        obj = job.obj
        ps = vm.page_size
        vm.pagermap.map_out(job.token)
        vm.inflight.release(IOKind.READ)
        # Whole pages read; a short read (the file shrank) or an error leaves
        # the rest for the fault path, which reads them again and reports.
        nvalid = len(job.pages) if got >= job.expected else max(got, 0) // ps
        valid_tail = job.expected - (len(job.pages) - 1) * ps
        if nvalid == len(job.pages) and valid_tail < ps:
            vm.frames.array[job.pages[-1].frame, valid_tail:] = 0
        for i, page in enumerate(job.pages):
            page.busy = False
            if i < nvalid:
                vm.queues.deactivate(page)
            else:
                vm.free_page(page)
        obj.async_reads -= 1
        self._counts.pageins += 1
        self._counts.pagein_pages += nvalid
        self._counts.pagein_bytes += max(got, 0)
        self._counts.async_pageins += 1
        self._counts.async_pagein_pages += nvalid
        vm.counters.pageins += 1
        vm.counters.pagein_pages += nvalid
        vm.counters.readaround_pages += nvalid
        vm.cond.notify_all()

    def wait_async(self, obj: VnodeObject) -> None:
        """Wait until no read-ahead of ``obj`` is in flight (lock held; it is
        released while waiting)."""
        while obj.async_reads:
            self._kernel.cond.wait()

    def put_pages(self, obj: VMObject, pages: Sequence[Page], *, sync: bool) -> list[PagerResult]:
        """Write ``pages`` to the file in one vectored write, clipped at end of file.

        Always synchronous (the lock is released during the write): the
        I/O engine serves the swap space only. Checks the file's size first,
        so that a file shrunk by someone else is not extended again.
        """
        vm = self._kernel
        vobj = cast(VnodeObject, obj)
        ps = vm.page_size
        first = pages[0].pindex
        offset = first * ps
        size = vobj.size_bytes
        views = [vm.frames.frame_view(p.frame) for p in pages]
        tail = size - (first + len(pages) - 1) * ps
        if tail < ps:
            views[-1] = views[-1][:tail]
        nbytes = sum(v.nbytes for v in views)
        fd = vobj.fd
        error: DeviceError | None = None
        vm.inflight.acquire(IOKind.WRITE_SYNC)
        token = vm.pagermap.map_in(len(pages), daemon=vm.in_daemon())
        try:
            with unlocked(vm):
                try:
                    file_size = os.fstat(fd).st_size
                    if file_size < offset + nbytes:
                        error = FileShrunkError(
                            vobj.path, max(first, file_size // ps), file_size, size
                        )
                    else:
                        pwritev_all(fd, views, offset)
                        _advise_dropped(fd, offset, nbytes)
                except OSError as exc:
                    error = DeviceError(exc.errno or errno.EIO, vobj.path, first, "write-back")
        finally:
            vm.pagermap.map_out(token)
            vm.inflight.release(IOKind.WRITE_SYNC)
        self._counts.pageouts += 1
        self._counts.pageout_pages += len(pages)
        vm.counters.pageouts += 1
        vm.counters.pageout_pages += len(pages)
        vm.counters.note_cluster(len(pages))
        if error is None:
            self._counts.pageout_bytes += nbytes
            for page in pages:
                page.writing = False
                page.dirty = False
                page.wanted = False
            vm.cond.notify_all()
            return [PagerResult.OK] * len(pages)
        self._counts.write_errors += 1
        if isinstance(error, FileShrunkError):
            self._counts.shrink_errors += 1
        vm.counters.write_errors += 1
        log.warning("vnode_pager: write-back failed, pages stay dirty: %s", error)
        vobj._write_error = error
        transient = error.errno in TRANSIENT_ERRNOS
        if vobj._flush_failed is not None and not transient:
            # A hard error: this flush does not try these pages again.
            vobj._flush_failed.update(p.pindex for p in pages)
        for page in pages:
            page.writing = False
            page.wanted = False
            vm.queues.activate(page)
        vm.cond.notify_all()
        return [PagerResult.AGAIN if transient else PagerResult.ERROR] * len(pages)

    def unswapped(self, obj: VMObject, pindex: int) -> None:
        """Nothing to free: the file keeps its (now stale) copy until write-back."""

    def free_space(self, obj: VMObject, start: int, npages: int) -> None:
        """Nothing to free: a file's pages are its contents (``discard`` writes zeros)."""

    def dealloc(self, obj: VMObject) -> None:
        """Close the file's descriptors and forget the object."""
        vobj = cast(VnodeObject, obj)
        if self._cache.get(vobj.key) is vobj:
            del self._cache[vobj.key]
        for fd in [vobj.fd, *vobj._retired_fds]:
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError as exc:
                    log.warning("closing %s: %s", vobj.path, exc)
        vobj.fd = -1
        vobj._retired_fds.clear()

    # -- statistics and invariants -----------------------------------------------------

    def statistics(self) -> VnodePagerStatistics:
        """Counters and the number of cached file objects (caller holds the VM lock)."""
        return VnodePagerStatistics(
            objects=len(self._cache),
            maps=sum(o.refcount for o in self._cache.values()),
            **dataclasses.asdict(self._counts),
        )

    def check(self) -> None:
        """Check the cache and every file object (caller holds the VM lock); raise
        ``InvariantViolation`` listing every inconsistency.

        Raises ``AssertionError`` listing each problem: a cached object that
        is closed, unregistered or under the wrong key; a page count that
        does not match the byte size; a page past the end; a nonzero byte
        past end of file in a resident last page.
        """
        vm = self._kernel
        ps = vm.page_size
        problems: list[str] = []
        registered = {o.oid: o for o in vm.objects.values()}
        for key, obj in self._cache.items():
            where = f"vnode object {obj.oid} ({obj.path})"
            if obj.key != key:
                problems.append(f"{where}: cached under {key}, its key is {obj.key}")
            if obj.closed:
                continue  # being destroyed: dealloc takes it out of the cache
            if registered.get(obj.oid) is not obj:
                problems.append(f"{where}: cached but not registered with the VM")
            if obj.refcount < max(1, len(obj.shadows)):
                problems.append(f"{where}: refcount {obj.refcount} with {len(obj.shadows)} shadows")
            if obj.fd < 0:
                problems.append(f"{where}: cached without a file descriptor")
        for vobj in registered.values():
            if not isinstance(vobj, VnodeObject):
                continue
            where = f"vnode object {vobj.oid} ({vobj.path})"
            if vobj.npages != -(-vobj.size_bytes // ps):
                problems.append(f"{where}: {vobj.npages} pages for {vobj.size_bytes} bytes")
            tail = vobj.size_bytes % ps
            last = vobj.pages.get(vobj.npages - 1) if tail else None
            if last is not None and not last.busy and vm.frames.array[last.frame, tail:].any():
                problems.append(f"{where}: nonzero bytes past end of file in its last page")
            if not vobj.closed and self._cache.get(vobj.key) is not vobj:
                problems.append(f"{where}: open with {vobj.refcount} refs but not cached")
        if problems:
            raise InvariantViolation(problems)


def map_file(
    vm: Kernel, path: str | os.PathLike[str], mode: str = "r", *, private: bool = False
) -> VnodeObject | PrivateFileObject:
    """Map the file at ``path``: see ``VM.map_file``.

    ``mode`` "r" (writes raise ``PermissionError``) or "r+". A shared map
    returns the file's ``VnodeObject`` (the same object for every map of the
    file); ``private=True`` returns a new ``PrivateFileObject`` over it.
    """
    if mode not in ("r", "r+"):
        raise ValueError(f"mode must be 'r' or 'r+', got {mode!r}")
    if not isinstance(private, bool):
        raise TypeError(f"private must be a bool, got {private!r}")
    try:
        name = os.fspath(path)
    except TypeError:
        raise TypeError(f"path must be a str or os.PathLike, got {path!r}") from None
    if not isinstance(name, str):
        raise TypeError(f"path must be a str or os.PathLike[str], got {path!r}")
    pager = cast(VnodePager, vm.vnode_pager)  # this module's own pager
    writable = mode == "r+"
    vnode = pager.open(name, writable=writable and not private)
    if not private:
        return vnode
    with vm.cond:
        # The map counted by open() belongs to the shadow from now on.
        shadow = PrivateFileObject(vm, vnode, writable)
        vm.register_object(shadow)
        vnode.shadows.append(shadow)
        return shadow
