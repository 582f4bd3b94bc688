"""Pageout into fragmented swap: write throughput with free runs of 1, 2, 3 blocks.

A VM of ``--memory-mib`` with the default configuration (daemon thread,
batched pageout) over a RAM swap device of ``--swap-mib``. The swap is filled
through strategy writes; then every page whose block is not ``run`` modulo
``run + 1`` is discarded, leaving free runs of exactly ``run`` blocks (for
``run = 0``: the swap is emptied, one free run, the reference point). The
timed phase writes as many whole pages as swap has free blocks minus memory,
sequentially, in one new object, then reads them back and checks them
(untimed). Reported per run length: pages written per second, the median of
``--reps`` repetitions taken round-robin (0 1 2 3 0 1 2 3 ...), and the
ratio to the unfragmented case. Before the halving went down to single
blocks, runs 1-3 ended in ``SwapExhausted``.

Usage: ``python benchmarks/fragmented_bench.py [--memory-mib 16] [--swap-mib 64]
[--reps 3] [--out benchmarks/results/fragmented.json]``. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from typing import Any

from vmpager.devices.memory import MemoryDevice
from vmpager.swap.meta import SWAPBLK_NONE
from vmpager.vm.config import VMConfig
from vmpager.vm.system import VM

PAGE = 4096


def one(memory_mib: int, swap_mib: int, run: int) -> float:
    nblocks = swap_mib * 256
    vm = VM(
        memory=memory_mib << 20,
        swap=[MemoryDevice(nblocks, PAGE, name="ram0")],
        config=VMConfig(),
    )
    with vm:
        filler = vm.allocate(nblocks * PAGE)
        filler.strategy_write(0, bytes(nblocks * PAGE))
        for p in range(nblocks):
            blk = vm.swap_pager.block_of(filler, p)
            if run == 0 or (blk != SWAPBLK_NONE and blk % (run + 1) != run):
                filler.discard(p * PAGE, PAGE)
        npages = vm.space.free_blocks - memory_mib * 256
        obj = vm.allocate(npages * PAGE)
        page = bytearray(PAGE)
        t0 = time.perf_counter()
        for p in range(npages):
            page[:8] = p.to_bytes(8, "little")
            obj.write(p * PAGE, page)
        elapsed = time.perf_counter() - t0
        for p in range(npages):
            if obj.read(p * PAGE, 8) != p.to_bytes(8, "little"):
                raise AssertionError(f"page {p} lost")
        vm.check()
    return npages / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory-mib", type=int, default=16)
    parser.add_argument("--swap-mib", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    runs = (0, 1, 2, 3)
    samples: dict[int, list[float]] = {r: [] for r in runs}
    load_before = os.getloadavg()
    for _ in range(args.reps):
        for run in runs:
            samples[run].append(one(args.memory_mib, args.swap_mib, run))
    base = statistics.median(samples[0])
    result: dict[str, Any] = {
        "benchmark": "fragmented_pageout",
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
        },
        "memory_mib": args.memory_mib,
        "swap_mib": args.swap_mib,
        "reps": args.reps,
        "pages_per_s": {
            ("contiguous" if r == 0 else f"free_runs_of_{r}"): {
                "median": statistics.median(samples[r]),
                "samples": samples[r],
                "ratio_to_contiguous": statistics.median(samples[r]) / base,
            }
            for r in runs
        },
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
