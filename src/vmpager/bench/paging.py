"""``vmpager bench``: the standard paging workload on vmpager and on the kernel's swap.

For every repetition and pattern (seq, random, zipf), in one process and
alternating who goes first, this runs

* ``vmpager``: ``VM(memory=...)``, an object of the workload's size, the fill
  and the access loop of ``vmpager run`` (per access one ``obj.read`` of 8
  bytes and one ``obj.write`` of 8 bytes), then the verification of every
  page and ``vm.check()``;
* ``vmpager-batch`` (variant ``batch``): the same accesses through the
  batched calls ``obj.read_words`` / ``obj.write_words``, ``batch`` accesses
  per call pair;
* ``vmpager-mapped`` (variant ``mapped``): the workload as plain numpy
  indexing on a mapped array (``vm.array``; ``a[w] = a[w] + 1`` per access,
  the page faults served by the VM's pager process through userfaultfd,
  ``vmpager run --mapped``), with its own private swap file; needs
  userfaultfd (Linux, root or ``vm.unprivileged_userfaultfd=1``);
* ``kernel``: ``kworkload.c`` (shipped with the package, compiled on the
  spot) in a memory cgroup limited to the same memory, swapping to a swap
  file of its own on the same disk (``vmpager.bench.kernel``), when running
  as root on Linux with swapon, a memory cgroup and a C compiler;
* ``kernel-batch`` (variant ``batch``): the same C program calling
  madvise(MADV_WILLNEED) on the pages of each window of ``batch`` accesses
  before making them: the kernel's counterpart of the batched calls;

and reports accesses per second, the ratio vmpager / kernel of each
repetition and their medians, faults, pages in and out, I/O operations,
bytes written per page swapped out and CPU time per access. Optionally, in
the same run: the disk's sequential write bandwidth with vmpager's write
size, vmpager's pageout throughput, and the resident hit path.

:func:`run_bench` returns the report (a JSON-ready dict whose fields
``benchmarks/paging_report.py`` renders); :func:`ratio_rows` is its table of
ratios. Blocks for the whole run: minutes at the standard size.
"""

from __future__ import annotations

import contextlib
import cProfile
import dataclasses
import importlib
import importlib.util
import mmap
import os
import pstats
import resource
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from vmpager.bench import kernel, loop
from vmpager.console import Bar, Console
from vmpager.devices.file import FileDevice
from vmpager.devices.memory import MemoryDevice
from vmpager.vm.config import VMConfig
from vmpager.vm.system import VM
from vmpager.workload import DEFAULT_ACCESSES, DEFAULT_PASSES, PATTERNS, Workload

__all__ = [
    "BenchError",
    "BenchOptions",
    "disk_write_bandwidth",
    "have_matplotlib",
    "hit_path",
    "kernel_plan",
    "pageout_throughput",
    "parse_config",
    "plot",
    "ratio_rows",
    "run_bench",
    "summarize",
]

MIB = 1 << 20
WORKLOAD_PAGE = 4096


class _NoBar:
    def update(self, done: int) -> None:
        pass

    def finish(self) -> None:
        pass


_QUIET = _NoBar()


class BenchError(RuntimeError):
    """The benchmark cannot do what it was asked (kernel side impossible, bad pages...)."""


