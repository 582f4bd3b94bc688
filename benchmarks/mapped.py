"""Transparent paging (mapped numpy arrays) against vmpager's calls, plain numpy and the kernel.

Measured in one run, side by side (A B A B for the repetitions):

1. The standard paging workload (vmpager.workload) with ``--mib`` MiB through
   ``--limit-mib`` MiB: ``vmpager-mapped`` (``vmpager run --mapped``: numpy
   indexing ``a[w] = a[w] + 1`` on a mapped array), ``vmpager`` (the
   ``obj.read``/``obj.write`` loop of ``vmpager run``) and ``kernel`` (the C
   program of benchmarks/kernel/kswap.py in a memory cgroup with a swap file),
   with miss ratios; the zipf miss ratio of an exact LRU of the same size is
   computed from the trace.
2. Resident access speed: a mapped array that fits the budget against a plain
   numpy array (a.sum() and a random gather), after one warm-up pass.
3. Whole-array operations: ``a.sum()`` over ``--sum-mib`` and ``np.sort`` of
   ``--sort-mib`` through ``--op-limit-mib``, vmpager against the same Python
   program in a memory cgroup of the same size swapping to a swap file.
4. The cost of one fault, by kind (measured from the faulting process), and
   the system calls the pager makes for one, timed alone.

5. The latency of swap-in faults (``--parts latency``): random pages of an
   array ``--latency-mib`` MiB through a quarter of that, each access timed
   alone (median, p90, p99), with the pager's thread switch interval at
   each of ``--latency-intervals`` (seconds, comma-separated; default 5 ms,
   Python's and the pager's, and 0.5 ms), interleaved ``--latency-rounds`` times.

``--baseline-src DIR`` adds ``vmpager-mapped-before``: the same mapped runs
(standard workload and whole-array operations) with the package at ``DIR``
(an earlier tree, e.g. ``git archive <commit> src | tar -x -C /tmp/before``),
interleaved with the others, for before/after comparisons in one run.

Needs root for the kernel parts (skipped otherwise, and when swap is already
on); every swap file and cgroup it makes is removed (kswap.py). Usage::

    python benchmarks/mapped.py [--mib 256] [--limit-mib 64] [--reps 1]
        [--accesses 200000] [--sum-mib 512] [--sort-mib 256] [--op-limit-mib 64]
        [--output benchmarks/results/mapped.json]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent / "kernel"))
import kswap

from vmpager.cli import run_pattern
from vmpager.console import Console
from vmpager.mapped import uffd as U
from vmpager.mapped.client import PagerProcess
from vmpager.mapped.run import run_mapped_pattern
from vmpager.workload import Workload

MIB = 1 << 20
PS = 4096


def _loadavg() -> str:
    with open("/proc/loadavg") as f:
        return f.read().strip()


def kernel_available() -> str | None:
    if os.geteuid() != 0:
        return "not root"
    if kswap.active_swaps():
        return f"swap already active: {kswap.active_swaps()}"
    try:
        kswap.detect_memory_cgroup()
    except kswap.KernelBenchError as exc:
        return str(exc)
    return None


def lru_miss_ratio(npages: int, frames: int, pattern: str, accesses: int | None) -> float:
    lru: OrderedDict[int, None] = OrderedDict()
    misses = 0
    indices = Workload(npages, pattern, accesses=accesses).indices.tolist()  # type: ignore[arg-type]
    for p in indices:
        if p in lru:
            lru.move_to_end(p)
        else:
            misses += 1
            lru[p] = None
            if len(lru) > frames:
                lru.popitem(last=False)
    return misses / len(indices)


# ---- 1. the standard workload ------------------------------------------------------------


def standard(args: argparse.Namespace, kernel: bool, swap: Any, binary: Path | None) -> list[Any]:
    runs: list[dict[str, Any]] = []
    size, memory = args.mib * MIB, args.limit_mib * MIB
    console = Console(io.StringIO(), quiet=True)
    for rep in range(args.reps):
        for pattern in args.patterns.split(","):
            accesses = None if pattern == "seq" else args.accesses
            systems = ["vmpager-mapped", "vmpager", "kernel"]
            if args.baseline_src:
                systems.insert(1, "vmpager-mapped-before")
            for system in systems:
                load = _loadavg()
                if system == "vmpager-mapped-before":
                    row = _baseline_pattern(args, pattern, size, memory, accesses)
                elif system == "kernel":
                    if not kernel:
                        continue
                    r = kswap.run_kernel(
                        pattern,  # type: ignore[arg-type]
                        args.mib,
                        args.limit_mib,
                        swap=swap,
                        binary=binary,
                        accesses=accesses,
                    )
                    row = {
                        "accesses": r["accesses"],
                        "seconds": r["access_s"],
                        "accesses_per_s": r["accesses_per_s"],
                        "faults": r["pswpin"],
                        "miss_ratio": round(r["pswpin"] / r["accesses"], 4),
                        "verified": r["verified"],
                    }
                else:
                    runner = run_mapped_pattern if system == "vmpager-mapped" else run_pattern
                    row = runner(
                        pattern,
                        size=size,
                        memory=memory,
                        swap=None,
                        accesses=accesses,
                        verify=True,
                        console=console,
                    )
                    row["verified"] = row["bad_pages"] == 0
                row.update(system=system, pattern=pattern, rep=rep, loadavg_before=load)
                print(
                    f"{system:>15} {pattern:>6}: {row['accesses_per_s']:>10,.0f} acc/s "
                    f"miss {row['miss_ratio']:.2%}",
                    file=sys.stderr,
                    flush=True,
                )
                runs.append(row)
    return runs


_BASELINE_PATTERN = """
import io, json, sys
from vmpager.mapped.run import run_mapped_pattern
pattern, size, memory, accesses = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
row = run_mapped_pattern(pattern, size=size, memory=memory, swap=None,
    accesses=None if accesses == "-" else int(accesses), verify=True, err=io.StringIO())
