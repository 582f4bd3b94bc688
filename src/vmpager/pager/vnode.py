"""The vnode pager: regular files as VM objects (uvm_vnodeops, FreeBSD vnode_pager.c).

``map_file(vm, path)`` returns a ``VnodeObject``: the pages of the file,
cached in the VM's frames and paged by the page daemon like any other
object, except that their backing store is the file itself:

- a fault reads the page from the file with ``os.preadv``; when the faults
  of an object run sequentially (each at the page after the last one read),
  the same transfer reads ahead, and each sequential fault doubles the
  window (vm_fault's read-ahead), from the VM's read-around window up to
  ``readahead_max_npages``; a random fault reads one page. In a VM with a
  page daemon thread, a sequential fault also puts the next two windows in
  flight asynchronously (worker threads); the reader reaching a window
  issues the next one, so transfers overlap with the reader's work;
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

import errno
import logging
import os
import queue
import stat
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from vmpager.errors import TRANSIENT_ERRNOS, DeviceError, ObjectClosed
from vmpager.io.request import IOKind
from vmpager.units import check_int
from vmpager.vm import readahead
from vmpager.vm.object import VMObject
from vmpager.vm.page import Page
from vmpager.vm.pagerops import PagerResult
from vmpager.vm.put import pager_put

if TYPE_CHECKING:
    from vmpager.devices.protocol import ReadableBuffer, WritableBuffer
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

#: Largest file size an object may grow to (the largest off_t).
MAX_FILE_BYTES = (1 << 63) - 1
#: Buffers one preadv/pwritev call may take.
_IOV_MAX = max(16, os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 1024)
#: Asynchronous read-ahead windows kept in flight ahead of a sequential reader.
ASYNC_READAHEAD_WINDOWS = 2
#: Seconds an idle read-ahead worker thread waits for work before it exits.
_WORKER_IDLE_SECONDS = 2.0
#: Chunk size of the zero writes that implement ``discard``.
_DISCARD_CHUNK_BYTES = 1 << 20


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


@contextmanager
def _unlocked(vm: Kernel) -> Iterator[None]:
    """Release the VM lock for a transfer; the pages involved must be busy or writing."""
    vm.lock.release()
    try:
        yield
    finally:
        vm.lock.acquire()


def _advance(buffers: list[memoryview], nbytes: int) -> None:
    """Drop the first ``nbytes`` of ``buffers`` (after a partial transfer)."""
    while nbytes and buffers:
        head = buffers[0]
        if nbytes >= head.nbytes:
            nbytes -= head.nbytes
            buffers.pop(0)
        else:
            buffers[0] = head[nbytes:]
            nbytes = 0


def _preadv_all(fd: int, buffers: list[memoryview], offset: int, nbytes: int) -> int:
    """Fill ``buffers`` (``nbytes`` in all) from ``offset``; returns the bytes read
    (fewer only at end of file)."""
    if len(buffers) <= _IOV_MAX:
        done = os.preadv(fd, buffers, offset)
        if done == nbytes or done == 0:
            return done  # the usual case: one call
        pending = list(buffers)
        _advance(pending, done)
    else:
        pending = list(buffers)
        done = 0
    while pending:
        n = os.preadv(fd, pending[:_IOV_MAX], offset + done)
        if n == 0:
            break
        done += n
        _advance(pending, n)
    return done


def _pwritev_all(fd: int, buffers: list[memoryview], offset: int) -> int:
    """Write ``buffers`` at ``offset``, resuming after partial writes; returns the bytes."""
    pending = list(buffers)
    done = 0
    while pending:
        n = os.pwritev(fd, pending[:_IOV_MAX], offset + done)
        if n <= 0:
            raise OSError(errno.EIO, "pwritev wrote nothing")
        done += n
        _advance(pending, n)
    return done


def _drop_cache(fd: int, offset: int, nbytes: int) -> None:
    """Advise the kernel to drop its cached copy of a range we now hold in frames."""
    if nbytes <= 0:
        return  # a length of 0 would mean "to the end of the file"
    try:
        os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_DONTNEED)
    except OSError:  # advice only; some file systems refuse it
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


class _FileMapping(VMObject):
    """What both kinds of file mapping share: byte size, writability, the path."""

    def __init__(
        self, vm: Kernel, npages: int, kind: str, path: str, size_bytes: int, writable: bool
    ) -> None:
        super().__init__(vm, 0, npages, kind)
        self.path = path
        #: The object's size in bytes (not rounded to pages).
        self.size_bytes = size_bytes
        #: Writes allowed (mode "r+").
        self.writable = writable

    @property
    def size(self) -> int:
        """Size in bytes: the file's size, not rounded up to whole pages."""
        return self.size_bytes

    def _refuse_write(self) -> None:
        if not self.writable:
            raise PermissionError(
                errno.EACCES, f"{self.path} is mapped read-only (mode 'r'); map it with mode 'r+'"
            )

    def __repr__(self) -> str:
        state = " closed" if self.closed else ""
        mode = "r+" if self.writable else "r"
        return (
            f"<{type(self).__name__} {self.oid} {self.path!r} {mode} {self.size_bytes} bytes, "
            f"{len(self.pages)} resident, {self.refcount} refs{state}>"
        )