@dataclasses.dataclass(frozen=True)
class BenchOptions:
    """What ``run_bench`` runs. Sizes in bytes; both must be whole MiB (the cgroup's unit)."""

    size: int = 2048 * MIB
    memory: int = 512 * MIB
    patterns: tuple[str, ...] = PATTERNS
    variants: tuple[str, ...] = ("loop",)
    batch: int = 4096
    reps: int = 1
    #: "auto" (when possible), "yes" (fail when not possible) or "no".
    kernel: str = "auto"
    accesses: int | None = None
    page_size: int = 4096
    #: "file" (a private swap file in swap_dir) or "ram" (software cost alone).
    device: str = "file"
    swap_dir: str = dataclasses.field(default_factory=tempfile.gettempdir)
    config: VMConfig = dataclasses.field(default_factory=VMConfig)
    disk: bool = False
    hit_path: bool = False
    profile: bool = False

    def __post_init__(self) -> None:
        if self.size <= 0 or self.size % MIB:
            raise ValueError(f"size must be a positive whole number of MiB, got {self.size}")
        if self.memory <= 0 or self.memory % MIB:
            raise ValueError(f"memory must be a positive whole number of MiB, got {self.memory}")
        npages = self.size // WORKLOAD_PAGE
        if "zipf" in self.patterns and npages & (npages - 1):
            raise ValueError(
                f"size must be a power of two for the zipf pattern (256M, 2G...), got {self.size}"
            )
        for pattern in self.patterns:
            if pattern not in PATTERNS:
                raise ValueError(f"patterns: {pattern!r} is not one of {', '.join(PATTERNS)}")
        if not self.patterns:
            raise ValueError("patterns: give at least one of seq, random, zipf")
        if not self.variants or not set(self.variants) <= {"loop", "batch", "mapped"}:
            raise ValueError(
                f"variants must be some of loop, batch, mapped, got {','.join(self.variants)}"
            )
        if self.kernel not in ("auto", "yes", "no"):
            raise ValueError(f"kernel must be auto, yes or no, got {self.kernel!r}")
        if self.device not in ("file", "ram"):
            raise ValueError(f"device must be file or ram, got {self.device!r}")
        if self.reps < 1:
            raise ValueError(f"reps must be >= 1, got {self.reps}")
        if self.batch < 1:
            raise ValueError(f"batch must be >= 1, got {self.batch}")

    @property
    def mib(self) -> int:
        return self.size // MIB

    @property
    def limit_mib(self) -> int:
        return self.memory // MIB


