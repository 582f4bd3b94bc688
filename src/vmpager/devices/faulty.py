"""A device wrapper that injects errors and latency, for testing the pager's error paths.

Faults come from rules on chosen blocks (``fail_reads``/``fail_writes``) or
from a seeded random rate per request. A request that gets a fault raises
``DeviceError`` before the inner device is called, so a failed write leaves
its blocks unchanged and a failed read leaves the caller's buffers unchanged.

Corruption mode: silent data corruption, which no error reports. A read can
come back with one byte flipped in one of its blocks (``corrupt_read_rate``,
or ``corrupt_reads`` rules on chosen blocks: corruption on the way), and
``corrupt_stored`` flips a byte of what the inner device holds (rot at rest).
"""

from __future__ import annotations

import errno as errno_codes
import random
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from vmpager.devices._request import DeviceCounters, as_byte_views, check_range
from vmpager.devices.protocol import BlockDevice, DeviceStatistics, ReadableBuffer, WritableBuffer
from vmpager.errors import TRANSIENT_ERRNOS, DeviceError
from vmpager.units import check_int

__all__ = ["FaultyDevice", "FaultyDeviceStatistics"]


@dataclass(frozen=True, slots=True)
class FaultyDeviceStatistics(DeviceStatistics):
    """``DeviceStatistics`` of the wrapper plus counts of what it injected.

    The base counters count the requests the wrapper completed or failed
    (injected failures and the inner device's failures alike).
    """

    injected_read_errors: int
    injected_write_errors: int
    injected_transient_errors: int
    injected_hard_errors: int
    delayed_requests: int
    #: Bytes flipped in reads and in stored blocks.
    injected_corruptions: int


@dataclass(slots=True)
class _Rule:
    """Fail requests touching ``blocks`` with ``errno``; ``remaining`` uses (None: forever)."""

    blocks: frozenset[int]
    errno: int
    remaining: int | None


