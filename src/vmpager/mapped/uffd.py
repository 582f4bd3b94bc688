"""Linux userfaultfd, memfd and mapping calls from Python (no C extension).

The thin layer under transparent paging: open a userfaultfd and agree on
its API, register a range, resolve faults (``copy``, ``wake``,
``writeprotect``), read fault messages; create a memfd, punch holes in it;
map, remap and unmap memory at fixed addresses; pass file descriptors over
a Unix socket (SCM_RIGHTS). Ioctl structures are packed with ``struct`` and
passed to ``fcntl.ioctl`` (which releases the GIL while the kernel works);
``ctypes`` is used only for libc calls that have no ``os`` wrapper.

Every call raises ``OSError`` with the kernel's errno, except
``open_userfaultfd``, which raises ``UserfaultfdUnavailable`` saying why and
how to enable it. Numbers are those of x86_64 and arm64 (the ioctl encoding
is the generic one).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import itertools
import os
import socket
import struct
from dataclasses import dataclass
from typing import Any

from vmpager.errors import VmError

__all__ = [
    "FEATURE_WP_SHMEM",
    "MODE_MISSING",
    "MODE_WP",
    "PF_WP",
    "PF_WRITE",
    "Fault",
    "Userfaultfd",
    "UserfaultfdUnavailable",
    "fallocate_punch",
    "libc",
    "madvise",
    "madvise_pages",
    "map_fixed",
    "memfd",
    "merge_ranges",
    "mremap_fixed",
    "munmap",
    "recv_fds",
    "send_fds",
]


class UserfaultfdUnavailable(VmError):
    """userfaultfd cannot be used here; the message says why and how to enable it."""


# -- ioctl numbers (_IOWR(0xAA, nr, size) and friends) ------------------------------


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (0xAA << 8) | nr


_RW, _R = 3, 2
UFFDIO_API = _ioc(_RW, 0x3F, 24)
UFFDIO_REGISTER = _ioc(_RW, 0x00, 32)
UFFDIO_UNREGISTER = _ioc(_R, 0x01, 16)
UFFDIO_WAKE = _ioc(_R, 0x02, 16)
UFFDIO_COPY = _ioc(_RW, 0x03, 40)
UFFDIO_WRITEPROTECT = _ioc(_RW, 0x06, 24)
UFFDIO_CONTINUE = _ioc(_RW, 0x07, 32)
UFFDIO_POISON = _ioc(_RW, 0x08, 32)
USERFAULTFD_IOC_NEW = 0xAA00
_UFFD_API = 0xAA
_SYS_USERFAULTFD = {"x86_64": 323, "aarch64": 282}

MODE_MISSING = 1
MODE_WP = 2
MODE_MINOR = 4
COPY_DONTWAKE = 1
COPY_WP = 2
WP_PROTECT = 1
WP_DONTWAKE = 2
#: Write-protect faults on shmem (and hugetlbfs) mappings.
FEATURE_WP_SHMEM = 1 << 12
FEATURE_MISSING_SHMEM = 1 << 5
#: UFFDIO_POISON: resolve a fault so that the access gets SIGBUS (Linux >= 6.6).
FEATURE_POISON = 1 << 14
PF_WRITE = 1
PF_WP = 2
PF_MINOR = 4
EVENT_PAGEFAULT = 0x12
_MSG_SIZE = 32

# -- libc -------------------------------------------------------------------------------

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
libc.mremap.restype = ctypes.c_void_p
libc.mremap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_void_p,
]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
libc.syscall.restype = ctypes.c_long

PROT_NONE = 0
PROT_RW = 3
MAP_SHARED = 0x01
MAP_PRIVATE = 0x02
MAP_FIXED = 0x10
MAP_ANONYMOUS = 0x20
MAP_NORESERVE = 0x4000
MREMAP_MAYMOVE = 1
MREMAP_FIXED = 2
MREMAP_DONTUNMAP = 4
MADV_DONTNEED = 4
MADV_DONTFORK = 10
FALLOC_FL_KEEP_SIZE = 1
FALLOC_FL_PUNCH_HOLE = 2
_MAP_FAILED = ctypes.c_void_p(-1).value


def _raise_errno(what: str) -> None:
    err = ctypes.get_errno()
    raise OSError(err, f"{what}: {os.strerror(err)}")


def map_fixed(addr: int, length: int, fd: int = -1, offset: int = 0, *, shared: bool = True) -> int:
    """Map ``length`` bytes at ``addr`` (MAP_FIXED): ``fd`` at ``offset`` shared, or
    fresh anonymous private memory when ``fd`` is -1. Replaces what was there
    atomically. One syscall."""
    if fd < 0:
        flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE
    else:
        flags = (MAP_SHARED if shared else MAP_PRIVATE) | MAP_FIXED
    got = libc.mmap(addr, length, PROT_RW, flags, fd, offset)
    if got == _MAP_FAILED or got != addr:
        _raise_errno(f"mmap at {addr:#x}")
    return addr


def map_shared(fd: int, length: int) -> int:
    """Map ``length`` bytes of ``fd`` shared, where the kernel chooses; the address."""
    got = libc.mmap(None, length, PROT_RW, MAP_SHARED, fd, 0)
    if got == _MAP_FAILED or got is None:
        _raise_errno("mmap")
    return int(got)


def reserve(length: int) -> int:
    """Reserve ``length`` bytes of address space (anonymous, no swap accounting)."""
    got = libc.mmap(None, length, PROT_RW, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
    if got == _MAP_FAILED or got is None:
        _raise_errno("mmap")
    return int(got)


def mremap_fixed(old: int, length: int, new: int, *, keep: bool = False) -> None:
    """Move the mapping of ``[old, old + length)`` (pages and all) to ``new``,
    replacing what was there atomically; ``old`` is left unmapped, or with
    ``keep`` (private anonymous memory, Linux >= 5.7) mapped and empty."""
    flags = MREMAP_MAYMOVE | MREMAP_FIXED | (MREMAP_DONTUNMAP if keep else 0)
    got = libc.mremap(old, length, length, flags, new)
    if got == _MAP_FAILED or got != new:
        _raise_errno(f"mremap {old:#x} -> {new:#x}")


def munmap(addr: int, length: int) -> None:
    if libc.munmap(addr, length) != 0:
        _raise_errno(f"munmap at {addr:#x}")


def madvise(addr: int, length: int, advice: int) -> None:
    if libc.madvise(addr, length, advice) != 0:
        _raise_errno(f"madvise({advice}) at {addr:#x}")


class _IOVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


#: Is a ``struct iovec`` two machine words (base, length) with no padding?
_IOVEC_FLAT = ctypes.sizeof(_IOVec) == 2 * ctypes.sizeof(ctypes.c_size_t) and ctypes.sizeof(
    ctypes.c_void_p
) == ctypes.sizeof(ctypes.c_size_t)


_NR_PROCESS_MADVISE = {"x86_64": 440, "aarch64": 440}.get(os.uname().machine)
_UIO_MAXIOV = 1024
#: A pidfd of this process for process_madvise (-1: unavailable), and its pid.
_self_pidfd = -1
_self_pid = 0


def _iovecs(ranges: list[tuple[int, int]]) -> ctypes.Array[Any]:
    """An array of ``struct iovec`` for ``(start, length)`` pairs. Built as one flat
    array of words when an iovec is two of them (half the time of a structure each)."""
    if _IOVEC_FLAT:
        return (ctypes.c_size_t * (2 * len(ranges)))(*itertools.chain.from_iterable(ranges))
    return (_IOVec * len(ranges))(*[_IOVec(a, n) for a, n in ranges])


def merge_ranges(addrs: list[int], length: int) -> list[tuple[int, int]]:
    """The ranges ``[addr, addr + length)`` of ``addrs`` (any order), sorted, with
    adjacent ones merged: ``(start, length)`` pairs."""
    ranges: list[tuple[int, int]] = []
    start = end = -1
    for addr in sorted(addrs):
        if addr == end:
            end += length
            continue
        if start >= 0:
            ranges.append((start, end - start))
        start, end = addr, addr + length
    if start >= 0:
        ranges.append((start, end - start))
    return ranges


def madvise_pages(addrs: list[int], length: int, advice: int) -> None:
    """``madvise(addr, length, advice)`` for every address (adjacent ranges merged
    first): one ``process_madvise`` call on this process per 1024 ranges where
    the kernel allows it (any advice on oneself: Linux >= 5.10 for some, 6.x
    for all), else one ``madvise`` each."""
    ranges = merge_ranges(addrs, length)
    if len(ranges) == 1:
        madvise(ranges[0][0], ranges[0][1], advice)
        return
    global _self_pidfd, _self_pid
    pid = os.getpid()
    if _self_pid != pid:  # first use, or a fork() child
        _self_pid = pid
        if _self_pidfd >= 0:
            os.close(_self_pidfd)  # the parent's, inherited
        try:
            _self_pidfd = os.pidfd_open(pid) if _NR_PROCESS_MADVISE is not None else -1
        except OSError:
            _self_pidfd = -1
    for start in range(0, len(ranges), _UIO_MAXIOV):
        part = ranges[start : start + _UIO_MAXIOV]
        if _self_pidfd >= 0 and len(part) > 1:
            iov = _iovecs(part)
            done = libc.syscall(_NR_PROCESS_MADVISE, _self_pidfd, iov, len(part), advice, 0)
            if done == sum(n for _, n in part):
                continue
            if done < 0 and ctypes.get_errno() in (errno.ENOSYS, errno.EINVAL, errno.EPERM):
                os.close(_self_pidfd)
                _self_pidfd = -1  # refused here: one madvise each from now on
        for addr, n in part:  # (again: these advices are idempotent)
            madvise(addr, n, advice)


def mprotect(addr: int, length: int, prot: int) -> None:
    if libc.mprotect(addr, length, prot) != 0:
        _raise_errno(f"mprotect at {addr:#x}")


def memfd(name: str, size: int) -> int:
    """A new memfd of ``size`` bytes (sparse), close-on-exec."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return fd