# ---- the machine and its load --------------------------------------------------------------


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def _cpu_seconds() -> float:
    """User + system CPU of this process (all threads) so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _thread_cpu() -> dict[str, float]:
    """CPU seconds (user + system) of each live thread of this process, by thread name."""
    ticks = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for thread in threading.enumerate():
        tid = thread.native_id
        try:
            fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        name = "main" if thread is threading.main_thread() else thread.name
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / ticks
    return out


def _disk_of(path: str | Path) -> str | None:
    """The block device (e.g. ``vda``) holding ``path``, for /proc/diskstats."""
    try:
        dev = os.stat(path).st_dev
        name = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}").resolve().name
    except OSError:
        return None
    parent = Path(f"/sys/class/block/{name}/..").resolve()
    if (parent / "stat").exists() and parent.name != "block":
        return parent.name
    return name


def _diskstats(disk: str | None) -> tuple[int, int, int, int]:
    """(read ops, sectors read, write ops, sectors written) of ``disk``, all processes."""
    if disk is None:
        return (0, 0, 0, 0)
    for line in Path("/proc/diskstats").read_text().splitlines():
        fields = line.split()
        if len(fields) > 9 and fields[2] == disk:
            return (int(fields[3]), int(fields[5]), int(fields[7]), int(fields[9]))
    return (0, 0, 0, 0)


class _SwapFactory:
    """Fresh swap devices for each VM: a private unlinked file on ``directory``, or RAM.

    Calling it returns the device list for ``VM(swap=...)`` and remembers the
    devices; ``close_all`` closes them (the VM does not own devices it is given).
    """

    def __init__(self, kind: str, nblocks: int, block_size: int, directory: str) -> None:
        self.kind = kind
        self.nblocks = nblocks
        self.block_size = block_size
        self.directory = directory
        self._open: list[Any] = []

    def __call__(self) -> list[Any]:
        self.close_all()
        if self.kind == "ram":
            device: Any = MemoryDevice(self.nblocks, block_size=self.block_size)
        else:
            device = FileDevice.temporary(
                self.nblocks, block_size=self.block_size, directory=self.directory
            )
        self._open.append(device)
        return [device]

    def close_all(self) -> None:
        for device in self._open:
            device.close()
        self._open.clear()


# ---- disk bandwidth and pageout throughput ------------------------------------------------


def disk_write_bandwidth(
    directory: str, write_kib: int, seconds: float = 2.0, file_mib: int = 1024
) -> dict[str, Any]:
    """Sequential O_DIRECT ``pwritev`` of ``write_kib`` KiB at a time into a fresh file.

    The ceiling for pageout throughput: the same write size vmpager uses, one
    write in flight, no page cache. Blocks for about ``seconds``.
    """
    fd, path = tempfile.mkstemp(prefix="paging-bench-", suffix=".dat", dir=directory)
    os.close(fd)
    size = write_kib * 1024
    buf = mmap.mmap(-1, size)
    buf.write(os.urandom(size))
    try:
        fd = os.open(path, os.O_RDWR | os.O_DIRECT)
        os.ftruncate(fd, file_mib * MIB)
        written = 0
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            os.pwritev(fd, [buf], written % (file_mib * MIB))
            written += size
        elapsed = time.perf_counter() - start
        os.close(fd)
    finally:
        os.unlink(path)
        buf.close()
    return {
        "write_kib": write_kib,
        "mib_per_s": round(written / MIB / elapsed, 1),
        "pages_per_s": round(written / WORKLOAD_PAGE / elapsed),
    }


def pageout_throughput(
    limit_mib: int, config: VMConfig, swap: Any, page_size: int
) -> dict[str, Any]:
    """Pages written out per second, two ways, once memory is full of dirty pages.

    * ``drain``: the page daemon's path alone: memory full of dirty pages
      (written by ``write_pages``), then ``vm.pageout(asynchronous=True)``
      of all but a few frames and the wait for the writes;
    * ``while_writing``: a program writes twice the budget more in 256 KiB
      ``write`` calls while the daemon pages out behind it; the clock runs
      from the first page that must push another out to the last completion.
    """
    npages = limit_mib * MIB // page_size
    chunk = np.full(64 * page_size, 0x5A, dtype=np.uint8).tobytes()
    with VM(memory=f"{limit_mib}M", swap=swap(), page_size=page_size, config=config) as vm:
        obj = vm.allocate(3 * limit_mib * MIB)
        keep = max(vm.free_target_nframes, 64)
        rows = np.full((npages - keep, page_size), 0x5A, dtype=np.uint8)
        obj.write_pages(np.arange(npages - keep), rows)
        vm.wait_idle()
        before = vm.statistics().pageout_pages
        start = time.perf_counter()
        vm.pageout(npages - 2 * keep, asynchronous=True)
        vm.wait_idle()
        drain_s = time.perf_counter() - start
        drained = vm.statistics().pageout_pages - before
        # Refill memory, then write twice the budget more while paging out.
        obj.write_pages(np.arange(npages - keep), rows)
        vm.wait_idle()
        before = vm.statistics().pageout_pages
        start = time.perf_counter()
        for offset in range(npages * page_size, 3 * npages * page_size, len(chunk)):
            obj.write(offset, chunk)
        vm.wait_idle()
        writing_s = time.perf_counter() - start
        written = vm.statistics().pageout_pages - before
        cluster = vm.statistics().mean_cluster_npages
    return {
        "memory_mib": limit_mib,
        "drain_pages": drained,
        "drain_s": round(drain_s, 3),
        "drain_mib_per_s": round(drained * page_size / MIB / drain_s, 1),
        "while_writing_pages": written,
        "while_writing_s": round(writing_s, 3),
        "mib_per_s": round(written * page_size / MIB / writing_s, 1),
        "mean_cluster_npages": round(cluster, 1),
    }


# ---- the resident hit path -------------------------------------------------------------------


def hit_path(npages: int = 16384, naccesses: int = 1_000_000) -> dict[str, Any]:
    """Accesses per second to resident pages: the access loop, and the batched calls."""
    ps = WORKLOAD_PAGE
    out: dict[str, Any] = {"npages": npages, "accesses": naccesses}
    with VM(memory=f"{2 * npages * ps // MIB + 1}M", swap=[]) as vm:
        obj = vm.allocate(npages * ps)
        obj.write(0, bytes(npages * ps))  # resident and dirty: the steady state
        rng = np.random.default_rng(7)
        for name, indices in (
            ("random", rng.integers(0, npages, naccesses)),
            ("seq", np.arange(naccesses) % npages),
        ):
            seconds = loop.access(obj, _Indices(indices.astype(np.int64)), _QUIET)
            out[f"loop_{name}_accesses_per_s"] = round(naccesses / seconds)
            if hasattr(obj, "read_words"):
                offsets = indices * ps
                start = time.perf_counter()
                values = obj.read_words(offsets)
                obj.write_words(offsets, values + np.uint64(1))
                seconds = time.perf_counter() - start
                out[f"batch_{name}_words_per_s"] = round(naccesses / seconds)
                # Whole pages: the best of five calls (the first touches of the
                # freshly allocated result dominate some calls on this machine).
                wanted = np.unique(indices[: npages // 2])
                best = float("inf")
                for _ in range(5):
                    start = time.perf_counter()
                    obj.read_pages(wanted)
                    best = min(best, time.perf_counter() - start)
                out[f"read_pages_{name}_pages_per_s"] = round(len(wanted) / best)
        vm.check()
    return out


@dataclasses.dataclass
class _Indices:
    """What the access loop needs of a ``Workload``: the indices and the page size."""

    indices: NDArray[np.int64]
    page_size: int = WORKLOAD_PAGE


# ---- one vmpager run -------------------------------------------------------------------------


def _device_totals(vm: VM) -> tuple[int, int, int, int]:
    read_ops = write_ops = blocks_read = blocks_written = 0
    for _, device in vm.space.devices():
        s = device.statistics()
        read_ops += s.read_ops
        write_ops += s.write_ops
        blocks_read += s.blocks_read
        blocks_written += s.blocks_written
    return read_ops, write_ops, blocks_read, blocks_written


def run_vmpager(
    pattern: str,
    mib: int,
    limit_mib: int,
    *,
    variant: str,
    batch: int,
    page_size: int,
    config: VMConfig,
    swap: _SwapFactory,
    accesses: int | None,
    profile: bool,
    bars: Callable[[str, int], Bar],
) -> dict[str, Any]:
    """Fill, time the access phase, verify every page; the measurements of one run."""
    npages = mib * MIB // WORKLOAD_PAGE
    workload = Workload(npages, pattern, accesses=accesses)  # type: ignore[arg-type]
    with VM(memory=f"{limit_mib}M", swap=swap(), page_size=page_size, config=config) as vm:
        obj = vm.allocate(mib * MIB)
        started = time.perf_counter()
        loop.fill(obj, workload, bars("fill", npages))
        vm.wait_idle()
        fill_s = time.perf_counter() - started
        disk = _disk_of(tempfile.gettempdir())
        before = vm.statistics()
        dev_before = _device_totals(vm)
        disk_before = _diskstats(disk)
        cpu_before = _cpu_seconds()
        threads_before = _thread_cpu()
        loadavg_before = _loadavg()
        profiler = cProfile.Profile() if profile else None
        if profiler is not None:
            profiler.enable()
        if variant == "batch":
            seconds = loop.batched_access(obj, workload, batch, bars(pattern, workload.naccesses))
        else:
            seconds = loop.access(obj, workload, bars(pattern, workload.naccesses))
        if profiler is not None:
            profiler.disable()
        cpu = _cpu_seconds() - cpu_before
        threads_after = _thread_cpu()
        after = vm.statistics()
        dev_after = _device_totals(vm)
        disk_after = _diskstats(disk)
        loadavg_after = _loadavg()
        bad = loop.verify(obj, workload, bars("verify", npages))
        vm.check()
    if bad:
        raise BenchError(f"vmpager {pattern}: {bad} pages do not hold what they should")
    read_ops, write_ops, blocks_read, blocks_written = (
        a - b for a, b in zip(dev_after, dev_before, strict=True)
    )
    faults = after.faults - before.faults
    pages_out = after.pageout_pages - before.pageout_pages
    result: dict[str, Any] = {
        "system": "vmpager" if variant == "loop" else "vmpager-batch",
        "pattern": pattern,
        "accesses": workload.naccesses,
        "access_s": round(seconds, 3),
        "accesses_per_s": round(workload.naccesses / seconds, 1),
        "fill_s": round(fill_s, 3),
        "faults": faults,
        "miss_ratio": round(faults / workload.naccesses, 4),
        "pageins": after.pageins - before.pageins,
        "pages_in": after.pagein_pages - before.pagein_pages,
        "pageouts": after.pageouts - before.pageouts,
        "pages_out": pages_out,
        "mean_cluster_npages": round(pages_out / max(after.pageouts - before.pageouts, 1), 2),
        "readaround_pages": after.readaround_pages - before.readaround_pages,
        "readaround_hits": after.readaround_hits - before.readaround_hits,
        "device_read_ops": read_ops,
        "device_write_ops": write_ops,
        "device_bytes_read": blocks_read * page_size,
        "device_bytes_written": blocks_written * page_size,
        "bytes_written_per_page_out": round(blocks_written * page_size / pages_out)
        if pages_out
        else None,
        "disk_all_processes": _disk_delta(disk, disk_before, disk_after),
        "cpu_s": round(cpu, 3),
        "cpu_us_per_access": round(cpu * 1e6 / workload.naccesses, 2),
        "thread_cpu_s": {
            name: round(threads_after[name] - threads_before.get(name, 0.0), 2)
            for name in sorted(threads_after)
        },
        "frame_waits": after.frame_waits - before.frame_waits,
        "verified_pages": npages,
        "loadavg_before": loadavg_before,
        "loadavg_after": loadavg_after,
    }
    if profiler is not None:
        result["profile"] = _profile_summary(profiler)
    return result


def run_vmpager_mapped(
    pattern: str, mib: int, limit_mib: int, *, page_size: int, accesses: int | None
) -> dict[str, Any]:
    """The ``mapped`` variant: ``vmpager run --mapped`` (a mapped numpy array indexed
    by plain numpy code); the measurements of one run, in ``run_vmpager``'s fields."""
    from vmpager.mapped.run import run_mapped_pattern

    disk = _disk_of(tempfile.gettempdir())
    disk_before = _diskstats(disk)
    loadavg_before = _loadavg()
    row = run_mapped_pattern(
        pattern,
        size=mib * MIB,
        memory=limit_mib * MIB,
        swap=None,
        accesses=accesses,
        verify=True,
        page_size=page_size,
    )
    disk_after = _diskstats(disk)  # fill and verification included
    if row["bad_pages"]:
        raise BenchError(
            f"vmpager-mapped {pattern}: {row['bad_pages']} pages do not hold what they should"
        )
    keys = (
        "accesses",
        "accesses_per_s",
        "faults",
        "miss_ratio",
        "pageins",
        "pages_in",
        "pageouts",
        "pages_out",
        "mean_cluster_npages",
        "readaround_pages",
        "readaround_hits",
        "soft_faults",
        "wp_faults",
        "client_faults",
        "ahead_pages",
        "verified_pages",
    )
    result: dict[str, Any] = {"system": "vmpager-mapped", "pattern": pattern}
    result.update({key: row[key] for key in keys if key in row})
    result.update(
        access_s=row["seconds"],
        fill_s=row["fill_seconds"],
        disk_with_fill_and_verify=_disk_delta(disk, disk_before, disk_after),
        loadavg_before=loadavg_before,
        loadavg_after=_loadavg(),
    )
    return result


