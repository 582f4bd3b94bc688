"""A swap device on a file or a block device (FreeBSD's swap on a vnode or a disk).

Swapped pages must not stay in the operating system's page cache, or the VM's
memory budget is a lie: the device opens its file with ``O_DIRECT`` when the
file system allows it, and otherwise writes each run back and drops it from
the cache (``sync_file_range`` + ``posix_fadvise(POSIX_FADV_DONTNEED)``) after
every write and read.

Each request is one ``os.preadv``/``os.pwritev`` (looping on short transfers;
split only past the kernel's IOV_MAX buffers per call). Those calls release
the GIL, so several threads may use disjoint ranges at once.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import stat
import struct
import tempfile
import threading
from collections.abc import Callable, Sequence

import numpy as np

from vmpager.devices._request import (
    DeviceCounters,
    as_byte_views,
    check_block_size,
    check_range,
    is_one_block_view,
)
from vmpager.devices.protocol import DeviceStatistics, ReadableBuffer, WritableBuffer
from vmpager.errors import DeviceError
from vmpager.io.vectored import drop_cache, libc_function, preadv_all, pwritev_all
from vmpager.units import check_int, format_size

__all__ = ["FileDevice"]

# linux/falloc.h
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
# linux/fs.h: BLKDISCARD = _IO(0x12, 119), BLKGETSIZE64 = _IOR(0x12, 114, size_t)
_BLKDISCARD = 0x1277

#: errnos meaning "this file cannot discard": discard is advisory, so they are ignored.
_DISCARD_UNSUPPORTED = frozenset(
    {errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL, errno.ENOTTY}
)


# ctypes releases the GIL around the call, as os.preadv does.
_fallocate = libc_function(
    "fallocate", [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
)


def _address(view: memoryview) -> int:
    """The memory address of a byte memoryview (read-only views included)."""
    if not view.readonly:
        return ctypes.addressof(ctypes.c_char.from_buffer(view))
    return int(np.frombuffer(view, dtype=np.uint8).ctypes.data)


class _Bounce:
    """Page-aligned copies of a request's unaligned buffers, in one anonymous mapping.

    ``iov`` is the request's buffer list with every unaligned buffer replaced
    by its aligned copy; ``copy_in`` fills the copies (before a write),
    ``copy_out`` hands read data back (after a read).
    """

    def __init__(self, views: list[memoryview], misaligned: list[int]) -> None:
        self._views = views
        self._misaligned = misaligned
        self._mapping = mmap.mmap(-1, sum(views[index].nbytes for index in misaligned))
        arena = memoryview(self._mapping)
        self.iov = list(views)
        offset = 0
        for index in misaligned:
            length = views[index].nbytes
            self.iov[index] = arena[offset : offset + length]
            offset += length
        arena.release()

    def copy_in(self) -> None:
        for index in self._misaligned:
            self.iov[index][:] = self._views[index]

    def copy_out(self) -> None:
        for index in self._misaligned:
            self._views[index][:] = self.iov[index]

    def release(self) -> None:
        for index in self._misaligned:
            self.iov[index].release()
        self._mapping.close()


class FileDevice:
    """A swap device on a regular file or a block device.

    ``FileDevice(path, nblocks)`` opens ``path``; when it does not exist and
    ``create`` is true it is created sparse with mode 0600 and
    ``nblocks * block_size`` bytes. An existing file or block device is used
    as it is and must hold at least ``nblocks`` blocks (``ValueError`` naming
    its size otherwise); ``nblocks=None`` uses all of it. The old contents of
    an existing file are never interpreted: a swap device holds only what
    the VM writes.

    With ``direct=True`` the file is used with ``O_DIRECT``, checked by one
    direct read of block 0 when opening; if the file system refuses
    (``EINVAL``) the device falls back to cached I/O that writes each run
    back and drops it from the page cache after every request (``direct``
    then reads False). In direct mode a buffer whose address is not aligned
    to ``min(block_size, PAGESIZE)`` is bounced through an aligned
    anonymous mapping; aligned buffers (slices of an mmap arena) are
    transferred with no copy.

    OS errors of a request raise ``DeviceError(errno, name, first block)``.
    The caller must not close the device while requests are in flight.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        nblocks: int | None = None,
        *,
        block_size: int = 4096,
        create: bool = True,
        direct: bool = True,
    ) -> None:
        self._block_size = check_block_size(block_size)
        wanted = None if nblocks is None else check_int(nblocks, "nblocks", minimum=1)
        self._path = os.fspath(path)
        self._name = self._path
        self._counters = DeviceCounters()
        self._close_lock = threading.Lock()
        self._fd = -1
        fd, created = self._open(self._path, wanted, create)
        try:
            self._is_block_device = stat.S_ISBLK(os.fstat(fd).st_mode)
            size_bytes = self._size_bytes(fd, wanted, created)
            if wanted is None:
                wanted = size_bytes // self._block_size
                if wanted == 0:
                    raise ValueError(
                        f"{self._path}: {size_bytes} bytes is smaller than one block of "
                        f"{self._block_size} bytes"
                    )
            elif size_bytes < wanted * self._block_size:
                raise ValueError(
                    f"{self._path}: size {size_bytes} bytes ({format_size(size_bytes)}) is too "
                    f"small for nblocks={wanted} blocks of {self._block_size} bytes "
                    f"({wanted * self._block_size} bytes needed)"
                )
            self._nblocks = wanted
            self._alignment = min(self._block_size, mmap.PAGESIZE)
            self._direct = direct and self._enable_direct(fd)
        except BaseException:
            os.close(fd)
            if created:
                os.unlink(self._path)
            raise
        self._fd = fd

    @classmethod
    def temporary(
        cls,
        nblocks: int,
        *,
        block_size: int = 4096,
        directory: str | os.PathLike[str] | None = None,
        direct: bool = True,
    ) -> FileDevice:
        """Create a private swap file in ``directory`` (default: the temp dir).

        The file is unlinked as soon as it is open, so it disappears with the
        device (or the process) and no other process can find it by name.
        """
        size_blocks = check_int(nblocks, "nblocks", minimum=1)
        size_bytes = size_blocks * check_block_size(block_size)
        fd, path = tempfile.mkstemp(prefix="vmpager-", suffix=".swap", dir=directory)
        try:
            os.ftruncate(fd, size_bytes)
            os.close(fd)
            fd = -1
            device = cls(path, size_blocks, block_size=block_size, create=False, direct=direct)
        finally:
            if fd >= 0:
                os.close(fd)
            os.unlink(path)
        return device

    @staticmethod
    def _open(path: str, nblocks: int | None, create: bool) -> tuple[int, bool]:
        """Open (or create, mode 0600) ``path``; returns the fd and whether it was created."""
        flags = os.O_RDWR | os.O_CLOEXEC
        if create and nblocks is not None:
            try:
                return os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600), True
            except FileExistsError:
                pass
        elif create and not os.path.exists(path):
            raise ValueError(f"{path}: nblocks is required to create a swap file")
        return os.open(path, flags), False

    def _size_bytes(self, fd: int, nblocks: int | None, created: bool) -> int:
        if self._is_block_device:
            return os.lseek(fd, 0, os.SEEK_END)
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"{self._path}: not a regular file or a block device")
        if created and nblocks is not None:
            # ftruncate leaves the file sparse: no disk space until blocks are written.
            os.ftruncate(fd, nblocks * self._block_size)
            return nblocks * self._block_size
        return info.st_size

    def _enable_direct(self, fd: int) -> bool:
        """Turn on O_DIRECT and prove it works with one aligned read; False if refused."""
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        try:
            fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT)
        except OSError as error:
            if error.errno == errno.EINVAL:
                return False
            raise
        probe = mmap.mmap(-1, self._block_size)
        try:
            os.preadv(fd, [probe], 0)
        except OSError as error:
            if error.errno != errno.EINVAL:
                raise
            fcntl.fcntl(fd, fcntl.F_SETFL, flags)
            return False
        finally:
            probe.close()
        return True

    @property
    def name(self) -> str:
        """The path the device was opened with."""
        return self._name

    @property
    def path(self) -> str:
        """The path the device was opened with (unlinked for ``temporary``)."""
        return self._path

    @property
    def block_size(self) -> int:
        """Bytes per block."""
        return self._block_size

    @property
    def nblocks(self) -> int:
        """Number of blocks."""
        return self._nblocks

    @property
    def direct(self) -> bool:
        """True when I/O bypasses the page cache with O_DIRECT."""
        return self._direct

    def fileno(self) -> int:
        """The open file descriptor (for tests and diagnostics; do not close it)."""
        return self._open_fd()

    def _open_fd(self) -> int:
        fd = self._fd
        if fd < 0:
            raise ValueError(f"{self._name}: device is closed")
        return fd

    def _bounce(self, views: list[memoryview]) -> _Bounce | None:
        """An aligned stand-in for the unaligned buffers of a direct request, if any."""
        misaligned = [index for index, view in enumerate(views) if _address(view) % self._alignment]
        return _Bounce(views, misaligned) if misaligned else None

    def read_blocks(self, blk: int, buffers: Sequence[WritableBuffer]) -> None:
        """Fill ``buffers`` from the blocks starting at ``blk`` with one ``preadv``.

        Blocks until the data is in the buffers. ``DeviceError`` on an OS
        error or an unexpected end of file.
        """
        fd = self._open_fd()
        views, nblocks = as_byte_views(
            self._name, self._nblocks, self._block_size, blk, buffers, writable=True
        )
        offset = blk * self._block_size
        bounce = self._bounce(views) if self._direct else None
        try:
            if bounce is None:
                self._transfer(fd, views, offset, blk, write=False)
            else:
                self._transfer(fd, bounce.iov, offset, blk, write=False)
                bounce.copy_out()
            if not self._direct:
                self._drop_cache(fd, offset, nblocks * self._block_size, blk, written=False)
        except DeviceError:
            self._counters.count_read_error()
            raise
        finally:
            if bounce is not None:
                bounce.release()
        self._counters.count_read(nblocks)

    def read_block(self, blk: int, buffer: memoryview) -> None:
        """``read_blocks(blk, [buffer])`` for one buffer of one block, in one ``preadv``.

        Same checks, results, errors and counters as ``read_blocks``. In
        direct mode, a writable, contiguous byte memoryview of exactly one
        block (a frame view) goes to ``preadv`` without the request checks;
        anything else, an unaligned buffer (``EINVAL``), a short read and
        cached mode take ``read_blocks``, which then says what is wrong.
        """
        fd = self._fd
        size = self._block_size
        if fd < 0 or not self._direct or not is_one_block_view(buffer, blk, self._nblocks, size):
            self.read_blocks(blk, [buffer])
            return
        try:
            done = os.preadv(fd, [buffer], blk * size)
        except OSError as error:
            if error.errno == errno.EINVAL:
                self.read_blocks(blk, [buffer])  # not aligned: the bounce buffer
                return
            self._counters.count_read_error()
            raise DeviceError(error.errno or errno.EIO, self._name, blk) from error
        if done != size:
            self.read_blocks(blk, [buffer])  # short: read again, the careful way
            return
        self._counters.count_read(1)

    def read_many(
        self,
        requests: Sequence[tuple[int, Sequence[WritableBuffer]]],
        run: Callable[[Callable[[int], None], Sequence[int]], None],
    ) -> list[DeviceError | None]:
        """Independent reads, as many in flight as ``run`` runs at once; one error per request.

        Each request is ``(blk, buffers)`` as for ``read_blocks`` and is checked
        the same way before any I/O (``ValueError``/``TypeError``, nothing
        read). ``run(fn, indices)`` calls ``fn(i)`` for every index, on
        threads of the caller's choosing (``Fanout.run``). Each read is one
        ``preadv``; a request the direct path refuses (buffers not aligned:
        EINVAL) or reads short goes through ``read_blocks``. Result ``i`` is
        None when request ``i`` was read, else its ``DeviceError``.
        """
        fd = self._open_fd()
        bs = self._block_size
        prepared = [
            (*as_byte_views(self._name, self._nblocks, bs, blk, buffers, writable=True), blk)
            for blk, buffers in requests
        ]
        errors: list[DeviceError | None] = [None] * len(prepared)
        careful: list[int] = []
        direct = self._direct

        def one(i: int) -> None:
            views, nblocks, blk = prepared[i]
            try:
                if os.preadv(fd, views, blk * bs) == nblocks * bs:
                    return
            except OSError as error:
                if not (direct and error.errno == errno.EINVAL):
                    errors[i] = DeviceError(error.errno or errno.EIO, self._name, blk)
                    return
            careful.append(i)  # list.append is atomic under the GIL

        run(one, range(len(prepared)))
        for _ in range(sum(1 for error in errors if error is not None)):
            self._counters.count_read_error()
        retried = set(careful)
        for i in retried:
            views, _, blk = prepared[i]
            try:
                self.read_blocks(blk, views)  # counts itself
            except DeviceError as error:
                errors[i] = error
        done = [p for i, p in enumerate(prepared) if errors[i] is None and i not in retried]
        self._counters.count_reads(len(done), sum(nblocks for _, nblocks, _ in done))
        if not direct:
            for _, nblocks, blk in done:
                self._drop_cache(fd, blk * bs, nblocks * bs, blk, written=False)
        return errors

    def write_blocks(self, blk: int, buffers: Sequence[ReadableBuffer]) -> None:
        """Store ``buffers`` at the blocks starting at ``blk`` with one ``pwritev``.

        Blocks until the kernel has the data (in direct mode: until the
        device acknowledged it; in cached mode: until it is written back and
        dropped from the page cache). ``DeviceError`` on an OS error.
        """
        fd = self._open_fd()
        views, nblocks = as_byte_views(
            self._name, self._nblocks, self._block_size, blk, buffers, writable=False
        )
        offset = blk * self._block_size
        bounce = self._bounce(views) if self._direct else None
        try:
            if bounce is None:
                self._transfer(fd, views, offset, blk, write=True)
            else:
                bounce.copy_in()
                self._transfer(fd, bounce.iov, offset, blk, write=True)
            if not self._direct:
                self._drop_cache(fd, offset, nblocks * self._block_size, blk, written=True)
        except DeviceError:
            self._counters.count_write_error()
            raise
        finally:
            if bounce is not None:
                bounce.release()
        self._counters.count_write(nblocks)

    def _transfer(
        self, fd: int, iov: list[memoryview], offset: int, blk: int, *, write: bool
    ) -> None:
        """One preadv/pwritev, repeated only for short transfers or past IOV_MAX."""
        try:
            if write:
                pwritev_all(fd, iov, offset)
                return
            nbytes = sum(view.nbytes for view in iov)
            done = preadv_all(fd, iov, offset, nbytes)
        except OSError as error:
            raise DeviceError(error.errno or errno.EIO, self._name, blk) from error
        if done < nbytes:
            raise DeviceError(errno.EIO, self._name, blk, "unexpected end of file")

    def _drop_cache(self, fd: int, offset: int, nbytes: int, blk: int, *, written: bool) -> None:
        """Cached mode: get the range out of the page cache.

        POSIX_FADV_DONTNEED only drops clean pages, so a written range is
        first written back and waited for.
        """
        try:
            drop_cache(fd, offset, nbytes, written=written)
        except OSError as error:
            raise DeviceError(error.errno or errno.EIO, self._name, blk) from error

    def discard(self, blk: int, nblocks: int) -> None:
        """Punch the blocks out of the file (``BLKDISCARD`` on a block device).

        Advisory: a file system that cannot punch holes is left as it is.
        Discarded blocks read as zeros on most file systems, but the contract
        only promises they read without error. ``DeviceError`` on other OS
        errors.
        """
        fd = self._open_fd()
        check_range(self._name, self._nblocks, blk, check_int(nblocks, "nblocks", minimum=1))
        offset = blk * self._block_size
        nbytes = nblocks * self._block_size
        try:
            if self._is_block_device:
                fcntl.ioctl(fd, _BLKDISCARD, struct.pack("QQ", offset, nbytes))
            elif _fallocate is not None:
                mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
                if _fallocate(fd, mode, offset, nbytes) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, os.strerror(err))
        except OSError as error:
            if error.errno not in _DISCARD_UNSUPPORTED:
                raise DeviceError(error.errno or errno.EIO, self._name, blk) from error
        self._counters.count_discard()

    def flush(self) -> None:
        """``fdatasync`` the file: completed writes survive a crash of the machine."""
        fd = self._open_fd()
        try:
            os.fdatasync(fd)
        except OSError as error:
            raise DeviceError(error.errno or errno.EIO, self._name, 0) from error
        self._counters.count_flush()

    def close(self) -> None:
        """Close the file. Idempotent; later calls raise ``ValueError``."""
        with self._close_lock:
            fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def statistics(self) -> DeviceStatistics:
        """Counters since the device was opened."""
        return self._counters.snapshot(self._name, self._block_size, self._nblocks)

    def __enter__(self) -> FileDevice:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = "direct" if self._direct else "cached"
        return f"FileDevice({self._path!r}, {self._nblocks}, block_size={self._block_size}, {mode})"