def fallocate_punch(fd: int, offset: int, length: int) -> None:
    """Free ``[offset, offset + length)`` of ``fd``: reads see zeros (or fault), every
    process's mapping of the range is zapped."""
    if libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        _raise_errno("fallocate(PUNCH_HOLE)")


def allocated_bytes(fd: int) -> int:
    """Bytes the kernel has allocated for ``fd`` (its resident pages, for a memfd)."""
    return os.fstat(fd).st_blocks * 512


# -- file descriptors over a Unix socket ------------------------------------------------


def send_fds(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    """Send ``data`` with ``fds`` attached (SCM_RIGHTS); the receiver gets copies."""
    socket.send_fds(sock, [data], fds)


def recv_fds(sock: socket.socket, bufsize: int, maxfds: int) -> tuple[bytes, list[int]]:
    """Receive a message and the descriptors attached to it (close-on-exec)."""
    data, fds, _flags, _addr = socket.recv_fds(sock, bufsize, maxfds)
    return data, list(fds)


# -- userfaultfd ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Fault:
    """One page fault: the faulting address and the PF_* flags."""

    address: int
    flags: int

    @property
    def write(self) -> bool:
        return bool(self.flags & PF_WRITE)

    @property
    def wp(self) -> bool:
        return bool(self.flags & PF_WP)


_HOW_TO_ENABLE = (
    "run as root, or allow it for every user with `sysctl vm.unprivileged_userfaultfd=1`, "
    "or give this user read-write access to /dev/userfaultfd; containers also need a "
    "seccomp profile that allows the userfaultfd system call"
)


def _open_raw() -> int:
    flags = os.O_CLOEXEC | os.O_NONBLOCK
    problems: list[str] = []
    try:
        dev = os.open("/dev/userfaultfd", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        problems.append(f"/dev/userfaultfd: {exc.strerror}")
    else:
        try:
            return fcntl.ioctl(dev, USERFAULTFD_IOC_NEW, flags)
        except OSError as exc:
            problems.append(f"USERFAULTFD_IOC_NEW: {exc.strerror}")
        finally:
            os.close(dev)
    nr = _SYS_USERFAULTFD.get(os.uname().machine)
    if nr is not None:
        fd = libc.syscall(nr, flags)
        if fd >= 0:
            return int(fd)
        err = ctypes.get_errno()
        problems.append(f"userfaultfd(2): {os.strerror(err)}")
        if err == errno.ENOSYS:
            problems.append("the kernel was built without CONFIG_USERFAULTFD (needs Linux >= 5.19)")
    raise UserfaultfdUnavailable(
        "userfaultfd is unavailable (" + "; ".join(problems) + "): " + _HOW_TO_ENABLE
    )


class Userfaultfd:
    """A userfaultfd of the calling process, with the features shared-memory paging needs.

    Created in the process whose memory faults; any process holding the
    descriptor (sent with ``send_fds``) may read its faults and resolve them.
    Resolving calls take the faulting process's address (``dst``) and, for
    ``copy``, an address in the calling process (``src``).
    """

    NEEDED = FEATURE_WP_SHMEM | FEATURE_MISSING_SHMEM

    def __init__(self, fd: int | None = None) -> None:
        if fd is not None:
            self.fd = fd  # an existing descriptor (received): the API is agreed already
            return
        self.fd = _open_raw()
        try:
            buf = bytearray(struct.pack("QQQ", _UFFD_API, self.NEEDED | FEATURE_POISON, 0))
            try:
                try:
                    fcntl.ioctl(self.fd, UFFDIO_API, buf, True)
                except OSError:  # an older kernel without POISON: faults that fail wait
                    buf = bytearray(struct.pack("QQQ", _UFFD_API, self.NEEDED, 0))
                    fcntl.ioctl(self.fd, UFFDIO_API, buf, True)
            except OSError as exc:
                raise UserfaultfdUnavailable(
                    f"userfaultfd lacks missing and write-protect faults on shared memory "
                    f"({exc.strerror}); transparent paging needs Linux >= 5.19"
                ) from exc
        except BaseException:
            os.close(self.fd)
            raise

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def register(self, start: int, length: int, mode: int = MODE_MISSING | MODE_WP) -> None:
        buf = bytearray(struct.pack("QQQQ", start, length, mode, 0))
        fcntl.ioctl(self.fd, UFFDIO_REGISTER, buf, True)

    def unregister(self, start: int, length: int) -> None:
        fcntl.ioctl(self.fd, UFFDIO_UNREGISTER, struct.pack("QQ", start, length))

    def copy(self, dst: int, src: int, length: int, *, wp: bool = False, wake: bool = True) -> bool:
        """Fill ``[dst, dst + length)`` with a copy of ``src`` and wake the faulting
        threads (unless not ``wake``: then the caller wakes them). False when a
        page is already there (EEXIST; the caller wakes)."""
        mode = (COPY_WP if wp else 0) | (0 if wake else COPY_DONTWAKE)
        buf = bytearray(struct.pack("QQQQq", dst, src, length, mode, 0))
        try:
            fcntl.ioctl(self.fd, UFFDIO_COPY, buf, True)
        except FileExistsError:
            return False
        return True

    def poison(self, start: int, length: int) -> None:
        """Resolve the faults on ``[start, start + length)`` with a poisoned page: the
        access, and every later one until the range is refilled, gets SIGBUS."""
        buf = bytearray(struct.pack("QQQq", start, length, 0, 0))
        fcntl.ioctl(self.fd, UFFDIO_POISON, buf, True)

    def wake(self, start: int, length: int) -> None:
        fcntl.ioctl(self.fd, UFFDIO_WAKE, struct.pack("QQ", start, length))

    def writeprotect(self, start: int, length: int, protect: bool, *, wake: bool = True) -> None:
        """Protect (writes fault) or unprotect (and wake) ``[start, start + length)``."""
        # The kernel refuses DONTWAKE with protection (nothing waits on a protect).
        mode = WP_PROTECT if protect else (0 if wake else WP_DONTWAKE)
        buf = bytearray(struct.pack("QQQ", start, length, mode))
        fcntl.ioctl(self.fd, UFFDIO_WRITEPROTECT, buf, True)

    def read_faults(self, max_faults: int = 64) -> list[Fault]:
        """Read the pending fault messages (non-blocking: [] when none)."""
        try:
            data = os.read(self.fd, _MSG_SIZE * max_faults)
        except BlockingIOError:
            return []
        faults = []
        for pos in range(0, len(data) - _MSG_SIZE + 1, _MSG_SIZE):
            if data[pos] == EVENT_PAGEFAULT:
                flags, address = struct.unpack_from("QQ", data, pos + 8)
                faults.append(Fault(address, flags))
        return faults