def _disk_delta(
    disk: str | None, before: tuple[int, int, int, int], after: tuple[int, int, int, int]
) -> dict[str, Any]:
    d = [a - b for a, b in zip(after, before, strict=True)]
    return {
        "disk": disk,
        "read_ops": d[0],
        "mib_read": round(d[1] * 512 / MIB, 1),
        "write_ops": d[2],
        "mib_written": round(d[3] * 512 / MIB, 1),
    }


def _profile_summary(profiler: cProfile.Profile, top: int = 25) -> list[dict[str, Any]]:
    """The functions with the most own time in the access phase (main thread only)."""
    stats = pstats.Stats(profiler)
    rows = []
    for (filename, line, name), (_, ncalls, tottime, cumtime, _) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append(
            {
                "function": f"{Path(filename).name}:{line}({name})",
                "calls": ncalls,
                "own_s": round(tottime, 3),
                "cumulative_s": round(cumtime, 3),
            }
        )
    rows.sort(key=lambda r: r["own_s"], reverse=True)
    return rows[:top]


# ---- the kernel ------------------------------------------------------------------------------


def run_kernel(
    pattern: str,
    mib: int,
    limit_mib: int,
    *,
    swap: kernel.SwapFile,
    binary: Path,
    accesses: int | None,
    willneed: int = 0,
) -> dict[str, Any]:
    """One run of kworkload in its cgroup on the kernel's swap, in the report's fields."""
    disk = _disk_of(swap.directory)
    disk_before = _diskstats(disk)
    try:
        result = kernel.run_kernel(
            pattern,  # type: ignore[arg-type]
            mib,
            limit_mib,
            swap=swap,
            binary=binary,
            accesses=accesses,
            willneed=willneed,
        )
    except OSError as exc:  # the cgroup: permissions, a controller that cannot be enabled
        raise kernel.KernelBenchError(f"{exc}; needs root and a writable memory cgroup") from exc
    disk_after = _diskstats(disk)
    return {
        "system": "kernel-batch" if willneed else "kernel",
        "pattern": pattern,
        "accesses": result["accesses"],
        "access_s": result["access_s"],
        "accesses_per_s": result["accesses_per_s"],
        "fill_s": result["fill_s"],
        "faults": result["majflt"],
        "miss_ratio": round(result["pswpin"] / result["accesses"], 4),
        "pages_in": result["pswpin"],
        "pages_out": result["pswpout"],
        "bytes_written_per_page_out": WORKLOAD_PAGE,
        "disk_all_processes": _disk_delta(disk, disk_before, disk_after),
        "verified": result["verified"],
        "loadavg_before": result["loadavg_before"],
        "loadavg_after": result["loadavg_after"],
    }


