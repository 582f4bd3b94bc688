"""What the NBD server serves: the ``Backend`` protocol and a sparse in-memory backend.

A backend is a byte-addressed disk of ``size_bytes`` bytes. The server checks
every request against the export size before calling the backend, so a
backend sees only ranges inside ``[0, size_bytes)``; offsets and lengths are
byte counts with no alignment promised (the NBD minimum block size is 1), so
a backend whose storage is page-grained does read-modify-write itself.

Calls may come from several connection threads at once, for overlapping
ranges too (clients that overlap in-flight requests get whatever order the
backend picks, but each call must be atomic with respect to the backend's own
structures). Every call blocks until done. Errors are exceptions: an
``OSError`` (``vmpager.errors.DeviceError`` is one) whose errno the server
maps to an NBD error, ``ValueError`` for ``NBD_EINVAL``,
``vmpager.errors.SwapExhausted`` for ``NBD_ENOSPC``; anything else is
reported to the client as ``NBD_EIO`` and logged.

The server never closes a backend: whoever built it owns it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from vmpager.errors import InvariantViolation
from vmpager.nbd.protocol import NBD_STATE_HOLE, NBD_STATE_ZERO
from vmpager.units import check_int

__all__ = [
    "Backend",
    "MemoryBackend",
    "MemoryBackendStatistics",
    "ReadableBuffer",
]

#: What ``Backend.write`` accepts. The buffer is only valid during the call: a
#: backend that keeps the data must copy it (the server reuses its receive buffer).
ReadableBuffer = bytes | bytearray | memoryview

#: Extent flags for a range with no data behind it (``base:allocation``).
HOLE_FLAGS = NBD_STATE_HOLE | NBD_STATE_ZERO


@runtime_checkable
class Backend(Protocol):
    """A disk the NBD server exports (see the module docstring for the shared contract)."""

    @property
    def size_bytes(self) -> int:
        """Export size in bytes; fixed for the backend's lifetime."""
        ...

    @property
    def block_size(self) -> int:
        """Preferred I/O size in bytes (a power of two, 512..65536): the page size.

        Requests aligned to it avoid read-modify-write; it is advertised as
        the NBD preferred block size.
        """
        ...

    @property
    def fast_zero(self) -> bool:
        """True when ``write_zeroes`` is always faster than writing the same zeroes.

        When False, a client's ``NBD_CMD_FLAG_FAST_ZERO`` request fails at once
        with ``NBD_ENOTSUP`` and the backend is not called.
        """
        ...

    def read_into(self, offset: int, buffer: memoryview) -> None:
        """Fill ``buffer`` with the bytes at ``offset``; never-written bytes read as zero."""
        ...

    def write(self, offset: int, data: ReadableBuffer, *, fua: bool = False) -> None:
        """Store ``data`` at ``offset``; later reads (from any connection) see it.

        With ``fua`` the data must be on stable storage before returning.
        """
        ...

    def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        """Discard the range: its storage may be freed; its contents become unspecified.

        (Backends in this project make it read as zeros, as a discarded page does.)
        """
        ...

    def write_zeroes(self, offset: int, length: int, *, may_trim: bool, fua: bool = False) -> None:
        """Make the range read as zeros.

        ``may_trim`` allows freeing the storage (leaving a hole); without it
        the range stays allocated (``NBD_CMD_FLAG_NO_HOLE``).
        """
        ...

    def flush(self) -> None:
        """Put every write that has returned on stable storage (for all connections)."""
        ...

    def cache(self, offset: int, length: int) -> None:
        """Hint that the range will be read soon; may do nothing."""
        ...

    def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        """Allocation status of a prefix of the range, as ``(length, flags)`` pairs.

        The pairs cover ``[offset, offset + covered)`` in order without gaps,
        each length positive, ``covered`` at least 1 and at most ``length``;
        flags combine ``NBD_STATE_HOLE`` (no storage behind it) and
        ``NBD_STATE_ZERO`` (reads as zeros). Returning less than the whole
        range is allowed when the rest is costly to find out.
        """
        ...

    def close(self) -> None:
        """Release the backend's resources (the server never calls this)."""
        ...


@dataclass(frozen=True, slots=True)
class MemoryBackendStatistics:
    """Counters of one ``MemoryBackend`` since it was made."""

    size_bytes: int
    block_size: int
    npages_allocated: int
    read_ops: int
    write_ops: int
    trim_ops: int
    zero_ops: int
    flush_ops: int
    cache_ops: int
    extents_ops: int
    bytes_read: int
    bytes_written: int


