"""Benchmark of vmpager.swap.blist on the swap-allocator workload.

The workload (see /work/shared/bench/README.md, "The swap-allocator
workload"): a blist of 2**20 blocks filled to 0.5 or 0.9 with runs of 1..16
blocks, then 1,000,000 operations alternating allocate / free-a-random-run.
The placement checksum proves FreeBSD's placement; at fill 0.5 the expected
summary is asserted (0 failures, 524,010 free blocks, 61,544 live runs,
checksum 0x3776e72b6f4553db).

Measured, each as the median of ``--runs`` runs, side by side in one process:

* ``end_to_end``: the workload loop with the random stream precomputed
  (vectorised splitmix64; its cost is reported separately);
* ``replay``: the recorded calls of the timed phase replayed in a bare loop,
  garbage collector off (as ``timeit``) -- the allocator's raw throughput,
  plus the loop's own cost with stub calls; ``end_to_end`` runs with the
  collector on, as a program would;
* ``naive``: a plain next-fit over a bytearray (``bytearray.find``) in the same
  harness, as a reference.

Also reported: bytes per block at 2**28 blocks (fresh, and with every leaf
materialised), and a cProfile breakdown of one end-to-end run per fill.

Usage: ``python benchmarks/blist_bench.py [--runs 5] [--out benchmarks/results/blist.json]``.
Prints JSON to stdout.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import os
import platform
import pstats
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from vmpager.swap import blist as blist_module
from vmpager.swap._blist_workload import (
    WorkloadResult,
    run_workload,
    splitmix64,
    splitmix64_stream,
)
from vmpager.swap.blist import Blist

NBLOCKS = 1 << 20
NOPS = 1_000_000
#: FreeBSD's placement at fill 0.5 (from the reference C blist).
EXPECTED_AT_HALF = {
    "failures": 0,
    "free_blocks": 524_010,
    "live_runs": 61_544,
    "checksum": 0x3776E72B6F4553DB,
}
#: Reference throughputs on this machine (ops/s), from the benchmark notes.
REFERENCE = {
    "freebsd_c_blist": {"0.5": 16.8e6, "0.9": 3.2e6},
    "naive_python_next_fit": {"0.5": 0.54e6, "0.9": 0.37e6},
    "target": {"0.5": 2.1e6, "0.9": 0.4e6},
}


class NaiveNextFit:
    """Reference allocator: next fit by ``bytearray.find`` (one byte per block)."""

    def __init__(self, nblocks: int) -> None:
        self.nblocks = nblocks
        self.used = bytearray(nblocks)
        self.cursor = 0
        self.nfree = nblocks
        self.patterns = [bytes(n) for n in range(65)]

    def alloc(self, count: int) -> tuple[int, int] | None:
        pattern = self.patterns[count]
        blk = self.used.find(pattern, self.cursor)
        if blk < 0:
            blk = self.used.find(pattern)
            if blk < 0:
                return None
        self.used[blk : blk + count] = b"\x01" * count
        self.nfree -= count
        end = blk + count
        self.cursor = 0 if end == self.nblocks else end
        return blk, count

    def free(self, blk: int, count: int) -> None:
        self.used[blk : blk + count] = self.patterns[count]
        self.nfree += count

    def avail(self) -> int:
        return self.nfree


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
                break
    return {
        "uname": " ".join(platform.uname()),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kib / (1 << 20), 1),
        "python": platform.python_version(),
        "numpy": np.__version__,
    }


def summary(result: WorkloadResult) -> dict[str, Any]:
    return {
        "fill_allocs": result.fill_allocs,
        "failures": result.failures,
        "free_blocks": result.free_blocks,
        "live_runs": result.live_runs,
        "checksum": f"{result.checksum:#018x}",
    }


def replay(
    alloc: Callable[[int], object],
    free: Callable[[int, int], object],
    trace: Sequence[int | tuple[int, int]],
) -> float:
    """Time the recorded calls in a bare loop; return seconds.

    The garbage collector is off while timing, as ``timeit`` does: with the
    benchmark's millions of live objects, its passes (set off by the returned
    tuples) would otherwise land in whichever loop happens to be running.
    """
    gc.collect()
    gc.disable()
    try:
        started = time.perf_counter()
        for op in trace:
            if op.__class__ is int:
                alloc(op)
            else:
                free(*op)  # type: ignore[misc]
        return time.perf_counter() - started
    finally:
        gc.enable()


def _stub_alloc(count: int) -> None:
    return None


def _stub_free(blk: int, count: int) -> None:
    return None


def median_rate(samples: list[float], nops: int) -> dict[str, Any]:
    rates = sorted(nops / s for s in samples)
    return {
        "median_ops_per_s": round(statistics.median(rates)),
        "min_ops_per_s": round(rates[0]),
        "max_ops_per_s": round(rates[-1]),
        "runs": len(rates),
    }


def measure_fill(fill: float, nblocks: int, nops: int, runs: int) -> dict[str, Any]:
    out: dict[str, Any] = {"fill": fill, "nblocks": nblocks, "nops": nops}
    out["load_average_before"] = [round(x, 2) for x in os.getloadavg()]
    end_to_end: list[float] = []
    naive: list[float] = []
    replays: list[float] = []
    stubs: list[float] = []
    first: WorkloadResult | None = None
    # One recording run gives the trace and the placement summary.
    recorded = run_workload(Blist(nblocks), nblocks, fill, nops, record=True)
    assert recorded.trace is not None
    trace = recorded.trace
    for _ in range(runs):
        gc.collect()
        result = run_workload(Blist(nblocks), nblocks, fill, nops, clock=time.perf_counter)
        end_to_end.append(result.seconds)
        if first is None:
            first = result
        assert summary(result) == summary(recorded), "placement differs between runs"
        gc.collect()
        naive_bl = NaiveNextFit(nblocks)
        reference = run_workload(naive_bl, nblocks, fill, nops, clock=time.perf_counter)
        naive.append(reference.seconds)
        assert summary(reference) == summary(recorded), "blist and naive next fit disagree"
        # Replay: same fill phase, then the recorded calls in a bare loop.
        bl = Blist(nblocks)
        run_workload(bl, nblocks, fill, 0)
        gc.collect()
        replays.append(replay(bl.alloc, bl.free, trace))
        stubs.append(replay(_stub_alloc, _stub_free, trace))
        bl.check()
    assert first is not None
    out["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    out["placement"] = summary(first)
    if nblocks == NBLOCKS and nops == NOPS and fill == 0.5:
        got = {k: v for k, v in summary(first).items() if k in EXPECTED_AT_HALF}
        want = dict(EXPECTED_AT_HALF, checksum=f"{EXPECTED_AT_HALF['checksum']:#018x}")
        assert got == want, f"FreeBSD placement not reproduced: {got} != {want}"
        out["placement_matches_freebsd"] = True
    out["end_to_end"] = median_rate(end_to_end, nops)
    out["replay"] = median_rate(replays, nops)
    loop_s = statistics.median(stubs)
    out["replay_loop_overhead_ns_per_op"] = round(loop_s / nops * 1e9, 1)
    net = [max(s - loop_s, 1e-9) for s in replays]
    out["replay_minus_loop"] = median_rate(net, nops)
    out["naive_next_fit_end_to_end"] = median_rate(naive, nops)
    key = str(fill)
    out["vs_reference"] = {
        "end_to_end_over_naive_same_run": round(
            out["end_to_end"]["median_ops_per_s"]
            / out["naive_next_fit_end_to_end"]["median_ops_per_s"],
            2,
        ),
        "replay_over_target": round(
            out["replay"]["median_ops_per_s"] / REFERENCE["target"][key], 3
        ),
        "replay_over_freebsd_c": round(
            out["replay"]["median_ops_per_s"] / REFERENCE["freebsd_c_blist"][key], 3
        ),
    }
    bl = Blist(nblocks)
    run_workload(bl, nblocks, fill, nops)
    stats = bl.statistics()
    hist = bl.gap_histogram()
    out["final_state"] = {
        "alloc_calls": stats.alloc_calls,
        "slow_searches": stats.slow_searches,
        "alloc_retries": stats.alloc_retries,
        "free_runs": hist.nruns,
        "longest_free_run": hist.longest,
        "average_free_run": hist.average,
    }
    return out


def rng_cost(nops: int) -> dict[str, Any]:
    started = time.perf_counter()
    splitmix64_stream(12345, nops)
    vectorised = time.perf_counter() - started
    state = 12345
    started = time.perf_counter()
    for _ in range(nops):
        state, _value = splitmix64(state)
    python = time.perf_counter() - started
    return {
        "numpy_stream_ns_per_value": round(vectorised / nops * 1e9, 1),
        "pure_python_ns_per_value": round(python / nops * 1e9, 1),
    }


def deep_size(bl: Blist) -> int:
    """Bytes held by a blist's containers and the distinct ints in them."""
    seen: set[int] = set()
    total = sys.getsizeof(bl)

    def add(obj: object) -> None:
        nonlocal total
        if id(obj) not in seen:
            seen.add(id(obj))
            total += sys.getsizeof(obj)

    containers = [bl._leaves, bl._hints, bl._nonempty, *bl._hints, *bl._nonempty]
    for container in containers:
        add(container)
    for values in [bl._leaves, *bl._hints, *bl._nonempty]:
        for value in values:
            add(value)
    return total


