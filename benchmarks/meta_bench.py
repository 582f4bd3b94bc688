"""Benchmark of vmpager.swap.meta.SwapMeta: memory per swapped page and op costs.

Memory: one object with N assigned pages (N = 1M and 4M by default) in three
layouts -- ``dense`` (pages 0..N-1), ``alternate`` (every other page of
0..2N-1) and ``random_half`` (each page of 0..2N-1 with probability 1/2,
fixed seed; every chunk is about half full, the worst of the three), plus
``random_half`` again with block numbers past 2**32, which need the 64-bit
block storage.
Reported per layout: bytes per assigned page as measured by tracemalloc (all
memory the structure allocated, minus what was freed) and as
``statistics().bytes_used`` estimates it. A plain dict {(oid, pindex): blk}
is measured the same way as the reference point.

Speed (on an object of ``--ops-pages`` pages, dense, blocks in a shuffled
order): single-page operations in a plain ``for`` loop over precomputed
arguments, so each figure includes the loop and the bound-method call --
the cost a caller pays. Reported as ns per op and ops per second, each the
median of ``--runs`` runs, side by side with the same loop over the dict
model and over a no-op method (the harness floor). Range operations too:
lookup_range of 16 and 1024 pages, free_range of 16 pages, free_all and
transfer of the whole object.

Swap tiers (``--tiers``): the whole per-page metadata of a swapped page with
its check -- the swap metadata above plus the tier's per-block checksum
(xxh3-64) or authentication data (AES-256-GCM) -- measured the same way
(tracemalloc over building the structure and sealing one page into every
block of a device as large as the pages swapped), per layout and size.

Usage: ``python benchmarks/meta_bench.py [--runs 5] [--sizes 1048576,4194304]
[--ops-pages 1048576] [--tiers] [--tiers-only] [--out benchmarks/results/meta.json]``.
Prints JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

from vmpager.swap.meta import SwapMeta


def machine() -> dict[str, Any]:
    cpu = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kib = int(f.readline().split()[1])
    return {
        "uname": " ".join(platform.uname()),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kib / 2**20, 1),
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "loadavg_at_start": os.getloadavg(),
    }


def _ignore(blk: int, count: int) -> None:
    pass


def layout(name: str, npages: int, seed: int = 1) -> np.ndarray:
    if name == "dense":
        return np.arange(npages, dtype=np.int64)
    if name == "alternate":
        return np.arange(0, 2 * npages, 2, dtype=np.int64)
    if name == "random_half":
        rng = np.random.default_rng(seed)
        pindexes = np.flatnonzero(rng.random(2 * npages) < 0.5).astype(np.int64)
        return pindexes
    raise ValueError(name)


def memory(npages: int, name: str, wide: bool = False) -> dict[str, Any]:
    """Bytes per assigned page of one object; ``wide`` puts the blocks past 2**32."""
    pindexes = layout(name, npages).tolist()
    blks = (np.random.default_rng(2).permutation(len(pindexes)) + (2**32 if wide else 0)).tolist()
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    meta = SwapMeta(_ignore)
    build = meta.build
    for pindex, blk in zip(pindexes, blks, strict=True):
        build(1, pindex, blk)
    gc.collect()
    traced = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    stats = meta.statistics()
    meta.check()
    result = {
        "assigned_pages": stats.pages,
        "chunks": stats.chunks,
        "bytes_per_page_traced": round(traced / stats.pages, 2),
        "bytes_per_page_estimated": round(stats.bytes_per_page, 2),
    }
    del meta
    if npages <= 1 << 20 and not wide:
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        model = {(1, pindex): blk for pindex, blk in zip(pindexes, blks, strict=True)}
        traced = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        result["dict_model_bytes_per_page_traced"] = round(traced / len(model), 2)
        del model
    return result


def tier_memory(npages: int, name: str, seal_kind: str) -> dict[str, Any]:
    """Bytes per swapped page of the swap metadata plus the tier's check, traced.

    ``seal_kind`` is "xxh3" or "gcm". The device has as many blocks as there
    are swapped pages (its metadata arrays are sized by the device), and every
    block is sealed once, so every byte of them is touched.
    """
    from vmpager.tiers.seal import Checksum, Encryption

    pindexes = layout(name, npages).tolist()
    nblocks = len(pindexes)
    blks = np.random.default_rng(2).permutation(nblocks).tolist()
    page = memoryview(bytes(range(256)) * 16)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    meta = SwapMeta(_ignore)
    build = meta.build
    for pindex, blk in zip(pindexes, blks, strict=True):
        build(1, pindex, blk)
    gc.collect()
    after_meta = tracemalloc.get_traced_memory()[0]
    seal = Checksum(nblocks) if seal_kind == "xxh3" else Encryption(nblocks, "bench")
    for blk in range(nblocks):
        seal.seal(blk, page)
    gc.collect()
    after_seal = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    pages = meta.statistics().pages
    result = {
        "swapped_pages": pages,
        "seal": seal_kind,
        "meta_bytes_per_page": round((after_meta - before) / pages, 2),
        "seal_bytes_per_page": round((after_seal - after_meta) / pages, 2),
        "seal_bytes_per_block_declared": seal.bytes_per_block,
        "total_bytes_per_page": round((after_seal - before) / pages, 2),
    }
    del meta, seal
    return result


class _Noop:
    """The harness floor: the same loops calling methods that do nothing."""

    def call2(self, oid: int, pindex: int) -> int:
        return -1

    def call3(self, oid: int, pindex: int, blk: int) -> None:
        pass


def _time_ns(body: Callable[[], object]) -> float:
    """Wall time of body() in ns, with the garbage collector held off."""
    gc.collect()
    gc.disable()
    try:
        t0 = time.perf_counter_ns()
        body()
        return time.perf_counter_ns() - t0
    finally:
        gc.enable()


def _loop2(fn: Callable[[int, int], object], pindexes: list[int]) -> None:
    for p in pindexes:
        fn(1, p)


def _loop3(fn: Callable[[int, int, int], object], pindexes: list[int], blks: list[int]) -> None:
    for p, b in zip(pindexes, blks, strict=True):
        fn(1, p, b)


def _loop_range(fn: Callable[[int, int, int], object], starts: list[int], npages: int) -> None:
    for s in starts:
        fn(1, s, npages)


def _dict_store(model: dict[tuple[int, int], int], pindexes: list[int], blks: list[int]) -> None:
    for p, b in zip(pindexes, blks, strict=True):
        model[(1, p)] = b


def _dict_get(model: dict[tuple[int, int], int], pindexes: list[int]) -> None:
    get = model.get
    for p in pindexes:
        get((1, p), -1)


def _dict_pop(model: dict[tuple[int, int], int], pindexes: list[int]) -> None:
    pop = model.pop
    for p in pindexes:
        pop((1, p), None)


def single_page_ops(npages: int, runs: int) -> dict[str, Any]:
    """ns per op of the single-page hot paths, SwapMeta beside a dict and a no-op."""
    rng = np.random.default_rng(3)
    sequential = list(range(npages))
    shuffled = rng.permutation(npages).tolist()  # pindexes in random order
    blks = rng.permutation(npages).tolist()
    fresh_blks = (rng.permutation(npages) + npages).tolist()
    misses = (rng.permutation(npages) + 4 * npages).tolist()
    samples: dict[str, list[float]] = {}

    def record(name: str, body: Callable[[], object]) -> None:
        samples.setdefault(name, []).append(_time_ns(body) / npages)

    for _ in range(runs):
        meta = SwapMeta(_ignore)
        record("build_sequential", partial(_loop3, meta.build, sequential, blks))
        record("lookup_random_hit", partial(_loop2, meta.lookup, shuffled))
        record("lookup_miss", partial(_loop2, meta.lookup, misses))
        record("build_replace_random", partial(_loop3, meta.build, shuffled, fresh_blks))
        record("free_random", partial(_loop2, meta.free, shuffled))
        assert meta.total() == 0
        record("build_random", partial(_loop3, meta.build, shuffled, blks))
        record("pop_sequential", partial(_loop2, meta.pop, sequential))
        assert meta.total() == 0

        model: dict[tuple[int, int], int] = {}
        record("dict_build_sequential", partial(_dict_store, model, sequential, blks))
        record("dict_lookup_random_hit", partial(_dict_get, model, shuffled))
        record("dict_free_random", partial(_dict_pop, model, shuffled))
        assert not model

        noop = _Noop()
        record("noop_call2", partial(_loop2, noop.call2, shuffled))
        record("noop_call3", partial(_loop3, noop.call3, sequential, blks))

    result: dict[str, Any] = {"object_pages": npages, "runs": runs}
    for name, values in samples.items():
        ns = statistics.median(values)
        result[name] = {"ns_per_op": round(ns, 1), "ops_per_s": round(1e9 / ns)}
    return result


def _filled(npages: int, blks: list[int]) -> SwapMeta:
    meta = SwapMeta(_ignore)
    _loop3(meta.build, list(range(npages)), blks)
    return meta


def range_ops(npages: int, runs: int) -> dict[str, Any]:
    """Costs of the range operations on a dense object of npages pages.

    Per-call figures in us for the short ranges, whole-object ones in ms.
    """
    rng = np.random.default_rng(4)
    blks = rng.permutation(npages).tolist()
    starts16 = rng.integers(0, npages - 16, 20000).tolist()
    starts1024 = rng.integers(0, npages - 1024, 2000).tolist()
    # Disjoint aligned ranges, so that every call frees blocks.
    aligned16 = (rng.permutation(npages // 16)[: npages // 64] * 16).tolist()
    aligned1024 = (rng.permutation(npages // 1024)[: max(1, npages // 4096)] * 1024).tolist()
    samples: dict[str, list[float]] = {}

    def per_call_us(name: str, body: Callable[[], object], ncalls: int) -> None:
        samples.setdefault(name, []).append(_time_ns(body) / ncalls / 1e3)

    def whole_ms(name: str, body: Callable[[], object]) -> None:
        samples.setdefault(name, []).append(_time_ns(body) / 1e6)

    for _ in range(runs):
        meta = _filled(npages, blks)
        per_call_us(
            "lookup_range_16_us", partial(_loop_range, meta.lookup_range, starts16, 16), 20000
        )
        per_call_us(
            "lookup_range_1024_us", partial(_loop_range, meta.lookup_range, starts1024, 1024), 2000
        )
        per_call_us(
            "free_range_16_aligned_us",
            partial(_loop_range, meta.free_range, aligned16, 16),
            len(aligned16),
        )
        per_call_us(
            "free_range_1024_aligned_us",
            partial(_loop_range, meta.free_range, aligned1024, 1024),
            len(aligned1024),
        )
        meta = _filled(npages, blks)
        whole_ms("free_all_ms", partial(meta.free_all, 1))
        meta = _filled(npages, blks)
        whole_ms("free_range_whole_ms", partial(meta.free_range, 1, 0, npages))
        meta = _filled(npages, blks)
        whole_ms("transfer_whole_ms", partial(meta.transfer, 1, 2, 0, npages, _never_resident))
        assert meta.count(2) == npages and meta.count(1) == 0
        whole_ms("items_ms", partial(_drain, meta))
        whole_ms("owner_arrays_ms", meta.owner_arrays)
        whole_ms("check_ms", meta.check)
    result: dict[str, Any] = {"object_pages": npages, "runs": runs}
    for name, values in samples.items():
        result[name] = round(statistics.median(values), 3)
    return result


def _drain(meta: SwapMeta) -> None:
    for _item in meta.items():
        pass


def _never_resident(d: int) -> bool:
    return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--sizes", default=f"{1 << 20},{1 << 22}")
    parser.add_argument("--ops-pages", type=int, default=1 << 20)
    parser.add_argument("--layouts", default="dense,alternate,random_half")
    parser.add_argument("--out", default="")
    parser.add_argument("--tiers", action="store_true", help="also the swap tiers' metadata")
    parser.add_argument("--tiers-only", action="store_true", help="only the swap tiers' part")
    args = parser.parse_args()
    report: dict[str, Any] = {
        "benchmark": "swap metadata (vmpager.swap.meta)",
        "machine": machine(),
    }
    if args.tiers or args.tiers_only:
        report["tiers_memory"] = {
            f"{name}_{size}_{kind}": tier_memory(size, name, kind)
            for size in (int(s) for s in args.sizes.split(","))
            for name in args.layouts.split(",")
            for kind in ("xxh3", "gcm")
        }
    if args.tiers_only:
        text = json.dumps(report, indent=2)
        print(text)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text + "\n")
        return
    report["memory"] = {
        f"{name}_{size}": memory(size, name)
        for size in (int(s) for s in args.sizes.split(","))
        for name in args.layouts.split(",")
    }
    # Block numbers past 2**31 - 1 (swap spaces over 8 TiB of 4 KiB pages)
    # need 64-bit storage: the worst layout again, at the first size.
    first_size = int(args.sizes.split(",")[0])
    report["memory"][f"random_half_{first_size}_blocks_past_2**32"] = memory(
        first_size, "random_half", wide=True
    )
    report["single_page_ops"] = single_page_ops(args.ops_pages, args.runs)
    report["range_ops"] = range_ops(args.ops_pages, args.runs)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
