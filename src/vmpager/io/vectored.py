"""Vectored file I/O: whole ``preadv``/``pwritev`` transfers and page-cache control.

Shared by the file swap device (``devices/file.py``) and the vnode pager
(``pager/vnode.py``): both move lists of page-sized memoryviews to and from
a file descriptor at an offset. A transfer is one system call in the usual
case; it loops only on a short transfer (a signal, a pipe-like file, the end
of a file) or when the list is longer than the kernel's ``IOV_MAX``.

The calls release the GIL (as ``os.preadv`` does), so threads may transfer
disjoint ranges at once; none of them holds any lock. Errors are the
``OSError`` of the system call: callers turn them into their own typed
errors (``DeviceError`` naming the device or file).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from typing import Any, Final

__all__ = [
    "IOV_MAX",
    "advance",
    "drop_cache",
    "preadv_all",
    "pwritev_all",
    "write_back",
]

#: Buffers one ``preadv``/``pwritev`` accepts (the kernel's limit; 1024 on Linux).
IOV_MAX: Final = max(16, os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 1024)

# sync_file_range flags: WAIT_BEFORE | WRITE | WAIT_AFTER.
_SYNC_FILE_RANGE_ALL: Final = 1 | 2 | 4


def _load_libc() -> Any:
    path = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(path, use_errno=True)
    except OSError:
        return None


#: The C library (for calls ``os`` lacks), or None where it cannot be loaded.
libc: Final = _load_libc()


def libc_function(name: str, argtypes: list[Any]) -> Any:
    """The C function ``name`` returning int, or None when the C library lacks it.

    ctypes releases the GIL around the call, as ``os.preadv`` does.
    """
    function = getattr(libc, name, None) if libc is not None else None
    if function is not None:
        function.argtypes = argtypes
        function.restype = ctypes.c_int
    return function


_sync_file_range = libc_function(
    "sync_file_range", [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
)


def advance(views: list[memoryview], nbytes: int) -> list[memoryview]:
    """The buffers still to transfer after the first ``nbytes`` of ``views`` were done.

    ``views`` is not changed; a buffer done in part is re-sliced. O(buffers done).
    """
    index = 0
    while index < len(views) and nbytes >= views[index].nbytes:
        nbytes -= views[index].nbytes
        index += 1
    rest = views[index:]
    if rest and nbytes:
        rest[0] = rest[0][nbytes:]
    return rest


def preadv_all(fd: int, buffers: list[memoryview], offset: int, nbytes: int) -> int:
    """Fill ``buffers`` (``nbytes`` in all) from ``offset``; returns the bytes read.

    Fewer than ``nbytes`` only at end of file. One ``preadv`` in the usual
    case. Blocks on the file; raises the call's ``OSError``.
    """
    if len(buffers) <= IOV_MAX:
        done = os.preadv(fd, buffers, offset)
        if done == nbytes or done == 0:
            return done
        pending = advance(buffers, done)
    else:
        pending = buffers
        done = 0
    while pending:
        n = os.preadv(fd, pending[:IOV_MAX], offset + done)
        if n == 0:
            break
        done += n
        pending = advance(pending, n)
    return done


def pwritev_all(fd: int, buffers: list[memoryview], offset: int) -> int:
    """Write all of ``buffers`` at ``offset``, resuming after short writes; returns the bytes.

    Blocks on the file; raises the call's ``OSError``, and ``OSError(EIO)``
    when a call makes no progress.
    """
    pending = buffers
    done = 0
    while pending:
        n = os.pwritev(fd, pending[:IOV_MAX], offset + done)
        if n <= 0:
            raise OSError(errno.EIO, "pwritev wrote nothing")
        done += n
        pending = advance(pending, n)
    return done


def write_back(fd: int, offset: int, nbytes: int) -> None:
    """Start and wait for the write-back of a written range (not a durability barrier).

    ``sync_file_range`` where the C library has it, else ``fdatasync``.
    Raises ``OSError``.
    """
    if _sync_file_range is None:  # pragma: no cover - every Linux libc has it
        os.fdatasync(fd)
        return
    if _sync_file_range(fd, offset, nbytes, _SYNC_FILE_RANGE_ALL) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def drop_cache(fd: int, offset: int, nbytes: int, *, written: bool = False) -> None:
    """Get a range out of the kernel's page cache (the VM holds the data itself).

    ``POSIX_FADV_DONTNEED`` drops only clean pages, so ``written=True``
    first writes the range back and waits for it. An empty range does
    nothing (a length of 0 would mean "to the end of the file"). Raises
    ``OSError``; a caller for whom the advice is optional ignores it.
    """
    if nbytes <= 0:
        return
    if written:
        write_back(fd, offset, nbytes)
    os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_DONTNEED)