def memory(nblocks: int) -> dict[str, Any]:
    bl = Blist(nblocks)
    started = time.perf_counter()
    bl = Blist(nblocks)
    create_s = time.perf_counter() - started
    fresh = deep_size(bl)
    lbits = bl.statistics().leaf_bits
    # Take one block in every leaf: every leaf becomes its own int.
    for blk in range(0, nblocks, lbits):
        bl.fill(blk, 1)
    materialised = deep_size(bl)
    return {
        "nblocks": nblocks,
        "create_seconds": round(create_s, 3),
        "fresh_bytes": fresh,
        "fresh_bytes_per_block": round(fresh / nblocks, 4),
        "materialised_bytes": materialised,
        "materialised_bytes_per_block": round(materialised / nblocks, 4),
        "materialised_bits_per_block": round(8 * materialised / nblocks, 3),
    }


def profile(fill: float, nblocks: int, nops: int) -> list[dict[str, Any]]:
    bl = Blist(nblocks)
    profiler = cProfile.Profile()
    profiler.enable()
    run_workload(bl, nblocks, fill, nops)
    profiler.disable()
    stream = io.StringIO()
    stats = pstats.Stats(profiler, stream=stream)
    rows = []
    total = sum(v[2] for v in stats.stats.values())  # type: ignore[attr-defined]
    entries = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])  # type: ignore[attr-defined]
    for (filename, line, name), (_cc, ncalls, tottime, cumtime, _callers) in entries[:12]:
        rows.append(
            {
                "function": f"{os.path.basename(filename)}:{line}:{name}",
                "calls": ncalls,
                "tottime_s": round(tottime, 3),
                "share": round(tottime / total, 3),
                "cumtime_s": round(cumtime, 3),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="runs per measurement (median)")
    parser.add_argument("--fill", type=float, nargs="*", default=[0.5, 0.9])
    parser.add_argument("--nblocks", type=int, default=NBLOCKS)
    parser.add_argument("--nops", type=int, default=NOPS)
    parser.add_argument("--memory-nblocks", type=int, default=1 << 28)
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)

    report: dict[str, Any] = {
        "benchmark": "blist swap-allocator workload",
        "machine": machine(),
        "geometry": {
            "leaf_bits": blist_module.DEFAULT_LEAF_BITS,
            "fanout": blist_module.DEFAULT_FANOUT,
        },
        "reference_ops_per_s": REFERENCE,
        "notes": (
            "end_to_end: workload loop, random stream precomputed, gc on. replay: recorded "
            "calls in a bare loop, gc off (as timeit). replay_minus_loop subtracts the same "
            "loop calling empty functions, so it also removes the call overhead."
        ),
        "rng": rng_cost(args.nops),
        "workload": [measure_fill(f, args.nblocks, args.nops, args.runs) for f in args.fill],
        "memory": memory(args.memory_nblocks),
    }
    if not args.no_profile:
        report["profile"] = {
            str(f): profile(f, args.nblocks, min(args.nops, 300_000)) for f in args.fill
        }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