def _check_rate(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float in [0, 1], got {value!r}")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return float(value)


def _check_errno(value: int, name: str) -> int:
    number = check_int(value, name, minimum=1)
    if number not in errno_codes.errorcode:
        raise ValueError(f"{name} must be a known errno value, got {number}")
    return number


class FaultyDevice:
    """Wraps ``inner`` and makes chosen requests fail or wait.

    ``read_error_rate``/``write_error_rate`` fail that fraction of requests
    (drawn from ``random.Random(seed)``, so a single-threaded run repeats
    exactly) with ``read_errno``/``write_errno``. ``latency_s`` is slept
    before every read, write and flush. Rules added with ``fail_reads`` and
    ``fail_writes`` fail every request that touches one of their blocks,
    checked before the rates. Bad requests (out of range, wrong buffers)
    raise ``ValueError``/``TypeError`` as the inner device would, never an
    injected error. Thread-safe; the wrapper owns ``inner`` and closes it.
    """

    def __init__(
        self,
        inner: BlockDevice,
        *,
        seed: int = 0,
        read_error_rate: float = 0.0,
        write_error_rate: float = 0.0,
        read_errno: int = errno_codes.EIO,
        write_errno: int = errno_codes.EIO,
        latency_s: float = 0.0,
        corrupt_read_rate: float = 0.0,
        name: str | None = None,
    ) -> None:
        self._inner = inner
        self._name = name if name is not None else f"faulty:{inner.name}"
        self._random = random.Random(check_int(seed, "seed", minimum=-(1 << 63)))
        self.read_error_rate = read_error_rate
        self.write_error_rate = write_error_rate
        self._read_errno = _check_errno(read_errno, "read_errno")
        self._write_errno = _check_errno(write_errno, "write_errno")
        self.latency_s = latency_s
        self._lock = threading.Lock()
        self._read_rules: list[_Rule] = []
        self._write_rules: list[_Rule] = []
        self._counters = DeviceCounters()
        self._injected_reads = 0
        self._injected_writes = 0
        self._injected_transient = 0
        self._injected_hard = 0
        self._delayed = 0
        self.corrupt_read_rate = corrupt_read_rate
        self._corrupt_rules: list[_Rule] = []
        self._corruptions = 0
        self._closed = False

    # Settings that tests change while the device is in use.

    @property
    def read_error_rate(self) -> float:
        """Fraction of read requests failed at random."""
        return self._read_error_rate

    @read_error_rate.setter
    def read_error_rate(self, value: float) -> None:
        self._read_error_rate = _check_rate(value, "read_error_rate")

    @property
    def write_error_rate(self) -> float:
        """Fraction of write requests failed at random."""
        return self._write_error_rate

    @write_error_rate.setter
    def write_error_rate(self, value: float) -> None:
        self._write_error_rate = _check_rate(value, "write_error_rate")

    @property
    def latency_s(self) -> float:
        """Seconds slept before each read, write and flush."""
        return self._latency_s

    @latency_s.setter
    def latency_s(self, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"latency_s must be a number >= 0, got {value!r}")
        self._latency_s = float(value)

    def fail_reads(
        self, blocks: Iterable[int], errno: int = errno_codes.EIO, times: int | None = None
    ) -> None:
        """Fail the next ``times`` read requests (None: all) that touch any of ``blocks``."""
        self._add_rule(self._read_rules, blocks, errno, times)

    def fail_writes(
        self, blocks: Iterable[int], errno: int = errno_codes.EIO, times: int | None = None
    ) -> None:
        """Fail the next ``times`` write requests (None: all) that touch any of ``blocks``."""
        self._add_rule(self._write_rules, blocks, errno, times)

    @property
    def corrupt_read_rate(self) -> float:
        """Fraction of read requests returned with one byte flipped, in [0, 1]."""
        return self._corrupt_read_rate

    @corrupt_read_rate.setter
    def corrupt_read_rate(self, value: float) -> None:
        self._corrupt_read_rate = _check_rate(value, "corrupt_read_rate")

    def corrupt_reads(self, blocks: Iterable[int], times: int | None = None) -> None:
        """Flip one byte of each of ``blocks`` in the next ``times`` reads (None: all)
        that return it; the stored data stays intact."""
        self._add_rule(self._corrupt_rules, blocks, errno_codes.EIO, times)

    def corrupt_stored(self, blocks: Iterable[int], *, offset: int = 0) -> None:
        """Flip byte ``offset`` of each of ``blocks`` on the inner device (read, flip, write)."""
        offset = check_int(offset, "offset", minimum=0, maximum=self.block_size - 1)
        self._check_open()
        for blk in blocks:
            check_int(blk, "blocks[]", minimum=0, maximum=self.nblocks - 1)
            buffer = bytearray(self.block_size)
            self._inner.read_blocks(blk, [buffer])
            buffer[offset] ^= 0xFF
            self._inner.write_blocks(blk, [buffer])
            with self._lock:
                self._corruptions += 1

    def _corrupt_read(self, blk: int, views: list[memoryview]) -> None:
        """Flip bytes of a read just done, as the rules and the rate say."""
        size = self.block_size
        nblocks = sum(len(v) for v in views) // size
        flips: list[tuple[int, int]] = []  # (block of the request, byte in it)
        with self._lock:
            for rule in list(self._corrupt_rules):
                hit = sorted(b - blk for b in rule.blocks if blk <= b < blk + nblocks)
                if not hit:
                    continue
                flips.extend((k, self._random.randrange(size)) for k in hit)
                if rule.remaining is not None:
                    rule.remaining -= 1
                    if rule.remaining == 0:
                        self._corrupt_rules.remove(rule)
            rate = self._corrupt_read_rate
            if rate > 0 and self._random.random() < rate:
                flips.append((self._random.randrange(nblocks), self._random.randrange(size)))
            self._corruptions += len(flips)
        for k, byte in flips:
            at = k * size + byte
            for view in views:
                if at < len(view):
                    view[at] ^= 1 << (byte % 8)
                    break
                at -= len(view)

    def clear_faults(self) -> None:
        """Drop every rule and set the error and corruption rates to zero (latency is kept)."""
        with self._lock:
            self._read_rules.clear()
            self._write_rules.clear()
            self._corrupt_rules.clear()
            self._corrupt_read_rate = 0.0
            self._read_error_rate = 0.0
            self._write_error_rate = 0.0

    def _add_rule(
        self, rules: list[_Rule], blocks: Iterable[int], errno: int, times: int | None
    ) -> None:
        chosen = frozenset(
            check_int(block, "blocks[]", minimum=0, maximum=self._inner.nblocks - 1)
            for block in blocks
        )
        if not chosen:
            raise ValueError("blocks must name at least one block")
        remaining = None if times is None else check_int(times, "times", minimum=1)
        rule = _Rule(chosen, _check_errno(errno, "errno"), remaining)
        with self._lock:
            rules.append(rule)

    @property
    def inner(self) -> BlockDevice:
        """The wrapped device."""
        return self._inner

    @property
    def name(self) -> str:
        """``faulty:<inner name>`` unless a name was given."""
        return self._name

    @property
    def block_size(self) -> int:
        """The inner device's block size."""
        return self._inner.block_size

    @property
    def nblocks(self) -> int:
        """The inner device's number of blocks."""
        return self._inner.nblocks

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"{self._name}: device is closed")

    def _delay(self) -> None:
        if self._latency_s > 0:
            with self._lock:
                self._delayed += 1
            time.sleep(self._latency_s)

    def _injected_errno(self, blk: int, nblocks: int, *, write: bool) -> int | None:
        """The errno to fail this request with, or None; consumes one use of a rule."""
        rules = self._write_rules if write else self._read_rules
        rate = self._write_error_rate if write else self._read_error_rate
        with self._lock:
            for index, rule in enumerate(rules):
                if not rule.blocks.isdisjoint(range(blk, blk + nblocks)):
                    if rule.remaining is not None:
                        rule.remaining -= 1
                        if rule.remaining == 0:
                            del rules[index]
                    return self._count_injection(rule.errno, write=write)
            if rate > 0 and self._random.random() < rate:
                err = self._write_errno if write else self._read_errno
                return self._count_injection(err, write=write)
        return None

    def _count_injection(self, err: int, *, write: bool) -> int:
        if write:
            self._injected_writes += 1
        else:
            self._injected_reads += 1
        if err in TRANSIENT_ERRNOS:
            self._injected_transient += 1
        else:
            self._injected_hard += 1
        return err

    def read_blocks(self, blk: int, buffers: Sequence[WritableBuffer]) -> None:
        """Read through the inner device unless a fault is injected (``DeviceError``)."""
        self._check_open()
        views, nblocks = as_byte_views(
            self._name, self.nblocks, self.block_size, blk, buffers, writable=True
        )
        self._delay()
        err = self._injected_errno(blk, nblocks, write=False)
        try:
            if err is not None:
                raise DeviceError(err, self._name, blk, "injected")
            self._inner.read_blocks(blk, buffers)
        except DeviceError:
            self._counters.count_read_error()
            raise
        if self._corrupt_rules or self._corrupt_read_rate:
            self._corrupt_read(blk, views)
        self._counters.count_read(nblocks)

    def write_blocks(self, blk: int, buffers: Sequence[ReadableBuffer]) -> None:
        """Write through the inner device unless a fault is injected (blocks then unchanged)."""
        self._check_open()
        _, nblocks = as_byte_views(
            self._name, self.nblocks, self.block_size, blk, buffers, writable=False
        )
        self._delay()
        err = self._injected_errno(blk, nblocks, write=True)
        try:
            if err is not None:
                raise DeviceError(err, self._name, blk, "injected")
            self._inner.write_blocks(blk, buffers)
        except DeviceError:
            self._counters.count_write_error()
            raise
        self._counters.count_write(nblocks)

    def discard(self, blk: int, nblocks: int) -> None:
        """Pass the discard on (never faulted: discard is advisory)."""
        self._check_open()
        check_range(self._name, self.nblocks, blk, check_int(nblocks, "nblocks", minimum=1))
        self._inner.discard(blk, nblocks)
        self._counters.count_discard()

    def flush(self) -> None:
        """Pass the flush on after the injected latency."""
        self._check_open()
        self._delay()
        self._inner.flush()
        self._counters.count_flush()

    def close(self) -> None:
        """Close the inner device. Idempotent; later calls raise ``ValueError``."""
        if not self._closed:
            self._closed = True
            self._inner.close()

    def statistics(self) -> FaultyDeviceStatistics:
        """The wrapper's counters and its injected-fault counts."""
        base = self._counters.snapshot(self._name, self.block_size, self.nblocks)
        with self._lock:
            return FaultyDeviceStatistics(
                name=base.name,
                block_size=base.block_size,
                nblocks=base.nblocks,
                read_ops=base.read_ops,
                write_ops=base.write_ops,
                blocks_read=base.blocks_read,
                blocks_written=base.blocks_written,
                discard_ops=base.discard_ops,
                flush_ops=base.flush_ops,
                read_errors=base.read_errors,
                write_errors=base.write_errors,
                injected_read_errors=self._injected_reads,
                injected_write_errors=self._injected_writes,
                injected_transient_errors=self._injected_transient,
                injected_hard_errors=self._injected_hard,
                delayed_requests=self._delayed,
                injected_corruptions=self._corruptions,
            )

    def __enter__(self) -> FaultyDevice:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"FaultyDevice({self._inner!r}, name={self._name!r})"
