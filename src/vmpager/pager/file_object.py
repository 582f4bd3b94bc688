"""File objects: the VM objects of mapped files (the vnode's uvm_object).

``VnodeObject`` is the one shared object of a file (one per device and
inode); ``PrivateFileObject`` is a copy-on-write map of it, an anonymous
shadow. Both copy bytes with the VM's own copy loop (``Kernel.copy``), giving it
``VnodeObject._hold``, the fault that also notices a file truncated while it
waited and triggers the next asynchronous read-ahead window. File transfers,
read-ahead and write-back belong to the pager (``pager/vnode.py``); these
classes hold the per-file state and the user-facing calls.
"""

from __future__ import annotations

import errno
import logging
import os
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, cast

from vmpager.errors import DeviceError
from vmpager.units import check_int
from vmpager.vm.object import VMObject
from vmpager.vm.page import Page

if TYPE_CHECKING:
    from vmpager.devices.protocol import ReadableBuffer, WritableBuffer
    from vmpager.pager.vnode import VnodePager
    from vmpager.vm.kernel import Kernel

__all__ = ["MAX_FILE_BYTES", "PrivateFileObject", "VnodeObject", "unlocked"]

log = logging.getLogger("vmpager.vnode")

#: Largest file size an object may grow to (the largest off_t).
MAX_FILE_BYTES = (1 << 63) - 1
#: Chunk size of the zero writes that implement ``discard``.
_DISCARD_CHUNK_BYTES = 1 << 20


@contextmanager
def unlocked(vm: Kernel) -> Iterator[None]:
    """Release the VM lock for a transfer; the pages involved must be busy or writing."""
    vm.lock.release()
    try:
        yield
    finally:
        vm.lock.acquire()


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

    def describe(self) -> str:
        return f"VM object {self.oid} ({self.path})"

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

    def _hold(self, pindex: int, write: bool, overwrite: bool) -> Page:
        """``hold_page`` that fails cleanly when the object shrank while it waited."""
        vm = self._kernel
        if pindex >= self.npages:
            raise ValueError(f"{self.path}: truncated to {self.size_bytes} bytes during the access")
        page = vm.hold_page(self, pindex, write=write, overwrite=overwrite)
        if pindex >= self.npages or self.closed:
            # Truncated or closed while the fault path waited: the page it
            # made lies outside the object now; forget it.
            vm.free_page(page)
            self.check_open()
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
                # A closed object has no pages: the fault reaches the dead pager.
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
        self._check_span(offset, view.nbytes)
        self._kernel.copy(self, offset, view, write=False, hold=self._hold)

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
        length = view.nbytes
        with vm.cond:
            self.check_open()
            if offset + length > self.size_bytes:
                self._pager.resize(self, offset + length)
        # A concurrent truncate between the resize and the copy makes _hold
        # raise: the write never lands outside the file.
        vm.copy(self, offset, view, write=True, hold=self._hold)
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
            self.check_open()
            error = self._pager.flush(self)
            if error is None and durable:
                fd = self.fd
                try:
                    with unlocked(vm):
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
            self.check_open()
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