class VnodeObject(_FileMapping):
    """The shared VM object of one file (kind "vnode"); one per (st_dev, st_ino).

    Reads and writes are checked against the current size under the VM
    lock, so a concurrent ``truncate`` never leaves a page outside the
    object. ``refcount`` counts the maps (and private shadows) using it.
    """

    def __init__(
        self,
        vm: Kernel,
        pager: VnodePager,
        path: str,
        fd: int,
        key: tuple[int, int],
        size_bytes: int,
        writable: bool,
    ) -> None:
        npages = -(-size_bytes // vm.page_size)
        super().__init__(vm, npages, "vnode", path, size_bytes, writable)
        self._pager = pager
        self.fd = fd
        #: (st_dev, st_ino): the cache key.
        self.key = key
        #: Descriptors replaced by a read-write one; closed with the object
        #: (a transfer started before the upgrade may still use them).
        self._retired_fds: list[int] = []
        #: The page after the last one read: a fault there is sequential.
        self.next_read_pindex = 0
        #: The current sequential read-ahead window, in pages (0: none yet).
        self.readahead_npages = 0
        #: Asynchronous read-ahead: first pages of the windows issued and not
        #: yet reached by the reader; touching the first one issues the next
        #: window, which starts at ``ra_next_pindex``.
        self.ra_starts: deque[int] = deque()
        self.ra_trigger_pindex = -1
        self.ra_next_pindex = 0
        #: Asynchronous reads in flight (closing waits for them).
        self.async_reads = 0
        #: The error of the last failed write-back (for ``flush`` to raise).
        self._write_error: DeviceError | None = None
        #: During a flush: the pages whose write-back failed (not tried again).
        self._flush_failed: set[int] | None = None

    # -- data ---------------------------------------------------------------------

    def _hold(self, pindex: int, *, write: bool, overwrite: bool) -> Page:
        """``hold_page`` that fails cleanly when the object shrank while it waited."""
        vm = self._kernel
        if self.closed:
            raise ObjectClosed(f"VM object {self.oid} ({self.path}) is closed")
        if pindex >= self.npages:
            raise ValueError(f"{self.path}: truncated to {self.size_bytes} bytes during the access")
        page = vm.hold_page(self, pindex, write=write, overwrite=overwrite)
        if pindex >= self.npages or self.closed:
            # Truncated or closed while the fault path waited: the page it
            # made lies outside the object now; forget it.
            vm.free_page(page)
            if self.closed:
                raise ObjectClosed(f"VM object {self.oid} ({self.path}) is closed")
            raise ValueError(f"{self.path}: truncated to {self.size_bytes} bytes during the access")
        if pindex == self.ra_trigger_pindex:
            self._pager.readahead_reached(self)
        return page

    def _check_span(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size_bytes:
            self._check_range(offset, length)

    def read(self, offset: int, length: int) -> bytes:
        """Return ``length`` bytes at ``offset``; the range must lie inside the file.

        Raises ``ValueError`` outside the object, ``FileShrunkError`` when the
        file lost the bytes to someone else, ``DeviceError`` on a read error.
        """
        if type(offset) is not int or type(length) is not int:
            offset = check_int(offset, "offset")
            length = check_int(length, "length")
        vm = self._kernel
        ps = vm.page_size
        pindex, off = divmod(offset, ps)
        if length > 0 and off + length <= ps:
            with vm.cond:
                if self.closed:
                    raise ObjectClosed(f"VM object {self.oid} ({self.path}) is closed")
                self._check_span(offset, length)
                page = self.pages.get(pindex)
                if page is None or page.busy or page.prefetched:
                    page = self._hold(pindex, write=False, overwrite=False)
                else:
                    page.referenced = True
                    vm.counters.hits += 1
                start = page.frame * ps + off
                return vm.frames.view[start : start + length].tobytes()
        self._check_span(offset, length)
        out = bytearray(length)
        self._copy_out(offset, memoryview(out))
        return bytes(out)

    def readinto(self, offset: int, buffer: WritableBuffer) -> int:
        """Fill ``buffer`` with the bytes at ``offset``; returns its length."""
        view = memoryview(buffer).cast("B")
        if view.readonly:
            raise TypeError("buffer must be writable")
        offset = check_int(offset, "offset")
        self._copy_out(offset, view)
        return view.nbytes

    def _copy_out(self, offset: int, view: memoryview) -> None:
        vm = self._kernel
        ps = vm.page_size
        length = view.nbytes
        pos = 0
        with vm.cond:
            if self.closed:
                raise ObjectClosed(f"VM object {self.oid} ({self.path}) is closed")
            self._check_span(offset, length)
            fview = vm.frames.view
            while pos < length:
                pindex, off = divmod(offset + pos, ps)
                n = min(ps - off, length - pos)
                page = self._hold(pindex, write=False, overwrite=False)
                start = page.frame * ps + off
                view[pos : pos + n] = fview[start : start + n]
                pos += n

    def write(self, offset: int, data: ReadableBuffer) -> int:
        """Store ``data`` at ``offset``; a write past the end extends the file first.

        The gap between the old end and ``offset`` reads as zeros. Raises
        ``PermissionError`` for a read-only mapping. Returns the bytes written.
        """
        if isinstance(cast(object, data), str):
            raise TypeError("data must be bytes-like, not str")
        view = memoryview(data).cast("B")
        offset = check_int(offset, "offset", maximum=MAX_FILE_BYTES - view.nbytes)
        self._refuse_write()
        vm = self._kernel
        ps = vm.page_size
        length = view.nbytes
        pos = 0
        with vm.cond:
            if self.closed:
                raise ObjectClosed(f"VM object {self.oid} ({self.path}) is closed")
            if offset + length > self.size_bytes:
                self._pager.resize(self, offset + length)
            fview = vm.frames.view
            while pos < length:
                pindex, off = divmod(offset + pos, ps)
                n = min(ps - off, length - pos)
                # A whole page, or the whole valid part of the last page, is
                # an overwrite: no need to read the old contents.
                valid = min(ps, self.size_bytes - pindex * ps)
                page = self._hold(pindex, write=True, overwrite=off == 0 and n >= valid)
                start = page.frame * ps + off
                fview[start : start + n] = view[pos : pos + n]
                if n < ps and off + n >= valid and valid < ps:
                    # An overwrite of the last page's valid part: keep its tail zero.
                    vm.frames.view[start + n : page.frame * ps + ps] = bytes(ps - off - n)
                pos += n
        return length

    def discard(self, offset: int, length: int) -> None:
        """Make a range read as zeros: zeros are written (and flushed later) to the file."""
        offset, length = self._check_range(offset, length)
        self._refuse_write()
        zeros = bytes(min(length, _DISCARD_CHUNK_BYTES))
        pos = 0
        while pos < length:
            n = min(length - pos, len(zeros))
            self.write(offset + pos, memoryview(zeros)[:n])
            pos += n

    # -- file operations ------------------------------------------------------------

    def flush(self, *, durable: bool = False) -> None:
        """Write every dirty page back to the file (msync); blocks until done.

        ``durable=True`` also waits for the file system to put the data on
        stable storage (fdatasync). Raises the first write error (a
        ``DeviceError`` naming the file); the pages that failed stay dirty
        and the next flush or pageout tries again.
        """
        vm = self._kernel
        with vm.cond:
            if self.closed:
                raise ObjectClosed(f"VM object {self.oid} ({self.path}) is closed")
            error = self._pager.flush(self)
            if error is None and durable:
                fd = self.fd
                try:
                    with _unlocked(vm):
                        os.fdatasync(fd)
                except OSError as exc:
                    error = DeviceError(exc.errno or errno.EIO, self.path, 0, "fdatasync")
        if error is not None:
            raise error

    def truncate(self, size: int) -> None:
        """Set the file's (and object's) size to ``size`` bytes.

        Shrinking forgets the pages past the new end, dirty or not (their
        data is cut off with the file); growing adds zeros. Raises
        ``PermissionError`` for a read-only mapping.
        """
        size = check_int(size, "size", maximum=MAX_FILE_BYTES)
        self._refuse_write()
        with self._kernel.cond:
            if self.closed:
                raise ObjectClosed(f"VM object {self.oid} ({self.path}) is closed")
            self._pager.resize(self, size)

    def close(self) -> None:
        """Flush and drop this map; the object closes with its last reference.

        A write error during the flush is raised and the map stays open, so
        no data is dropped silently.
        """
        vm = self._kernel
        with vm.cond:
            if self.closed:
                return
            error = self._pager.flush(self)
            if error is not None:
                raise error
            self.refcount -= 1
            if self.refcount == 0:
                vm.destroy_object(self)
                vm.cond.notify_all()

    def clone(self) -> VMObject:
        """Not for files: map the file with ``private=True`` for a copy-on-write view."""
        raise TypeError(
            f"{self.path}: a file object cannot be cloned; use vm.map_file(path, private=True)"
        )

    def _before_close(self) -> None:
        # The VM's own close and _close_object come here with the lock held.
        # Errors cannot be raised from here without aborting the VM's close:
        # they are logged (close() above raises them).
        self._pager.wait_async(self)
        error = self._pager.flush(self)
        if error is not None:
            log.error("closing %s: dirty pages could not be written back: %s", self.path, error)


class PrivateFileObject(_FileMapping):
    """A copy-on-write map of a file: an anonymous shadow over its ``VnodeObject``.

    Pages not yet written come from the shared file object (``backing``);
    a write copies the page up into this object, whose pages are anonymous
    memory: paged to swap, never written to the file. The size is fixed at
    map time; pages past the end of a file truncated since read as zeros.
    """

    def __init__(self, vm: Kernel, vnode: VnodeObject, writable: bool) -> None:
        super().__init__(vm, vnode.npages, "anonymous", vnode.path, vnode.size_bytes, writable)
        self.backing = vnode
        self.backing_offset = 0

    def write(self, offset: int, data: ReadableBuffer) -> int:
        """Store ``data`` in the private copy; raises ``PermissionError`` in mode "r"."""
        self._refuse_write()
        return super().write(offset, data)

    def discard(self, offset: int, length: int) -> None:
        """Make a range of the private copy read as zeros (the file is untouched)."""
        self._refuse_write()
        super().discard(offset, length)


class VnodePager:
    """The pager of kind "vnode": one per VM, with the cache of file objects.

    Every method runs with the VM lock held.
    """

    kind = "vnode"

    def __init__(self, vm: Kernel) -> None:
        self._kernel = vm
        self._cache: dict[tuple[int, int], VnodeObject] = {}
        #: Ceiling of the sequential read-ahead window, in pages.
        self.readahead_max_npages = vm.config.readahead_max_npages
        #: Read-ahead windows kept in flight asynchronously; 0 turns it off.
        #: Off in VMs without a daemon thread, which stay deterministic.
        self.async_readahead_windows = ASYNC_READAHEAD_WINDOWS if vm.config.daemon_thread else 0
        self._jobs: queue.SimpleQueue[_AsyncRead] = queue.SimpleQueue()
        self._njobs = 0
        self._workers: list[threading.Thread] = []
        self._async_pageins = 0
        self._async_pagein_pages = 0
        self._pageins = 0
        self._pagein_pages = 0
        self._pagein_bytes = 0
        self._pageouts = 0
        self._pageout_pages = 0
        self._pageout_bytes = 0
        self._flushes = 0
        self._read_errors = 0
        self._write_errors = 0
        self._shrink_errors = 0

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
        obj.size_bytes = size_bytes
        obj.npages = new_npages

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
        self._flushes += 1
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
                got = _preadv_all(fd, views, offset, expected)
                if got < expected:
                    file_size = os.fstat(fd).st_size
            except OSError as exc:
                error = DeviceError(exc.errno or errno.EIO, vobj.path, first + got // ps)
            _drop_cache(fd, offset, got)
        finally:
            lock.acquire()
            vm.pagermap.map_out(token)
            vm.inflight.release(IOKind.READ)
        self._pageins += 1
        self._pagein_pages += len(pages)
        self._pagein_bytes += got
        vm.counters.pageins += 1
        vm.counters.pagein_pages += len(pages)
        # Whole pages read; the page holding the short read's end is incomplete.
        nvalid = len(pages) if got >= expected else got // ps
        if error is None and reqpage >= nvalid:
            error = FileShrunkError(vobj.path, first + nvalid, max(file_size, 0), size)
            self._shrink_errors += 1
        if error is not None:
            log.error("vnode_pager: pagein failed: %s", error)
            self._read_errors += 1
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
        self._jobs.put(_AsyncRead(obj, pages, views, start * ps, expected, obj.fd, token))
        self._njobs += 1
        if len(self._workers) < self.async_readahead_windows:
            worker = threading.Thread(target=self._work, name="vmpager-vnode-ra", daemon=True)
            self._workers.append(worker)
            worker.start()
        return True

    def _work(self) -> None:
        """A read-ahead worker: transfers without the lock, completes with it."""
        vm = self._kernel
        me = threading.current_thread()
        while True:
            try:
                job = self._jobs.get(timeout=_WORKER_IDLE_SECONDS)
            except queue.Empty:
                with vm.cond:
                    if self._njobs == 0:  # submissions happen under the lock
                        self._workers.remove(me)
                        return
                continue
            got = -1
            try:
                got = _preadv_all(job.fd, job.views, job.offset, job.expected)
                _drop_cache(job.fd, job.offset, got)
            except OSError as exc:
                log.info("vnode_pager: read-ahead of %s failed: %s", job.obj.path, exc)
            except BaseException:  # never leave pages busy
                log.exception("vnode_pager: read-ahead of %s", job.obj.path)
            with vm.cond:
                self._njobs -= 1
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
        self._pageins += 1
        self._pagein_pages += nvalid
        self._pagein_bytes += max(got, 0)
        self._async_pageins += 1
        self._async_pagein_pages += nvalid
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
            with _unlocked(vm):
                try:
                    file_size = os.fstat(fd).st_size
                    if file_size < offset + nbytes:
                        error = FileShrunkError(
                            vobj.path, max(first, file_size // ps), file_size, size
                        )
                    else:
                        _pwritev_all(fd, views, offset)
                        _drop_cache(fd, offset, nbytes)
                except OSError as exc:
                    error = DeviceError(exc.errno or errno.EIO, vobj.path, first, "write-back")
        finally:
            vm.pagermap.map_out(token)
            vm.inflight.release(IOKind.WRITE_SYNC)
        self._pageouts += 1
        self._pageout_pages += len(pages)
        vm.counters.pageouts += 1
        vm.counters.pageout_pages += len(pages)
        vm.counters.note_cluster(len(pages))
        if error is None:
            self._pageout_bytes += nbytes
            for page in pages:
                page.writing = False
                page.dirty = False
                page.wanted = False
            vm.cond.notify_all()
            return [PagerResult.OK] * len(pages)
        self._write_errors += 1
        if isinstance(error, FileShrunkError):
            self._shrink_errors += 1
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
            pageins=self._pageins,
            pagein_pages=self._pagein_pages,
            pagein_bytes=self._pagein_bytes,
            async_pageins=self._async_pageins,
            async_pagein_pages=self._async_pagein_pages,
            pageouts=self._pageouts,
            pageout_pages=self._pageout_pages,
            pageout_bytes=self._pageout_bytes,
            flushes=self._flushes,
            read_errors=self._read_errors,
            write_errors=self._write_errors,
            shrink_errors=self._shrink_errors,
        )

    def check(self) -> None:
        """Assert the cache and every file object are consistent (caller holds the VM lock).

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
            raise AssertionError("; ".join(problems))


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