print(json.dumps(row, default=str))
"""


def _baseline_pattern(
    args: argparse.Namespace, pattern: str, size: int, memory: int, accesses: int | None
) -> dict[str, Any]:
    """``run_mapped_pattern`` of the package at ``--baseline-src``, in a process of its own."""
    env = dict(os.environ, PYTHONPATH=str(Path(args.baseline_src).resolve()))
    argv = [sys.executable, "-c", _BASELINE_PATTERN, pattern, str(size), str(memory)]
    argv.append("-" if accesses is None else str(accesses))
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=7200, check=True)
    row: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    row["verified"] = row["bad_pages"] == 0
    return row


# ---- 2. resident speed ---------------------------------------------------------------------


def resident(mib: int) -> dict[str, Any]:
    n = mib * MIB // 8
    rng = np.random.default_rng(0)
    idx = rng.integers(0, n, 1_000_000)
    out: dict[str, Any] = {"array_mib": mib}
    # numpy asks for transparent huge pages on large arrays (MADV_HUGEPAGE);
    # shmem pages are 4 KiB here: plain_4k is a plain array without them.
    set_thp = np._core.multiarray._set_madvise_hugepage
    with PagerProcess(f"{2 * mib}M") as pager:
        mapped = pager.array(n)
        plain = np.empty(n)
        was = set_thp(False)
        plain_4k = np.empty(n)
        set_thp(was)
        for a in (mapped, plain, plain_4k):
            a[:] = 1.0
            a.sum()  # warm: every page resident and mapped
        before = pager.info()["faults"] + pager.info()["soft_faults"]
        variants = (("mapped", mapped), ("plain", plain), ("plain_4k", plain_4k))
        best: dict[str, dict[str, float]] = {name: {} for name, _ in variants}
        for _round in range(3):  # A B C A B C A B C: the best of each
            for name, a in variants:
                t = time.perf_counter()
                for _ in range(10):
                    a.sum()
                sum_rate = a.nbytes * 10 / (time.perf_counter() - t) / (1 << 30)
                t = time.perf_counter()
                a[idx].sum()
                gather_rate = 1.0 / (time.perf_counter() - t)
                row = best[name]
                row["sum_gib_per_s"] = round(max(row.get("sum_gib_per_s", 0.0), sum_rate), 2)
                row["gather_maccesses_per_s"] = round(
                    max(row.get("gather_maccesses_per_s", 0.0), gather_rate), 2
                )
        out.update(best)
        info = pager.info()
        out["faults_during_timing"] = info["faults"] + info["soft_faults"] - before
        del mapped
    for key in ("sum_gib_per_s", "gather_maccesses_per_s"):
        out[f"ratio_{key}"] = round(out["mapped"][key] / out["plain"][key], 3)
        out[f"ratio_4k_{key}"] = round(out["mapped"][key] / out["plain_4k"][key], 3)
    return out


# ---- 3. whole-array operations ---------------------------------------------------------------

_OP_PROGRAM = """
import json, os, sys, time
import numpy as np
n, op, mapped, limit = int(sys.argv[1]), sys.argv[2], sys.argv[3] == "1", sys.argv[4]
rng = np.random.default_rng(5)
if mapped:
    from vmpager.mapped.client import PagerProcess
    pager = PagerProcess(limit)
    a = pager.array(n)
