"""A stress run of the whole VM: threads, injected faults, devices coming and going.

``run_stress`` builds a VM with a small memory budget and its page daemon
thread over two swap files wrapped in fault injectors, and for a bounded
time lets ``nthreads`` worker threads write, read back and discard their
own pages (a private object each, and a disjoint slice of one shared
object), while a controller thread takes swap devices away and gives them
back (``swapoff``/``swapon``) and calls ``VM.check()``. Each worker keeps a
byte model of what it owns and compares every read with it; at the end the
faults are cleared and every byte of every object is compared once more.

Counted as failures (``StressReport.ok`` is False):

- a *lost* byte: the model has data there, the VM returns something else;
- an *invented* byte: the model has zero there (never written or
  discarded), the VM returns something else;
- a failed ``check()``, or any unexpected exception in a thread.

Expected outcomes are counted, not failures: ``DeviceError`` from an
injected fault (the operation is retried), ``SwapExhausted`` (the write
stored a prefix of its pages, as documented, and the worker learns which),
and a swapoff refused for lack of room.

Cost: the run takes ``seconds`` plus the final verification (one read of
every object). Blocks the calling thread for the whole run.
"""

from __future__ import annotations

import errno
import functools
import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from vmpager.devices.faulty import FaultyDevice
from vmpager.devices.file import FileDevice
from vmpager.errors import DeviceError, InvariantViolation, SwapExhausted
from vmpager.units import check_int
from vmpager.vm.config import VMConfig
from vmpager.vm.object import VMObject
from vmpager.vm.system import VM

__all__ = ["StressConfig", "StressReport", "make_devices", "run_stress"]

PAGE = 4096
#: Attempts of one operation that keeps failing with injected device errors.
_RETRIES = 50


@dataclass(frozen=True, slots=True)
class StressConfig:
    """What a stress run does; every count is checked by ``run_stress``."""

    seconds: float = 10.0
    nthreads: int = 8
    #: Memory budget in bytes (frames = memory // 4096).
    memory_bytes: int = 64 * PAGE
    #: Pages of each worker's private object, and of its slice of the shared one.
    private_npages: int = 96
    shared_slice_npages: int = 32
    #: Blocks of each of the two swap files.
    swap_nblocks: int = 1024
    #: Fraction of device requests failed at random (writes: EIO on one
    #: device, EAGAIN on the other; reads: EIO).
    write_error_rate: float = 0.01
    read_error_rate: float = 0.002
    #: Seconds between swapoff/swapon cycles (0: never).
    swapoff_interval_s: float = 0.5
    #: Seconds between VM.check() calls by the controller.
    check_interval_s: float = 0.25
    seed: int = 0
    #: Directory of the swap files (None: the temporary directory).
    directory: str | None = None
    #: Checksum every swapped page (``VM(integrity=)``); off, a corrupting device
    #: shows up as lost or invented bytes in the run's own verification.
    integrity: bool = True
    #: Count the ``vmpager`` log records of the run instead of letting them
    #: reach the handlers (injected faults make hundreds of warnings).
    quiet_logs: bool = True