class MemoryBackend:
    """A sparse RAM disk: a dict from page index to a ``block_size`` bytearray.

    A page exists only where data was written (or zeroes were written with
    ``may_trim=False``), so ``extents`` reports holes exactly. Trim and
    ``write_zeroes(may_trim=True)`` drop whole pages, zero the covered part of
    partial pages, and drop a partial page that ends up all zeros: discarded
    bytes always read back as zeros. One lock serialises all calls; each
    call costs O(pages touched). Used by the tests and as the benchmark's
    reference backend.
    """

    def __init__(self, size_bytes: int, block_size: int = 4096) -> None:
        self._size_bytes = check_int(size_bytes, "size_bytes", minimum=0, maximum=(1 << 63) - 1)
        self._block_size = check_int(block_size, "block_size", minimum=512, maximum=65536)
        if self._block_size & (self._block_size - 1):
            raise ValueError(f"block_size must be a power of two in [512, 65536], got {block_size}")
        self._pages: dict[int, bytearray] = {}
        self._zero_page = bytes(self._block_size)
        self._lock = threading.Lock()
        self._closed = False
        self._read_ops = 0
        self._write_ops = 0
        self._trim_ops = 0
        self._zero_ops = 0
        self._flush_ops = 0
        self._cache_ops = 0
        self._extents_ops = 0
        self._bytes_read = 0
        self._bytes_written = 0

    # -- properties -----------------------------------------------------------------------

    @property
    def size_bytes(self) -> int:
        """Export size in bytes."""
        return self._size_bytes

    @property
    def block_size(self) -> int:
        """Page size in bytes."""
        return self._block_size

    @property
    def fast_zero(self) -> bool:
        """Always True: zeroing drops or clears pages and moves no data."""
        return True

    @property
    def npages_allocated(self) -> int:
        """Pages that hold storage (the rest are holes)."""
        return len(self._pages)

    # -- I/O ------------------------------------------------------------------------------

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self._size_bytes:
            raise ValueError(
                f"range [offset={offset}, +length={length}) must lie in [0, {self._size_bytes})"
            )

    def read_into(self, offset: int, buffer: memoryview) -> None:
        """Copy the bytes at ``offset`` into ``buffer``; holes give zeros."""
        length = len(buffer)
        self._check_range(offset, length)
        bs = self._block_size
        pages = self._pages
        with self._lock:
            self._read_ops += 1
            self._bytes_read += length
            pos = 0
            while pos < length:
                index, in_page = divmod(offset + pos, bs)
                n = min(bs - in_page, length - pos)
                page = pages.get(index)
                if page is None:
                    buffer[pos : pos + n] = self._zero_page[:n]
                elif n == bs:
                    buffer[pos : pos + n] = page
                else:
                    buffer[pos : pos + n] = page[in_page : in_page + n]
                pos += n

    def write(self, offset: int, data: ReadableBuffer, *, fua: bool = False) -> None:
        """Copy ``data`` into the pages at ``offset``, allocating pages as needed."""
        view = data if isinstance(data, memoryview) and data.format == "B" else memoryview(data)
        view = view.cast("B") if view.ndim != 1 or view.format != "B" else view
        length = len(view)
        self._check_range(offset, length)
        bs = self._block_size
        pages = self._pages
        with self._lock:
            self._write_ops += 1
            self._bytes_written += length
            if length == bs and not offset % bs:
                # One aligned page, the common case: a single copy, no zero-fill.
                index = offset // bs
                page = pages.get(index)
                if page is None:
                    pages[index] = bytearray(view)
                else:
                    page[:] = view
                return
            pos = 0
            while pos < length:
                index, in_page = divmod(offset + pos, bs)
                n = min(bs - in_page, length - pos)
                page = pages.get(index)
                if page is None:
                    page = pages[index] = bytearray(bs)
                page[in_page : in_page + n] = view[pos : pos + n]
                pos += n

    def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        """Free the range's pages; partially covered pages get zeros there."""
        self._check_range(offset, length)
        with self._lock:
            self._trim_ops += 1
            self._zero_locked(offset, length, may_trim=True)

    def write_zeroes(self, offset: int, length: int, *, may_trim: bool, fua: bool = False) -> None:
        """Zero the range; with ``may_trim`` as ``trim``, else keeping every page allocated."""
        self._check_range(offset, length)
        with self._lock:
            self._zero_ops += 1
            self._zero_locked(offset, length, may_trim=may_trim)

    def _zero_locked(self, offset: int, length: int, *, may_trim: bool) -> None:
        if length == 0:
            return
        bs = self._block_size
        pages = self._pages
        end = offset + length
        first_full = -(-offset // bs)  # first page wholly inside the range
        end_full = end // bs  # one past the last page wholly inside the range
        partials: list[tuple[int, int]] = []
        if offset % bs:
            partials.append((offset, min(end, first_full * bs)))
        if end % bs and end_full >= first_full:
            partials.append((end_full * bs, end))
        for start, stop in partials:
            index = start // bs
            page = pages.get(index)
            if page is None:
                if may_trim:
                    continue
                page = pages[index] = bytearray(bs)
            page[start - index * bs : stop - index * bs] = self._zero_page[: stop - start]
            if may_trim and page == self._zero_page:
                del pages[index]
        if first_full >= end_full:
            return
        if may_trim:
            if end_full - first_full <= len(pages):
                for index in range(first_full, end_full):
                    pages.pop(index, None)
            else:
                for index in [i for i in pages if first_full <= i < end_full]:
                    del pages[index]
        else:
            for index in range(first_full, end_full):
                page = pages.get(index)
                if page is None:
                    pages[index] = bytearray(bs)
                else:
                    page[:] = self._zero_page

    def flush(self) -> None:
        """Nothing to persist in RAM; counted only."""
        with self._lock:
            self._flush_ops += 1

    def cache(self, offset: int, length: int) -> None:
        """Nothing to prefetch in RAM; checks the range and counts the call."""
        self._check_range(offset, length)
        with self._lock:
            self._cache_ops += 1

    def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        """Exact runs over the whole range: holes as HOLE|ZERO, all-zero pages as ZERO, data 0.

        Costs O(min(pages in range, pages allocated · log)).
        """
        self._check_range(offset, length)
        if length == 0:
            return []
        bs = self._block_size
        end = offset + length
        result: list[tuple[int, int]] = []
        with self._lock:
            self._extents_ops += 1
            for first, npages, flags in self._page_runs(offset // bs, (end - 1) // bs + 1):
                start = max(offset, first * bs)
                stop = min(end, (first + npages) * bs)
                if result and result[-1][1] == flags:
                    result[-1] = (result[-1][0] + stop - start, flags)
                else:
                    result.append((stop - start, flags))
        return result

    def _page_runs(self, first: int, stop: int) -> list[tuple[int, int, int]]:
        """``(first_page, npages, flags)`` runs of equal flags covering pages [first, stop)."""
        pages = self._pages
        zero = self._zero_page
        if stop - first <= 2 * len(pages) + 16:
            indices = [i for i in range(first, stop) if i in pages]
        else:
            indices = sorted(i for i in pages if first <= i < stop)
        runs: list[tuple[int, int, int]] = []

        def add(start: int, npages: int, flags: int) -> None:
            if runs and runs[-1][2] == flags:
                runs[-1] = (runs[-1][0], runs[-1][1] + npages, flags)
            else:
                runs.append((start, npages, flags))

        cursor = first
        for index in indices:
            if index > cursor:
                add(cursor, index - cursor, HOLE_FLAGS)
            add(index, 1, NBD_STATE_ZERO if pages[index] == zero else 0)
            cursor = index + 1
        if cursor < stop:
            add(cursor, stop - cursor, HOLE_FLAGS)
        return runs

    def close(self) -> None:
        """Drop all pages."""
        with self._lock:
            self._pages.clear()
            self._closed = True

    # -- introspection --------------------------------------------------------------------

    def statistics(self) -> MemoryBackendStatistics:
        """A consistent snapshot of the counters."""
        with self._lock:
            return MemoryBackendStatistics(
                size_bytes=self._size_bytes,
                block_size=self._block_size,
                npages_allocated=len(self._pages),
                read_ops=self._read_ops,
                write_ops=self._write_ops,
                trim_ops=self._trim_ops,
                zero_ops=self._zero_ops,
                flush_ops=self._flush_ops,
                cache_ops=self._cache_ops,
                extents_ops=self._extents_ops,
                bytes_read=self._bytes_read,
                bytes_written=self._bytes_written,
            )

    def check(self) -> None:
        """Assert that every page lies inside the export and is exactly one block long."""
        problems: list[str] = []
        npages_total = -(-self._size_bytes // self._block_size)
        with self._lock:
            for index, page in self._pages.items():
                if not 0 <= index < npages_total:
                    problems.append(f"page {index} outside [0, {npages_total})")
                if len(page) != self._block_size:
                    problems.append(f"page {index} has {len(page)} bytes, not {self._block_size}")
            if self._closed and self._pages:
                problems.append(f"closed backend still holds {len(self._pages)} pages")
        if problems:
            raise InvariantViolation(problems)

    def __repr__(self) -> str:
        return (
            f"MemoryBackend(size_bytes={self._size_bytes}, block_size={self._block_size}, "
            f"npages_allocated={len(self._pages)})"
        )