else:
    a = np.empty(n)
chunk = 1 << 20
t = time.perf_counter()
for i in range(0, n, chunk):
    a[i:i + chunk] = rng.standard_normal(min(chunk, n - i))
fill = time.perf_counter() - t


def pager_cpu():
    # The pager process's CPU seconds (user, system): /proc/<pid>/stat fields 14, 15.
    if not mapped:
        return (0.0, 0.0)
    with open(f"/proc/{pager.pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) / tick, int(fields[12]) / tick)


cpu0, own0 = pager_cpu(), time.process_time()
t = time.perf_counter()
if op == "sum":
    value = float(a.sum())
else:
    a.sort()
    value = float(a[n // 2])
    assert bool(np.all(a[: 1 << 16][:-1] <= a[: 1 << 16][1:]))
seconds = time.perf_counter() - t
cpu1, own1 = pager_cpu(), time.process_time()
row = {"op": op, "fill_s": round(fill, 3), "seconds": round(seconds, 3), "value": value}
row["process_cpu_s"] = round(own1 - own0, 3)
if mapped:
    row["pager_user_s"] = round(cpu1[0] - cpu0[0], 2)
    row["pager_system_s"] = round(cpu1[1] - cpu0[1], 2)
    info = pager.info()
    row["pager_counts"] = {k: v for k, v in info.items() if isinstance(v, int) and k != "pid"}
print(json.dumps(row))
"""


def whole_array(args: argparse.Namespace, kernel: bool) -> list[dict[str, Any]]:
    rows = []
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    limit = args.op_limit_mib
    for op, mib in (("sum", args.sum_mib), ("sort", args.sort_mib)):
        n = mib * MIB // 8
        systems = ["vmpager-mapped", "kernel"]
        if args.baseline_src:
            systems.insert(1, "vmpager-mapped-before")
        for system in systems:
            if system == "kernel" and not kernel:
                continue
            load = _loadavg()
            argv = [sys.executable, "-c", _OP_PROGRAM, str(n), op, str(int(system != "kernel"))]
            argv.append(f"{limit}M")
            run_env = env
            if system == "vmpager-mapped-before":
                run_env = dict(env, PYTHONPATH=str(Path(args.baseline_src).resolve()))
            with contextlib.ExitStack() as stack:
                preexec = None
                if system == "kernel":
                    cgroup = stack.enter_context(kswap.MemoryCgroup(limit))
                    preexec = cgroup.preexec
                proc = subprocess.run(
                    argv,
                    capture_output=True,
                    text=True,
                    env=run_env,
                    preexec_fn=preexec,
                    timeout=3600,
                )
            if proc.returncode != 0:
                rows.append({"system": system, "op": op, "error": proc.stderr[-2000:]})
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            row.update(system=system, array_mib=mib, limit_mib=limit, loadavg_before=load)
            cpu = ""
            if "pager_user_s" in row:
                user, system_s = row["pager_user_s"], row["pager_system_s"]
                cpu = f" (pager cpu {user:.2f} user + {system_s:.2f} sys)"
            print(f"{system:>15} {op}: {row['seconds']:.2f} s{cpu}", file=sys.stderr, flush=True)
            rows.append(row)
    return rows


# ---- 5. swap-in fault latency -----------------------------------------------------------

_LATENCY_PROGRAM = """
import json, os, sys, time
import numpy as np
from vmpager.mapped.client import PagerProcess
mib, touches, interval = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
ps = 4096
pager = PagerProcess(f"{mib // 4}M", switch_interval=interval)
a = pager.array(mib * (1 << 20), "uint8")
for i in range(0, len(a), 1 << 22):
    a[i:i + (1 << 22)] = 1  # every page written: the first three quarters go to swap
pages = np.random.default_rng(7).integers(0, len(a) // ps, touches) * ps
times = np.empty(touches)
clock = time.perf_counter_ns


def pager_cpu():
    with open(f"/proc/{pager.pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


info0, cpu0 = pager.info(), pager_cpu()
t0 = time.perf_counter()
for k, p in enumerate(pages.tolist()):
    t = clock()
    a[p]
    times[k] = clock() - t
seconds = time.perf_counter() - t0
info1, cpu1 = pager.info(), pager_cpu()
us = times / 1000
faults = info1["faults"] - info0["faults"]
row = {
    "switch_interval": interval,
    "touches": touches,
    "accesses_per_s": round(touches / seconds),
    "faults": faults,
    "soft_faults": info1["soft_faults"] - info0["soft_faults"],
    "pager_cpu_s": round(cpu1 - cpu0, 2),
    "pager_cpu_us_per_fault": round((cpu1 - cpu0) / max(faults, 1) * 1e6, 1),
}
# The accesses that faulted (a resident access costs well under 10 us).
slow = us[us > 10]
for name, q in (("median", 50), ("p90", 90), ("p99", 99), ("p999", 99.9)):
    row[f"fault_{name}_us"] = round(float(np.percentile(slow, q)), 1)
row["fault_mean_us"] = round(float(slow.mean()), 1)
print(json.dumps(row))
"""


def latency(args: argparse.Namespace) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    intervals = [float(x) for x in args.latency_intervals.split(",") if x]
    rows = []
    for _round in range(args.latency_rounds):
        for interval in intervals:
            argv = [sys.executable, "-c", _LATENCY_PROGRAM, str(args.latency_mib)]
            argv += [str(args.latency_touches), str(interval)]
            load = _loadavg()
            proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=3600)
            if proc.returncode != 0:
                rows.append({"switch_interval": interval, "error": proc.stderr[-2000:]})
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            row["loadavg_before"] = load
            print(
                f"latency switch {interval * 1e3:.2f} ms: median {row['fault_median_us']} "
                f"p90 {row['fault_p90_us']} p99 {row['fault_p99_us']} us, "
                f"{row['accesses_per_s']} acc/s",
                file=sys.stderr,
                flush=True,
            )
            rows.append(row)
    summary = {}
    for interval in intervals:
        ok = [r for r in rows if r["switch_interval"] == interval and "error" not in r]
        if ok:
            summary[str(interval)] = {
                key: statistics.median(r[key] for r in ok)
                for key in ok[0]
                if key.startswith("fault_") or key in ("accesses_per_s", "pager_cpu_us_per_fault")
            }
    return {"mib": args.latency_mib, "runs": rows, "median_of_runs": summary}


# ---- 4. the cost of one fault ---------------------------------------------------------------


def fault_costs() -> dict[str, Any]:
    out: dict[str, Any] = {}
    n = 4096  # pages
    with PagerProcess("64M", config=None) as pager:
        a = pager.array(n * PS, "uint8")
        stride = 3  # no read-ahead: not sequential

        def touch(a: np.ndarray, write: bool) -> float:
            t = time.perf_counter()
            if write:
                for p in range(0, n, stride):
                    a[p * PS] = 1
            else:
                for p in range(0, n, stride):
                    a[p * PS]
            return (time.perf_counter() - t) / len(range(0, n, stride)) * 1e6

        out["zero_fill_read_fault_us"] = round(touch(a, False), 1)
        out["write_protect_fault_us"] = round(touch(a, True), 1)
        t = time.perf_counter()
        for p in range(0, n, stride):
            a[p * PS]
        out["resident_index_us"] = round(
            (time.perf_counter() - t) / len(range(0, n, stride)) * 1e6, 2
        )
        pager.pageout(n)  # deactivates (unbinds) and writes everything out
        out["swap_in_fault_us"] = round(touch(a, False), 1)
        out["pager_counts"] = pager.info()
        del a
    # The pager's system calls for one fault and one eviction, alone.
    libc_calls: dict[str, float] = {}
    reps = 2000
    fd = U.memfd("bench", reps * PS)
    arena = U.reserve(reps * PS)
    scratch = U.reserve(PS)
    ctypes.memset(arena, 1, reps * PS)
    t = time.perf_counter()
    for i in range(reps):
        U.map_fixed(arena + i * PS, PS, fd, i * PS)
    libc_calls["mmap_fixed_memfd_us"] = (time.perf_counter() - t) / reps * 1e6
    t = time.perf_counter()
    for i in range(reps):
        ctypes.memmove(scratch, arena + i * PS, PS)
        U.mremap_fixed(scratch, PS, arena + i * PS)
        U.map_fixed(scratch, PS)
    libc_calls["copy_mremap_remap_us"] = (time.perf_counter() - t) / reps * 1e6
    t = time.perf_counter()
    for i in range(reps):
        U.fallocate_punch(fd, i * PS, PS)
    libc_calls["fallocate_punch_us"] = (time.perf_counter() - t) / reps * 1e6
    # The calls of the present binding (mapped/binding.py): the frame is emptied
    # (MADV_DONTNEED, one call per page or one process_madvise per run) and filled
    # back from the memfd with a pread; the memfd is written with pwritev per run.
    U.map_fixed(arena, reps * PS)
    ctypes.memset(arena, 1, reps * PS)
    view = memoryview((ctypes.c_char * (reps * PS)).from_address(arena)).cast("B")
    t = time.perf_counter()
    for i in range(reps):
        os.pwrite(fd, view[i * PS : (i + 1) * PS], i * PS)
    libc_calls["pwrite_page_us"] = (time.perf_counter() - t) / reps * 1e6
    t = time.perf_counter()
    for i in range(reps):
        U.madvise(arena + i * PS, PS, U.MADV_DONTNEED)
    libc_calls["madvise_dontneed_us"] = (time.perf_counter() - t) / reps * 1e6
    t = time.perf_counter()
    for i in range(reps):
        os.preadv(fd, [view[i * PS : (i + 1) * PS]], i * PS)
    libc_calls["pread_back_us"] = (time.perf_counter() - t) / reps * 1e6
    t = time.perf_counter()
    U.madvise_pages([arena + i * PS for i in range(0, reps, 2)], PS, U.MADV_DONTNEED)
    libc_calls["process_madvise_dontneed_per_page_us"] = (
        (time.perf_counter() - t) / len(range(0, reps, 2)) * 1e6
    )
    t = time.perf_counter()
    for i in range(0, reps, 64):
        os.preadv(fd, [view[j * PS : (j + 1) * PS] for j in range(i, min(i + 64, reps))], i * PS)
    libc_calls["preadv_64_pages_per_page_us"] = (time.perf_counter() - t) / reps * 1e6
    t = time.perf_counter()
    for i in range(0, reps, 64):
        U.fallocate_punch(fd, i * PS, min(64, reps - i) * PS)
    libc_calls["punch_64_pages_per_page_us"] = (time.perf_counter() - t) / reps * 1e6
    del view
    os.close(fd)
    U.munmap(arena, reps * PS)
    U.munmap(scratch, PS)
    out["syscalls"] = {k: round(v, 2) for k, v in libc_calls.items()}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--limit-mib", type=int, default=64)
    parser.add_argument("--patterns", default="seq,random,zipf")
    parser.add_argument("--accesses", type=int, default=200_000)
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--resident-mib", type=int, default=64)
    parser.add_argument("--sum-mib", type=int, default=512)
    parser.add_argument("--sort-mib", type=int, default=256)
    parser.add_argument("--op-limit-mib", type=int, default=64)
    parser.add_argument("--parts", default="standard,resident,ops,faults")
    parser.add_argument("--kernel", choices=("auto", "no"), default="auto")
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--baseline-src", default=None)
    parser.add_argument("--latency-mib", type=int, default=128)
    parser.add_argument("--latency-touches", type=int, default=20_000)
    parser.add_argument("--latency-rounds", type=int, default=3)
    parser.add_argument("--latency-intervals", default="0.005,0.0005")
    args = parser.parse_args(argv)
    parts = args.parts.split(",")
    why = kernel_available() if args.kernel == "auto" else "disabled"
    kernel = why is None
    report: dict[str, Any] = {
        "machine": kswap.describe_machine(),
        "loadavg_start": _loadavg(),
        "kernel_skipped": why,
        "args": vars(args) | {"output": str(args.output)},
    }
    with contextlib.ExitStack() as stack:
        swap = binary = None
        if kernel:
            bindir = stack.enter_context(tempfile.TemporaryDirectory(prefix="mapped-bin-"))
            binary = kswap.compile_kworkload(bindir)
            swap = stack.enter_context(kswap.SwapFile(max(2 * args.mib, 2 * args.sum_mib, 1024)))
        if "standard" in parts:
            runs = standard(args, kernel, swap, binary)
            report["standard"] = runs
            npages, frames = args.mib * MIB // PS, args.limit_mib * MIB // PS
            if "zipf" in args.patterns:
                report["zipf_lru_miss_ratio"] = round(
                    lru_miss_ratio(npages, frames, "zipf", args.accesses), 4
                )
            summary: dict[str, Any] = {}
            for pattern in args.patterns.split(","):
                rate = {
                    s: statistics.median(
                        r["accesses_per_s"]
                        for r in runs
                        if r["system"] == s and r["pattern"] == pattern
                    )
                    for s in ("vmpager-mapped", "vmpager-mapped-before", "vmpager", "kernel")
                    if any(r["system"] == s and r["pattern"] == pattern for r in runs)
                }
                if "kernel" in rate:
                    rate["mapped_over_kernel"] = round(rate["vmpager-mapped"] / rate["kernel"], 3)
                    if "vmpager-mapped-before" in rate:
                        rate["before_over_kernel"] = round(
                            rate["vmpager-mapped-before"] / rate["kernel"], 3
                        )
                rate["mapped_over_calls"] = round(rate["vmpager-mapped"] / rate["vmpager"], 3)
                summary[pattern] = rate
            report["standard_summary"] = summary
        if "resident" in parts:
            report["resident"] = resident(args.resident_mib)
        if "ops" in parts:
            report["whole_array"] = whole_array(args, kernel)
        if "faults" in parts:
            report["fault_costs"] = fault_costs()
        if "latency" in parts:
            report["latency"] = latency(args)
    report["loadavg_end"] = _loadavg()
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if args.output is not None:
        args.output.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
