"""The standard paging workload on vmpager and on the kernel's own swap, side by side.

For every pattern (seq, random, zipf) and repetition, in one process and
alternating, this runs

* ``vmpager``: ``VM(memory=limit)``, an object of ``--mib`` MiB, the fill and
  the access loop of ``vmpager run`` (``vmpager.cli``: per access one
  ``obj.read`` of 8 bytes and one ``obj.write`` of 8 bytes), then the
  verification of every page and ``vm.check()``;
* ``vmpager-batch`` (``--variants loop,batch``): the same accesses through the
  batched calls ``obj.read_words`` / ``obj.write_words``, ``--batch``
  accesses per call pair (a page accessed k times in one window is read once
  and written back plus k: the same final contents);
* ``kernel``: ``benchmarks/kernel/kswap.py`` (the C program in a memory cgroup
  limited to ``--limit-mib``, swapping to a swap file on the same disk),
  when running as root on Linux;
* ``kernel-batch`` (with ``--variants ...,batch``): the same C program calling
  madvise(MADV_WILLNEED) on the pages of each window of ``--batch`` accesses
  before making them, which starts their swap-ins together: the kernel's
  counterpart of the batched calls;

and reports accesses per second, the ratio vmpager / kernel of each
repetition and their medians (and vmpager-batch / kernel-batch), faults,
pages in and out, I/O operations, bytes written per page swapped out and
CPU time per access. Also measured
in the same run: the disk's sequential write bandwidth (an O_DIRECT
``pwritev`` loop with vmpager's write size), vmpager's pageout throughput
(writing an object twice the memory budget), and the resident hit path.

Usage (from the repository root)::

    python benchmarks/paging.py [--mib 512] [--limit-mib 128] [--reps 3]
        [--patterns seq,random,zipf] [--variants loop,batch] [--kernel auto|yes|no]
        [--page-size 4096] [--device file|ram] [--config key=value ...]
        [--output benchmarks/results/paging.json] [--plot benchmarks/results/paging.png]

Prints the JSON report to stdout; ``--output`` also writes it. ``--device ram``
swaps to memory instead of a file (the software cost alone; the kernel is
then skipped). ``benchmarks/paging_report.py`` renders a report as the tables of
docs/performance.md.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import dataclasses
import io
import json
import mmap
import os
import pstats
import resource
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vmpager.cli import Progress, _access, _fill, _verify
from vmpager.devices.file import FileDevice
from vmpager.devices.memory import MemoryDevice
from vmpager.vm.config import VMConfig
from vmpager.vm.system import VM
from vmpager.workload import PATTERNS, Workload

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "kernel"))
import kswap  # noqa: E402

MIB = 1 << 20
WORKLOAD_PAGE = 4096
_QUIET = io.StringIO()  # Progress is silent on a stream that is not a terminal


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
            workload_like = _Indices(indices)
            seconds = _access(obj, workload_like, Progress(_QUIET, "", 1))  # type: ignore[arg-type]
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

    indices: np.ndarray
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


def _batched_access(obj: Any, workload: Workload, batch: int) -> float:
    """The access phase through read_words / write_words, ``batch`` accesses per call pair."""
    ps = workload.page_size
    indices = workload.indices
    start = time.perf_counter()
    for base in range(0, len(indices), batch):
        pages, counts = np.unique(indices[base : base + batch], return_counts=True)
        offsets = pages * ps
        values = obj.read_words(offsets)
        obj.write_words(offsets, values + counts.astype(np.uint64))
    return time.perf_counter() - start


def run_vmpager(
    pattern: str,
    mib: int,
    limit_mib: int,
    *,
    variant: str,
    batch: int,
    page_size: int,
    config: VMConfig,
    swap: Any,
    accesses: int | None,
    profile: bool,
) -> dict[str, Any]:
    """Fill, time the access phase, verify every page; the measurements of one run."""
    npages = mib * MIB // WORKLOAD_PAGE
    workload = Workload(npages, pattern, accesses=accesses)  # type: ignore[arg-type]
    quiet = Progress(_QUIET, "", 1)
    with VM(memory=f"{limit_mib}M", swap=swap(), page_size=page_size, config=config) as vm:
        obj = vm.allocate(mib * MIB)
        started = time.perf_counter()
        _fill(obj, workload, quiet)
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
            seconds = _batched_access(obj, workload, batch)
        else:
            seconds = _access(obj, workload, quiet)
        if profiler is not None:
            profiler.disable()
        cpu = _cpu_seconds() - cpu_before
        threads_after = _thread_cpu()
        after = vm.statistics()
        dev_after = _device_totals(vm)
        disk_after = _diskstats(disk)
        loadavg_after = _loadavg()
        bad = _verify(obj, workload, quiet)
        vm.check()
    if bad:
        raise RuntimeError(f"vmpager {pattern}: {bad} pages do not hold what they should")
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


def kernel_available() -> str | None:
    """None when the kernel baseline can run here, else why not."""
    if sys.platform != "linux":
        return "not Linux"
    if os.geteuid() != 0:
        return "not root"
    if kswap.active_swaps():
        return f"swap already active: {kswap.active_swaps()}"
    try:
        kswap.detect_memory_cgroup()
    except kswap.KernelBenchError as exc:
        return str(exc)
    return None


def run_kernel(
    pattern: str,
    mib: int,
    limit_mib: int,
    *,
    swap: kswap.SwapFile,
    binary: Path,
    accesses: int | None,
    willneed: int = 0,
) -> dict[str, Any]:
    disk = _disk_of(swap.directory)
    disk_before = _diskstats(disk)
    result = kswap.run_kernel(
        pattern,  # type: ignore[arg-type]
        mib,
        limit_mib,
        swap=swap,
        binary=binary,
        accesses=accesses,
        willneed=willneed,
    )
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


def _parse_config(items: Sequence[str]) -> VMConfig:
    fields = {f.name: f for f in dataclasses.fields(VMConfig)}
    values: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or key not in fields:
            raise SystemExit(f"--config: expected key=value with key one of {sorted(fields)}")
        if text in ("True", "False"):
            values[key] = text == "True"
        else:
            values[key] = int(text) if text.lstrip("-").isdigit() else text
    return dataclasses.replace(VMConfig(), **values)


@contextlib.contextmanager
def _kernel_swap(enabled: bool, mib: int, directory: str) -> Iterator[tuple[Any, Path | None]]:
    if not enabled:
        yield None, None
        return
    with (
        tempfile.TemporaryDirectory(prefix="paging-bin-") as bindir,
        kswap.SwapFile(max(2 * mib, 1024), directory) as swap,
    ):
        yield swap, kswap.compile_kworkload(bindir)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=512, help="object / region size, MiB")
    parser.add_argument("--limit-mib", type=int, default=128, help="memory budget, MiB")
    parser.add_argument("--patterns", default="seq,random,zipf")
    parser.add_argument("--variants", default="loop", help="loop and/or batch (comma-separated)")
    parser.add_argument("--batch", type=int, default=4096, help="accesses per batched call")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--kernel", choices=("auto", "yes", "no"), default="auto")
    parser.add_argument("--accesses", type=int, default=None, help="default: the pattern's")
    parser.add_argument("--page-size", type=int, default=4096, help="vmpager page size")
    parser.add_argument("--device", choices=("file", "ram"), default="file")
    parser.add_argument("--swap-dir", default=tempfile.gettempdir())
    parser.add_argument("--config", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--no-disk", action="store_true", help="skip the disk bandwidth test")
    parser.add_argument("--no-hit", action="store_true", help="skip the hit-path test")
    parser.add_argument("--profile", action="store_true", help="cProfile each access phase")
    parser.add_argument("--output", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args(argv)
    patterns = [p for p in args.patterns.split(",") if p]
    for pattern in patterns:
        if pattern not in PATTERNS:
            parser.error(f"--patterns: {pattern!r} is not one of {', '.join(PATTERNS)}")
    variants = [v for v in args.variants.split(",") if v]
    if not set(variants) <= {"loop", "batch"}:
        parser.error("--variants: loop and/or batch")
    config = _parse_config(args.config)
    page_size = args.page_size
    nblocks = 2 * max(args.mib, 2 * args.limit_mib) * MIB // page_size + 1024
    swap = _SwapFactory(args.device, nblocks, page_size, args.swap_dir)

    why_not = kernel_available()
    use_kernel = args.kernel == "yes" or (args.kernel == "auto" and why_not is None)
    if args.device == "ram":
        use_kernel = False
    if use_kernel and why_not is not None:
        parser.error(f"--kernel yes: the kernel baseline cannot run here: {why_not}")

    report: dict[str, Any] = {
        "benchmark": "standard paging workload, vmpager and kernel swap (benchmarks/paging.py)",
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": kswap.describe_machine(args.swap_dir),
        "config": {
            "mib": args.mib,
            "limit_mib": args.limit_mib,
            "patterns": patterns,
            "variants": variants,
            "batch": args.batch,
            "reps": args.reps,
            "accesses": args.accesses,
            "page_size": page_size,
            "device": args.device,
            "swap_dir": args.swap_dir,
            "vm_config": {k: str(v) for k, v in dataclasses.asdict(config).items()},
            "kernel": use_kernel,
            "kernel_skipped_because": None if use_kernel else (why_not or "not asked"),
        },
    }
    if not args.no_disk and args.device == "file":
        write_kib = config.cluster_max_npages * page_size // 1024
        report["disk"] = {
            "write_bandwidth": [disk_write_bandwidth(args.swap_dir, write_kib) for _ in range(3)],
        }
        report["pageout"] = [
            pageout_throughput(args.limit_mib, config, swap, page_size) for _ in range(3)
        ]
        bw = statistics.median(r["mib_per_s"] for r in report["disk"]["write_bandwidth"])
        po = statistics.median(r["mib_per_s"] for r in report["pageout"])
        drain = statistics.median(r["drain_mib_per_s"] for r in report["pageout"])
        report["pageout_vs_disk"] = round(po / bw, 3) if bw else None
        report["pageout_drain_vs_disk"] = round(drain / bw, 3) if bw else None
        print(
            f"# disk write {bw:.0f} MiB/s, pageout while writing {po:.0f} MiB/s, "
            f"drain {drain:.0f} MiB/s",
            file=sys.stderr,
        )
    if not args.no_hit:
        report["hit_path"] = hit_path()
        print(f"# hit path {report['hit_path']}", file=sys.stderr)

    runs: list[dict[str, Any]] = []
    with _kernel_swap(use_kernel, args.mib, args.swap_dir) as (kswapfile, binary):
        for rep in range(args.reps):
            for pattern in patterns:
                jobs: list[tuple[str, str]] = [("vmpager", v) for v in variants]
                if use_kernel:
                    kjobs = [("kernel", v) for v in variants]
                    # Alternate who goes first, so drift in the load hits both alike.
                    jobs = [*kjobs, *jobs] if rep % 2 == 0 else [*jobs, *kjobs]
                for system, variant in jobs:
                    if system == "kernel":
                        run = run_kernel(
                            pattern,
                            args.mib,
                            args.limit_mib,
                            swap=kswapfile,
                            binary=binary,  # type: ignore[arg-type]
                            accesses=args.accesses,
                            willneed=args.batch if variant == "batch" else 0,
                        )
                    else:
                        run = run_vmpager(
                            pattern,
                            args.mib,
                            args.limit_mib,
                            variant=variant,
                            batch=args.batch,
                            page_size=page_size,
                            config=config,
                            swap=swap,
                            accesses=args.accesses,
                            profile=args.profile,
                        )
                    run["rep"] = rep
                    runs.append(run)
                    print(
                        f"# rep {rep} {pattern:>6} {run['system']:<13} "
                        f"{run['accesses_per_s']:>10,.0f} accesses/s  miss {run['miss_ratio']:.3f}"
                        f"  pages in {run['pages_in']:,} out {run['pages_out']:,}",
                        file=sys.stderr,
                    )
    swap.close_all()
    report["summary"] = summarize(runs)
    report["runs"] = runs
    report["swap_left_active"] = kswap.active_swaps() if use_kernel else []
    text = json.dumps(report, indent=2)
    print(text)
    if args.output is not None:
        args.output.write_text(text + "\n")
    if args.plot is not None:
        plot(report, args.plot)
    return 0


def plot(report: dict[str, Any], path: Path) -> None:
    """Bar chart of accesses per second per pattern and system (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("# no matplotlib (pip install 'vmpager[plot]'): no plot", file=sys.stderr)
        return
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


if __name__ == "__main__":
    sys.exit(main())