@contextlib.contextmanager
def _kernel_side(
    enabled: bool, mib: int, directory: str
) -> Iterator[tuple[kernel.SwapFile | None, Path | None]]:
    """The compiled program and an active swap file of its own, removed on the way out."""
    if not enabled:
        yield None, None
        return
    with tempfile.TemporaryDirectory(prefix="vmpager-bench-") as bindir:
        binary = kernel.compile_kworkload(bindir)
        with contextlib.ExitStack() as stack:
            try:
                swap = stack.enter_context(kernel.SwapFile(max(2 * mib, 1024), directory))
            except (OSError, subprocess.CalledProcessError) as exc:
                raise kernel.KernelBenchError(
                    f"could not set up a swap file in {directory}: {exc}"
                ) from exc
            yield swap, binary


# ---- the whole benchmark ---------------------------------------------------------------------


def summarize(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Medians per (system, pattern), and per pattern the median of the per-rep ratios."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["system"], run["pattern"]), []).append(run)
    medians: dict[str, dict[str, Any]] = {}
    keys = (
        "accesses_per_s",
        "miss_ratio",
        "faults",
        "pages_in",
        "pages_out",
        "pageins",
        "pageouts",
        "mean_cluster_npages",
        "device_read_ops",
        "device_write_ops",
        "bytes_written_per_page_out",
        "cpu_us_per_access",
    )
    for (system, pattern), group in groups.items():
        row: dict[str, Any] = {"reps": len(group)}
        for key in keys:
            values = [r[key] for r in group if r.get(key) is not None]
            if values:
                row[key] = statistics.median(values)
        medians.setdefault(system, {})[pattern] = row

    def ratios(reference: str) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for system in medians:
            if system.startswith("kernel") or reference not in medians:
                continue
            for pattern in medians[system]:
                mine = {r["rep"]: r for r in groups.get((system, pattern), [])}
                theirs = {r["rep"]: r for r in groups.get((reference, pattern), [])}
                per_rep = [
                    mine[rep]["accesses_per_s"] / theirs[rep]["accesses_per_s"]
                    for rep in sorted(mine.keys() & theirs.keys())
                ]
                if per_rep:
                    out.setdefault(system, {})[pattern] = {
                        "median": round(statistics.median(per_rep), 3),
                        "per_rep": [round(r, 3) for r in per_rep],
                    }
        return out

    # Each vmpager variant against the kernel's per-access program, and against
    # the kernel's batched one (madvise(MADV_WILLNEED) per window) when it ran.
    return {
        "medians": medians,
        "ratios_to_kernel": ratios("kernel"),
        "ratios_to_kernel_batch": ratios("kernel-batch"),
    }


def parse_config(items: Sequence[str]) -> VMConfig:
    """``VMConfig`` with ``key=value`` items applied (ints, True/False, or text)."""
    fields = {f.name for f in dataclasses.fields(VMConfig)}
    values: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or key not in fields:
            raise ValueError(
                f"--config must be KEY=VALUE with KEY one of {', '.join(sorted(fields))}; "
                f"got {item!r}"
            )
        if text in ("True", "False"):
            values[key] = text == "True"
        else:
            values[key] = int(text) if text.lstrip("-").isdigit() else text
    return dataclasses.replace(VMConfig(), **values)


def kernel_plan(options: BenchOptions) -> tuple[bool, str | None]:
    """(run the kernel side?, why not) for ``options`` on this machine; changes nothing.

    Raises ``BenchError`` when ``kernel="yes"`` and the kernel side cannot run.
    """
    if options.kernel == "no":
        return False, "not asked (--kernel no)"
    if options.device == "ram":
        why: str | None = "vmpager swaps to RAM (--device ram); the kernel side swaps to a file"
    else:
        why = kernel.unavailable()
    if why is not None and options.kernel == "yes":
        raise BenchError(f"--kernel yes: the kernel side cannot run here: {why}")
    return why is None, why


def run_bench(
    options: BenchOptions, console: Console, *, source: str = "vmpager bench"
) -> dict[str, Any]:
    """Run the benchmark described by ``options``; returns the report.

    Progress and one line per run go to ``console``. The kernel side runs
    when ``options.kernel`` allows it and :func:`kernel.unavailable` finds
    nothing missing; a swap file and a cgroup are created for it and always
    removed again (also on errors and Ctrl-C; SIGTERM too, in the main
    thread). Raises ``BenchError`` when a run's pages do not verify or
    ``kernel="yes"`` cannot be honoured.
    """
    use_kernel, why_not = kernel_plan(options)
    config = options.config
    page_size = options.page_size
    nblocks = 2 * max(options.mib, 2 * options.limit_mib) * MIB // page_size + 1024
    swap = _SwapFactory(options.device, nblocks, page_size, options.swap_dir)
    report: dict[str, Any] = {
        "benchmark": f"standard paging workload, vmpager and kernel swap ({source})",
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "loadavg_start": _loadavg(),
        "machine": kernel.describe_machine(options.swap_dir),
        "config": {
            "mib": options.mib,
            "limit_mib": options.limit_mib,
            "patterns": list(options.patterns),
            "variants": list(options.variants),
            "batch": options.batch,
            "reps": options.reps,
            "accesses": options.accesses,
            "page_size": page_size,
            "device": options.device,
            "swap_dir": options.swap_dir,
            "vm_config": {k: str(v) for k, v in dataclasses.asdict(config).items()},
            "kernel": use_kernel,
            "kernel_skipped_because": why_not,
        },
    }
    if not use_kernel:
        console.note(f"kernel side skipped: {why_not}")
    if options.disk and options.device == "file":
        console.note("measuring the disk's write bandwidth and vmpager's pageout throughput")
        write_kib = config.cluster_max_npages * page_size // 1024
        report["disk"] = {
            "write_bandwidth": [
                disk_write_bandwidth(options.swap_dir, write_kib) for _ in range(3)
            ],
        }
        report["pageout"] = [
            pageout_throughput(options.limit_mib, config, swap, page_size) for _ in range(3)
        ]
        bw = statistics.median(r["mib_per_s"] for r in report["disk"]["write_bandwidth"])
        po = statistics.median(r["mib_per_s"] for r in report["pageout"])
        drain = statistics.median(r["drain_mib_per_s"] for r in report["pageout"])
        report["pageout_vs_disk"] = round(po / bw, 3) if bw else None
        report["pageout_drain_vs_disk"] = round(drain / bw, 3) if bw else None
        console.note(
            f"disk write {bw:.0f} MiB/s, pageout while writing {po:.0f} MiB/s, "
            f"drain {drain:.0f} MiB/s"
        )
    if options.hit_path:
        report["hit_path"] = hit_path()
        console.note(f"hit path {report['hit_path']}")

    runs: list[dict[str, Any]] = []
    # A bar per phase on a terminal; in a log, the overall bar and one line per run.
    phase_bars = console.bar if console.is_terminal else (lambda label, total: _QUIET)
    systems = 2 if use_kernel else 1
    # The overall bar counts work, not runs, so that its ETA weighs a 1,000,000-access
    # random run more than a short seq one: each run's accesses plus its pages.
    npages = options.size // WORKLOAD_PAGE
    work = {
        p: (options.accesses or (DEFAULT_PASSES * npages if p == "seq" else DEFAULT_ACCESSES))
        + npages
        for p in options.patterns
    }
    per_rep = sum(work.values()) * len(options.variants) * systems
    overall = console.bar("bench", options.reps * per_rep)
    work_done = 0
    try:
        with (
            kernel.sigterm_as_exit(),
            _kernel_side(use_kernel, options.mib, options.swap_dir) as (kswapfile, binary),
        ):
            for rep in range(options.reps):
                for pattern in options.patterns:
                    jobs = [("vmpager", v) for v in options.variants]
                    if use_kernel:
                        # The kernel's counterpart of the mapped variant is its plain run.
                        kvariants = dict.fromkeys(
                            "loop" if v == "mapped" else v for v in options.variants
                        )
                        kjobs = [("kernel", v) for v in kvariants]
                        # Alternate who goes first, so drift in the load hits both alike.
                        jobs = [*kjobs, *jobs] if rep % 2 == 0 else [*jobs, *kjobs]
                    for system, variant in jobs:
                        if system == "kernel":
                            assert kswapfile is not None and binary is not None
                            run = run_kernel(
                                pattern,
                                options.mib,
                                options.limit_mib,
                                swap=kswapfile,
                                binary=binary,
                                accesses=options.accesses,
                                willneed=options.batch if variant == "batch" else 0,
                            )
                        elif variant == "mapped":
                            run = run_vmpager_mapped(
                                pattern,
                                options.mib,
                                options.limit_mib,
                                page_size=page_size,
                                accesses=options.accesses,
                            )
                        else:
                            run = run_vmpager(
                                pattern,
                                options.mib,
                                options.limit_mib,
                                variant=variant,
                                batch=options.batch,
                                page_size=page_size,
                                config=config,
                                swap=swap,
                                accesses=options.accesses,
                                profile=options.profile,
                                bars=phase_bars,
                            )
                        run["rep"] = rep
                        runs.append(run)
                        work_done += work[pattern]
                        overall.update(work_done)
                        console.note(
                            f"rep {rep} {pattern:>6} {run['system']:<13} "
                            f"{run['accesses_per_s']:>10,.0f} accesses/s  "
                            f"miss {run['miss_ratio']:.3f}  "
                            f"pages in {run.get('pages_in', 0):,} out {run.get('pages_out', 0):,}"
                        )
    except kernel.KernelBenchError as exc:
        raise BenchError(
            f"--kernel: the kernel side failed: {exc} (--kernel no runs vmpager alone)"
        ) from exc
    finally:
        swap.close_all()
    overall.finish()
    report["summary"] = summarize(runs)
    report["runs"] = runs
    report["loadavg_end"] = _loadavg()
    report["swap_left_active"] = kernel.active_swaps() if use_kernel else []
    return report


def ratio_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The table of a report: accesses/s medians per system and the ratios, per pattern."""
    summary = report["summary"]
    medians = summary["medians"]
    systems = [
        s
        for s in ("vmpager", "vmpager-batch", "vmpager-mapped", "kernel", "kernel-batch")
        if s in medians
    ]
    header = ["pattern", *(f"{s} acc/s" for s in systems)]
    ratio_columns: list[tuple[str, str, str]] = []
    for key, reference in (
        ("ratios_to_kernel", "kernel"),
        ("ratios_to_kernel_batch", "kernel-batch"),
    ):
        for system in sorted(summary.get(key) or {}):
            ratio_columns.append((key, system, reference))
            header.append(f"{system} / {reference}")
    rows = []
    for pattern in report["config"]["patterns"]:
        row = [pattern]
        for system in systems:
            value = medians[system].get(pattern, {}).get("accesses_per_s")
            row.append("-" if value is None else f"{value:,.0f}")
        for key, system, _ in ratio_columns:
            ratio = summary[key][system].get(pattern)
            row.append("-" if ratio is None else f"{ratio['median']:.2f}")
        rows.append(row)
    return header, rows


def have_matplotlib() -> bool:
    """Whether ``plot`` can draw (the ``plot`` extra is installed)."""
    return importlib.util.find_spec("matplotlib") is not None


def plot(report: dict[str, Any], path: Path) -> None:
    """Bar chart of accesses per second per pattern and system (needs matplotlib).

    Raises ``BenchError`` when matplotlib is not installed.
    """
    try:
        matplotlib = importlib.import_module("matplotlib")
        matplotlib.use("Agg")
        plt = importlib.import_module("matplotlib.pyplot")
    except ImportError:
        raise BenchError(
            "--plot needs matplotlib: pip install 'vmpager[plot]' (or leave out --plot)"
        ) from None
    medians = report["summary"]["medians"]
    systems = sorted(medians)
    patterns = report["config"]["patterns"]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(len(systems), 1)
    for i, system in enumerate(systems):
        values = [medians[system].get(p, {}).get("accesses_per_s", 0) / 1000 for p in patterns]
        bars = ax.bar([x + i * width for x in range(len(patterns))], values, width, label=system)
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set_xticks([x + width * (len(systems) - 1) / 2 for x in range(len(patterns))], patterns)
    ax.set_ylabel("thousand accesses / s (median)")
    cfg = report["config"]
    machine = report["machine"]
    ax.set_title(
        f"{cfg['mib']} MiB object, {cfg['limit_mib']} MiB memory, {cfg['reps']} reps "
        f"({machine['cpu_model']}, {machine['cores']} cores)",
        fontsize=9,
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