@dataclass(slots=True)
class _Counts:
    ops: int = 0
    writes: int = 0
    reads: int = 0
    discards: int = 0
    bytes_written: int = 0
    bytes_verified: int = 0
    device_errors: int = 0
    swap_exhausted: int = 0
    lost_bytes: int = 0
    invented_bytes: int = 0
    first_mismatch: str = ""

    def add(self, other: _Counts) -> None:
        for name in (
            "ops",
            "writes",
            "reads",
            "discards",
            "bytes_written",
            "bytes_verified",
            "device_errors",
            "swap_exhausted",
            "lost_bytes",
            "invented_bytes",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        if not self.first_mismatch:
            self.first_mismatch = other.first_mismatch


@dataclass(frozen=True, slots=True)
class StressReport:
    """The outcome of a stress run; ``ok`` is False on any lost or invented byte."""

    seconds: float
    nthreads: int
    ops: int
    writes: int
    reads: int
    discards: int
    bytes_written: int
    bytes_verified: int
    lost_bytes: int
    invented_bytes: int
    first_mismatch: str
    device_errors: int
    swap_exhausted: int
    swapoffs: int
    swapons: int
    swapoff_refusals: int
    checks: int
    check_failures: list[str]
    errors: list[str]
    injected_write_errors: int
    injected_read_errors: int
    pageouts: int
    pageout_pages: int
    pageins: int
    pagein_pages: int
    write_errors: int
    bad_blocks_marked: int
    frames: int
    max_resident_npages: int
    log_warnings: int = 0
    log_errors: int = 0
    statistics: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not (self.lost_bytes or self.invented_bytes or self.check_failures or self.errors)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["ok"] = self.ok
        return out

    def summary(self) -> str:
        """A few lines for people."""
        verdict = (
            "OK: every byte read back as written"
            if self.ok
            else "FAILED: "
            + ", ".join(
                part
                for part in (
                    f"{self.lost_bytes} lost bytes" if self.lost_bytes else "",
                    f"{self.invented_bytes} invented bytes" if self.invented_bytes else "",
                    f"{len(self.check_failures)} failed checks" if self.check_failures else "",
                    f"{len(self.errors)} errors" if self.errors else "",
                )
                if part
            )
        )
        lines = [
            f"vmpager stress: {self.seconds:.1f} s, {self.nthreads} threads, "
            f"{self.frames} frames of {PAGE} B",
            f"  operations {self.ops:,} (writes {self.writes:,}, reads {self.reads:,}, "
            f"discards {self.discards:,}); {self.bytes_written:,} bytes written, "
            f"{self.bytes_verified:,} bytes verified",
            f"  paging: {self.pageout_pages:,} pages out in {self.pageouts:,} writes, "
            f"{self.pagein_pages:,} pages in in {self.pageins:,} reads; "
            f"at most {self.max_resident_npages} pages resident",
            f"  faults injected: {self.injected_write_errors} write, "
            f"{self.injected_read_errors} read; seen by callers: {self.device_errors}; "
            f"write errors {self.write_errors}, bad blocks {self.bad_blocks_marked}",
            f"  swapoff {self.swapoffs} (refused {self.swapoff_refusals}), "
            f"swapon {self.swapons}; swap exhausted {self.swap_exhausted}; "
            f"checks {self.checks}; log warnings {self.log_warnings}, errors {self.log_errors}",
            f"  {verdict}",
        ]
        if self.first_mismatch:
            lines.append(f"  first mismatch: {self.first_mismatch}")
        lines += [f"  check failed: {text}" for text in self.check_failures[:3]]
        lines += [f"  error: {text}" for text in self.errors[:3]]
        return "\n".join(lines)


def _check_config(config: StressConfig) -> None:
    if isinstance(config.seconds, bool) or not isinstance(config.seconds, (int, float)):
        raise TypeError(f"seconds must be a number, got {config.seconds!r}")
    if not 0 < config.seconds <= 86400:
        raise ValueError(f"seconds must be in (0, 86400], got {config.seconds}")
    check_int(config.nthreads, "nthreads", minimum=1, maximum=256)
    check_int(config.memory_bytes, "memory", minimum=8 * PAGE, multiple=PAGE)
    check_int(config.private_npages, "private_npages", minimum=1)
    check_int(config.shared_slice_npages, "shared_slice_npages", minimum=1)
    check_int(config.swap_nblocks, "swap_nblocks", minimum=16)
    for name in ("write_error_rate", "read_error_rate"):
        rate = getattr(config, name)
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1:
            raise ValueError(f"{name} must be in [0, 1), got {rate!r}")
    for name in ("swapoff_interval_s", "check_interval_s"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"{name} must be a number >= 0, got {value!r}")


def make_devices(config: StressConfig) -> list[FaultyDevice]:
    """Two private swap files behind fault injectors (hard write errors on the
    first, transient on the second; hard read errors on both)."""
    devices = []
    for i, write_errno in enumerate((errno.EIO, errno.EAGAIN)):
        inner = FileDevice.temporary(config.swap_nblocks, directory=config.directory)
        devices.append(
            FaultyDevice(
                inner,
                seed=config.seed * 7919 + i,
                write_error_rate=config.write_error_rate,
                read_error_rate=config.read_error_rate,
                write_errno=write_errno,
                name=f"stress{i}:{inner.name}",
            )
        )
    return devices


class _LogCounter(logging.Handler):
    """Counts records by level (thread-safe: Handler.handle takes its lock)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.warnings = 0
        self.errors = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR:
            self.errors += 1
        elif record.levelno >= logging.WARNING:
            self.warnings += 1


class _Worker:
    """One thread's objects, slices and models; ``run`` loops until ``stop``."""

    def __init__(
        self, index: int, private: VMObject, shared: VMObject, first: int, npages: int, seed: int
    ) -> None:
        self.index = index
        # (object, first page, model) for what this worker owns.
        self.areas = [
            (private, 0, bytearray(private.size)),
            (shared, first, bytearray(npages * PAGE)),
        ]
        self.rng = random.Random(seed)
        self.counts = _Counts()
        self.serial = 0

    def _retrying(self, action: Callable[[], Any]) -> Any:
        for _ in range(_RETRIES):
            try:
                return action()
            except DeviceError:
                self.counts.device_errors += 1
        return action()

    def _compare(self, where: str, offset: int, got: bytes, want: bytes | bytearray) -> None:
        self.counts.bytes_verified += len(got)
        if got == want:
            return
        lost = invented = 0
        first = -1
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            if g != w:
                if first < 0:
                    first = i
                if w:
                    lost += 1
                else:
                    invented += 1
        self.counts.lost_bytes += lost
        self.counts.invented_bytes += invented
        if not self.counts.first_mismatch:
            self.counts.first_mismatch = (
                f"thread {self.index}, {where} byte {offset + first}: "
                f"read {got[first]:#04x}, expected {want[first]:#04x}"
            )

    def step(self) -> None:
        rng = self.rng
        obj, first_page, model = self.areas[rng.randrange(2)]
        base = first_page * PAGE
        where = f"object {obj.oid}"
        start = rng.randrange(len(model))
        length = rng.randint(1, min(3 * PAGE, len(model) - start))
        action = rng.random()
        self.counts.ops += 1
        if action < 0.5:
            self.serial += 1
            unit = bytes([self.index + 1]) + self.serial.to_bytes(4, "little") + b"\x5a"
            data = (unit * (length // len(unit) + 1))[:length]
            old = bytes(model[start : start + length])
            try:
                self._retrying(lambda: obj.write(base + start, data))
            except SwapExhausted:
                # A refused write stored a prefix of its pages; learn which.
                self.counts.swap_exhausted += 1
                got = self._retrying(lambda: obj.read(base + start, length))
                self._check_prefix(where, base + start, old, data, got)
                model[start : start + length] = got
                return
            model[start : start + length] = data
            self.counts.writes += 1
            self.counts.bytes_written += length
        elif action < 0.92:
            got = self._retrying(lambda: obj.read(base + start, length))
            self._compare(where, base + start, got, model[start : start + length])
            self.counts.reads += 1
        else:
            npages = len(model) // PAGE
            page = rng.randrange(npages)
            count = rng.randint(1, min(4, npages - page))
            lo, hi = page * PAGE, (page + count) * PAGE
            try:
                self._retrying(lambda: obj.discard(base + lo, hi - lo))
            except SwapExhausted:
                # Some pages may be gone already: each is either old or zeros.
                self.counts.swap_exhausted += 1
                got = self._retrying(lambda: obj.read(base + lo, hi - lo))
                for p in range(count):
                    seg = slice(p * PAGE, (p + 1) * PAGE)
                    if any(got[seg]):
                        self._compare(where, base + lo + p * PAGE, got[seg], model[lo:hi][seg])
                model[lo:hi] = got
                return
            model[lo:hi] = bytes(hi - lo)
            self.counts.discards += 1

    def _check_prefix(self, where: str, offset: int, old: bytes, new: bytes, got: bytes) -> None:
        stored = True
        pos = 0
        while pos < len(new):
            n = min(PAGE - (offset + pos) % PAGE, len(new) - pos)
            seg = slice(pos, pos + n)
            if not (stored and got[seg] == new[seg]):
                stored = False
                self._compare(where, offset + pos, got[seg], old[seg])
            pos += n

    def verify_all(self) -> None:
        for obj, first_page, model in self.areas:
            got = self._retrying(functools.partial(obj.read, first_page * PAGE, len(model)))
            self._compare(f"object {obj.oid}", first_page * PAGE, got, model)


def run_stress(
    config: StressConfig,
    *,
    devices: Sequence[FaultyDevice] | None = None,
    progress: Callable[[float, int], None] | None = None,
) -> StressReport:
    """Run the stress described by ``config`` and return its report.

    ``devices`` replaces the two default swap files (they are used as they
    are and closed at the end). ``progress(elapsed_s, ops)`` is called about
    once a second from the calling thread. Raises ``ValueError``/``TypeError``
    for a bad config.
    """
    _check_config(config)
    logger = logging.getLogger("vmpager")
    counter = _LogCounter()
    logger.addHandler(counter)
    propagate = logger.propagate
    if config.quiet_logs:
        logger.propagate = False
    try:
        return _run(config, devices, progress, counter)
    finally:
        logger.removeHandler(counter)
        logger.propagate = propagate


def _run(
    config: StressConfig,
    devices: Sequence[FaultyDevice] | None,
    progress: Callable[[float, int], None] | None,
    counter: _LogCounter,
) -> StressReport:
    devs = list(devices) if devices is not None else make_devices(config)
    vm_config = VMConfig(cluster_max_npages=8, readaround_npages=4, swap_async_max=4)
    vm = VM(memory=config.memory_bytes, swap=devs, config=vm_config, integrity=config.integrity)
    errors: list[str] = []
    check_failures: list[str] = []
    stop = threading.Event()
    off: list[FaultyDevice] = []
    cycle = {"swapoffs": 0, "swapons": 0, "refusals": 0, "checks": 0, "max_resident": 0}
    try:
        shared = vm.allocate(config.nthreads * config.shared_slice_npages * PAGE)
        workers = [
            _Worker(
                i,
                vm.allocate(config.private_npages * PAGE),
                shared,
                i * config.shared_slice_npages,
                config.shared_slice_npages,
                config.seed * 1_000_003 + i,
            )
            for i in range(config.nthreads)
        ]

        def work(worker: _Worker) -> None:
            try:
                while not stop.is_set():
                    worker.step()
            except BaseException as exc:
                errors.append(f"thread {worker.index}: {type(exc).__name__}: {exc}")
                stop.set()

        def control() -> None:
            rng = random.Random(config.seed)
            next_swap = time.monotonic() + config.swapoff_interval_s
            try:
                while not stop.wait(config.check_interval_s):
                    try:
                        vm.check()
                    except InvariantViolation as exc:
                        check_failures.extend(exc.problems)
                    cycle["checks"] += 1
                    stats = vm.statistics()
                    cycle["max_resident"] = max(cycle["max_resident"], stats.resident_npages)
                    if config.swapoff_interval_s and time.monotonic() >= next_swap:
                        next_swap = time.monotonic() + config.swapoff_interval_s
                        _swap_cycle(vm, devs, off, rng, cycle)
            except BaseException as exc:
                errors.append(f"controller: {type(exc).__name__}: {exc}")
                stop.set()

        threads = [threading.Thread(target=work, args=(w,), daemon=True) for w in workers]
        controller = threading.Thread(target=control, daemon=True)
        start = time.monotonic()
        for t in threads:
            t.start()
        controller.start()
        deadline = start + config.seconds
        while not stop.is_set() and time.monotonic() < deadline:
            stop.wait(min(1.0, max(0.0, deadline - time.monotonic())))
            if progress is not None:
                progress(time.monotonic() - start, sum(w.counts.ops for w in workers))
        stop.set()
        for t in [*threads, controller]:
            t.join(120)
            if t.is_alive():
                errors.append(f"{t.name} did not stop within 120 s (deadlock?)")
        elapsed = time.monotonic() - start
        if not any("did not stop" in e for e in errors):
            # Everything back on, faults off, then one last look at every byte.
            for dev in off:
                vm.swapon(dev)
                cycle["swapons"] += 1
            off.clear()
            for dev in devs:
                dev.clear_faults()
            for w in workers:
                w.verify_all()
            try:
                vm.check()
            except InvariantViolation as exc:
                check_failures.extend(exc.problems)
        counts = _Counts()
        for w in workers:
            counts.add(w.counts)
        stats = vm.statistics()
        injected = [d.statistics() for d in devs]
        return StressReport(
            seconds=elapsed,
            nthreads=config.nthreads,
            ops=counts.ops,
            writes=counts.writes,
            reads=counts.reads,
            discards=counts.discards,
            bytes_written=counts.bytes_written,
            bytes_verified=counts.bytes_verified,
            lost_bytes=counts.lost_bytes,
            invented_bytes=counts.invented_bytes,
            first_mismatch=counts.first_mismatch,
            device_errors=counts.device_errors,
            swap_exhausted=counts.swap_exhausted,
            swapoffs=cycle["swapoffs"],
            swapons=cycle["swapons"],
            swapoff_refusals=cycle["refusals"],
            checks=cycle["checks"],
            check_failures=check_failures,
            errors=errors,
            injected_write_errors=sum(s.injected_write_errors for s in injected),
            injected_read_errors=sum(s.injected_read_errors for s in injected),
            pageouts=stats.pageouts,
            pageout_pages=stats.pageout_pages,
            pageins=stats.pageins,
            pagein_pages=stats.pagein_pages,
            write_errors=stats.write_errors,
            bad_blocks_marked=stats.bad_blocks_marked,
            frames=stats.nframes,
            max_resident_npages=max(cycle["max_resident"], stats.resident_npages),
            log_warnings=counter.warnings,
            log_errors=counter.errors,
            statistics={
                k: v for k, v in asdict(stats).items() if isinstance(v, (int, float, bool))
            },
        )
    finally:
        stop.set()
        vm.close()
        for dev in devs:
            dev.close()


def _swap_cycle(
    vm: VM,
    devs: list[FaultyDevice],
    off: list[FaultyDevice],
    rng: random.Random,
    cycle: dict[str, int],
) -> None:
    """Give a removed device back, or remove one (moving its pages elsewhere)."""
    if off:
        dev = off.pop()
        vm.swapon(dev)
        cycle["swapons"] += 1
        return
    dev = devs[rng.randrange(len(devs))]
    try:
        vm.swapoff(dev.name)
    except SwapExhausted:
        cycle["refusals"] += 1
        return
    except DeviceError:
        # An injected read error while moving a page: the swapoff is cancelled
        # and the device stays; the page is still there for the next try.
        cycle["refusals"] += 1
        return
    off.append(dev)
    cycle["swapoffs"] += 1
