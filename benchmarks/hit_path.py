"""The resident hit path: read+write pairs per second through ``read``/``write``.

The same loop as the per-access phase of the paging workload (an 8-byte
``read`` and an 8-byte ``write`` of the value plus one per access, see
``vmpager.bench.loop.access``), on an object whose pages are all resident
and dirty, beside the same loop on a plain ``bytearray`` (the floor of the
interpreter's own cost), in one process, alternating, ``--reps`` times each.
Times are the thread's CPU time (``time.thread_time``): on a shared machine
that leaves out the time the loop waits for a core.

Usage (from the repository root)::

    PYTHONPATH=src python benchmarks/hit_path.py [--npages 16384]
        [--accesses 1000000] [--reps 5] [--pattern random|seq]
        [--output benchmarks/results/hit_path.json]

Prints the JSON report (median and every repetition, pairs/s and µs per
pair, the load average) to stdout; ``--output`` also writes it. With
``--breakdown`` it also times, interleaved, in rounds of ``--accesses``
pairs, the loop with steps of the object's work swapped in one at a time:
two functions that do nothing, the bytearray, the bytearray with the write
under the VM lock, and the object (min and median µs per pair over
``--rounds``). (A mix of the object's read and the bytearray's write would
touch two arenas per pair, twice the cache and TLB misses: not a part.)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vmpager.bench.kernel import describe_machine
from vmpager.vm.system import VM

PAGE = 4096
MIB = 1 << 20


def _loop(
    read: Callable[[int, int], bytes], write: Callable[[int, bytes], Any], offsets: list[int]
) -> float:
    start = time.thread_time()
    for offset in offsets:
        value = int.from_bytes(read(offset, 8), "little")
        write(offset, ((value + 1) & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little"))
    return time.thread_time() - start


def measure(npages: int, accesses: int, reps: int, pattern: str) -> dict[str, Any]:
    """Pairs per second on a resident object and on a bytearray, ``reps`` each."""
    rng = np.random.default_rng(7)
    if pattern == "random":
        pindices = rng.integers(0, npages, accesses)
    else:
        pindices = np.arange(accesses) % npages
    offsets = (pindices * PAGE).tolist()
    plain = bytearray(npages * PAGE)

    def plain_read(offset: int, length: int) -> bytes:
        return bytes(plain[offset : offset + length])

    def plain_write(offset: int, data: bytes) -> int:
        plain[offset : offset + len(data)] = data
        return len(data)

    vm_s: list[float] = []
    plain_s: list[float] = []
    with VM(memory=f"{2 * npages * PAGE // MIB + 1}M", swap=[]) as vm:
        obj = vm.allocate(npages * PAGE)
        obj.write(0, bytes(npages * PAGE))  # resident and dirty: the steady state
        _loop(obj.read, obj.write, offsets[: accesses // 10])  # warm-up
        for _ in range(reps):
            vm_s.append(_loop(obj.read, obj.write, offsets))
            plain_s.append(_loop(plain_read, plain_write, offsets))
        vm.check()
    vm_med = statistics.median(vm_s)
    plain_med = statistics.median(plain_s)
    return {
        "pattern": pattern,
        "npages": npages,
        "accesses": accesses,
        "reps": reps,
        "vmpager_pairs_per_s": round(accesses / vm_med),
        "vmpager_us_per_pair": round(vm_med / accesses * 1e6, 3),
        "bytearray_pairs_per_s": round(accesses / plain_med),
        "bytearray_us_per_pair": round(plain_med / accesses * 1e6, 3),
        # Per repetition, the object's time over the bytearray's right after it:
        # steadier than either alone when the machine's speed drifts.
        "vmpager_over_bytearray_median": round(
            statistics.median(v / p for v, p in zip(vm_s, plain_s, strict=True)), 3
        ),
        "vmpager_runs_pairs_per_s": [round(accesses / s) for s in vm_s],
        "bytearray_runs_pairs_per_s": [round(accesses / s) for s in plain_s],
    }


def breakdown(npages: int, accesses: int, rounds: int) -> dict[str, Any]:
    """Thread CPU µs per pair of the loop with parts of the object's work swapped in."""
    offsets = (np.random.default_rng(7).integers(0, npages, accesses) * PAGE).tolist()
    plain = bytearray(npages * PAGE)
    zeros = bytes(8)

    def empty_read(offset: int, length: int) -> bytes:
        return zeros

    def empty_write(offset: int, data: bytes) -> int:
        return 8

    def plain_read(offset: int, length: int) -> bytes:
        return bytes(plain[offset : offset + length])

    def plain_write(offset: int, data: bytes) -> int:
        plain[offset : offset + len(data)] = data
        return len(data)

    times: dict[str, list[float]] = {}
    with VM(memory=f"{2 * npages * PAGE // MIB + 1}M", swap=[]) as vm:
        obj = vm.allocate(npages * PAGE)
        obj.write(0, bytes(npages * PAGE))
        lock = obj.kernel.lock

        def locked_write(offset: int, data: bytes) -> int:
            lock.acquire()
            try:
                plain[offset : offset + len(data)] = data
                return len(data)
            finally:
                lock.release()

        variants: dict[str, tuple[Callable[[int, int], bytes], Callable[[int, bytes], Any]]] = {
            "empty functions": (empty_read, empty_write),
            "bytearray": (plain_read, plain_write),
            "bytearray, write under the VM lock": (plain_read, locked_write),
            "object read and write": (obj.read, obj.write),
        }
        names = list(variants)
        for name in names:
            times[name] = []
        for r in range(rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                read, write = variants[name]
                times[name].append(_loop(read, write, offsets) / accesses * 1e6)
        vm.check()
    return {
        name: {"min_us": round(min(v), 3), "median_us": round(statistics.median(v), 3)}
        for name, v in times.items()
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--npages", type=int, default=16384)
    parser.add_argument("--accesses", type=int, default=1_000_000)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--pattern", choices=("random", "seq"), default="random")
    parser.add_argument("--breakdown", action="store_true", help="also time the parts")
    parser.add_argument("--rounds", type=int, default=12, help="rounds of the breakdown")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    report = {
        "machine": describe_machine(),
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
        **measure(args.npages, args.accesses, args.reps, args.pattern),
    }
    if args.breakdown:
        report["breakdown_us_per_pair"] = breakdown(args.npages, args.accesses, args.rounds)
    report["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    text = json.dumps(report, indent=2)
    print(text)
    if args.output is not None:
        args.output.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
