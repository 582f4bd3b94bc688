"""Benchmark: 4 KiB reads of a large file through vmpager, numpy.memmap and os.pread.

A file of ``--size`` bytes (1 GiB by default) of incompressible random bytes
is created once in ``--dir`` (ext4 on the machine's disk by default, not
tmpfs) and read with 4 KiB reads in two patterns:

- ``sequential``: every page of the file, in order (262,144 reads for 1 GiB);
- ``random``: ``--random-reads`` page-aligned reads at offsets drawn with a
  fixed seed (numpy PCG64, seed 42), the same list for every contender.

Contenders, each returning the 4 KiB as ``bytes``:

- ``vmpager``: ``VM(memory=--budget, swap=[])`` (128 MiB, page daemon
  thread on), ``vm.map_file(path)``, ``obj.read(offset, 4096)``. Pages of
  4 KiB. Sequential read-ahead ramps up to the vnode pager's default (64
  pages) with two windows in flight asynchronously; random faults read one
  page.
- ``vmpager_sync`` (sequential only): asynchronous read-ahead off (each
  window read by the faulting thread), to show what the overlap buys.
- ``vmpager_ra8`` (sequential only): asynchronous read-ahead off and the
  window capped at the VM's 8-page read-around window, to show what the
  ramp buys.
- ``memmap``: ``numpy.memmap(path, uint8, "r")``, ``mm[off:off + 4096].tobytes()``;
  the kernel's 4 KiB pages, its fault read-around and read-ahead, and no
  memory budget (the page cache may hold the whole file).
- ``pread``: ``os.pread(fd, 4096, off)`` on a plain descriptor: kernel
  read-ahead, page cache, no budget.

Each contender starts cold: before every run the file's pages are dropped
from the OS page cache with ``posix_fadvise(POSIX_FADV_DONTNEED)`` (the
file is clean, so the drop is complete; ``cached_pages_before`` reports it,
measured with mincore), and vmpager gets a fresh VM. Runs alternate between
contenders (the order rotates each repetition) and each figure is the
median of ``--reps`` runs. A checksum (sum of the first byte of every read)
must agree between contenders. ``cached_pages_after`` shows how much of the
file the OS page cache holds after a run: vmpager advises DONTNEED after
each transfer, so its data lives in its frames only.

Usage: ``python benchmarks/file_bench.py [--dir /var/tmp] [--size 1G]
[--budget 128M] [--random-reads 50000] [--reps 3] [--out FILE]``.
Prints JSON.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import mmap
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from vmpager.units import parse_size
from vmpager.vm.system import VM

PAGE = 4096
FILE_NAME = "vmpager-file-bench.dat"

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


def machine(directory: str) -> dict[str, Any]:
    cpu = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kib = int(f.readline().split()[1])
    fs = "?"
    best = ""
    with open("/proc/mounts") as f:
        for line in f:
            dev, mnt, kind = line.split()[:3]
            if os.path.realpath(directory).startswith(mnt) and len(mnt) > len(best):
                best, fs = mnt, f"{kind} on {dev} mounted at {mnt}"
    return {
        "uname": " ".join(platform.uname()),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kib / 2**20, 1),
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "file_system": fs,
        "loadavg_at_start": os.getloadavg(),
    }


def make_file(path: str, size: int) -> None:
    """Random bytes (PCG64 seed 42), written once and synced so a drop is complete."""
    if os.path.exists(path) and os.path.getsize(path) == size:
        return
    rng = np.random.default_rng(42)
    chunk = 64 << 20
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(chunk, left)
            f.write(rng.bytes(n))
            left -= n
        f.flush()
        os.fsync(f.fileno())


def drop_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def cached_pages(path: str) -> int:
    """Pages of the file in the OS page cache (mincore over a fresh mapping)."""
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap failed")
        try:
            npages = -(-size // PAGE)
            vec = (ctypes.c_ubyte * npages)()
            if _libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore failed")
            return int(np.frombuffer(vec, dtype=np.uint8).astype(bool).sum())
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)


Reader = Callable[[list[int]], tuple[int, dict[str, Any]]]


def read_pread(path: str) -> Reader:
    def run(offsets: list[int]) -> tuple[int, dict[str, Any]]:
        fd = os.open(path, os.O_RDONLY)
        try:
            total = 0
            pread = os.pread
            for off in offsets:
                total += pread(fd, PAGE, off)[0]
            return total, {}
        finally:
            os.close(fd)

    return run


def read_memmap(path: str) -> Reader:
    def run(offsets: list[int]) -> tuple[int, dict[str, Any]]:
        mm = np.memmap(path, dtype=np.uint8, mode="r")
        try:
            total = 0
            for off in offsets:
                total += mm[off : off + PAGE].tobytes()[0]
            return total, {}
        finally:
            mm._mmap.close()  # type: ignore[attr-defined]

    return run


def read_vmpager(
    path: str, budget: int, readahead_max_npages: int | None = None, asynchronous: bool = True
) -> Reader:
    def run(offsets: list[int]) -> tuple[int, dict[str, Any]]:
        vm = VM(memory=budget, swap=[], page_size=PAGE)
        try:
            if readahead_max_npages is not None:
                vm.vnode_pager.readahead_max_npages = readahead_max_npages
            if not asynchronous:
                vm.vnode_pager.async_readahead_windows = 0
            obj = vm.map_file(path)
            read = obj.read
            total = 0
            for off in offsets:
                total += read(off, PAGE)[0]
            st = vm.statistics()
            vs = vm.vnode_pager.statistics()
            extra = {
                "faults": st.faults,
                "pageins": vs.pageins,
                "pagein_pages": vs.pagein_pages,
                "mean_pages_per_read": round(vs.pagein_pages / max(vs.pageins, 1), 1),
                "async_pagein_pages": vs.async_pagein_pages,
                "readaround_hits": st.readaround_hits,
                "resident_npages_at_end": st.resident_npages,
                "nframes": st.nframes,
                "daemon_scans": st.daemon_scans,
            }
            obj.close()
            return total, extra
        finally:
            vm.close()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--dir", default="/var/tmp")
    parser.add_argument("--size", default="1G")
    parser.add_argument("--budget", default="128M")
    parser.add_argument("--random-reads", type=int, default=50_000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="keep the test file")
    parser.add_argument("--out")
    args = parser.parse_args()
    size = parse_size(args.size, "--size", minimum=PAGE, multiple=PAGE)
    budget = parse_size(args.budget, "--budget", minimum=16 * PAGE)
    path = os.path.join(args.dir, FILE_NAME)
    info = machine(args.dir)
    t0 = time.perf_counter()
    make_file(path, size)
    npages = size // PAGE
    rng = np.random.default_rng(42)
    patterns = {
        "sequential": list(range(0, size, PAGE)),
        "random": (rng.integers(0, npages, args.random_reads) * PAGE).tolist(),
    }
    contenders: dict[str, Reader] = {
        "vmpager": read_vmpager(path, budget),
        "vmpager_sync": read_vmpager(path, budget, asynchronous=False),
        "vmpager_ra8": read_vmpager(path, budget, readahead_max_npages=8, asynchronous=False),
        "memmap": read_memmap(path),
        "pread": read_pread(path),
    }
    results: dict[str, Any] = {}
    for pattern, offsets in patterns.items():
        variants = ("vmpager_sync", "vmpager_ra8")
        names = [n for n in contenders if not (pattern == "random" and n in variants)]
        runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
        checksums: set[int] = set()
        for rep in range(args.reps):
            order = names[rep % len(names) :] + names[: rep % len(names)]
            for name in order:
                drop_cache(path)
                before = cached_pages(path)
                start = time.perf_counter()
                checksum, extra = contenders[name](offsets)
                seconds = time.perf_counter() - start
                after = cached_pages(path)
                checksums.add(checksum)
                runs[name].append(
                    {
                        "seconds": round(seconds, 4),
                        "cached_pages_before": before,
                        "cached_pages_after": after,
                        **extra,
                    }
                )
                print(f"{pattern:10} {name:12} rep {rep}: {seconds:.3f} s", file=sys.stderr)
        assert len(checksums) == 1, f"{pattern}: contenders disagree: {checksums}"
        summary: dict[str, Any] = {}
        for name, rows in runs.items():
            secs = statistics.median(r["seconds"] for r in rows)
            summary[name] = {
                "median_seconds": round(secs, 4),
                "reads_per_second": round(len(offsets) / secs),
                "mib_per_second": round(len(offsets) * PAGE / secs / 2**20, 1),
                "us_per_read": round(secs / len(offsets) * 1e6, 2),
                "runs": rows,
            }
        for name in summary:
            for ref in ("pread", "memmap"):
                summary[name][f"time_vs_{ref}"] = round(
                    summary[name]["median_seconds"] / summary[ref]["median_seconds"], 2
                )
        results[pattern] = {"reads": len(offsets), "checksum": checksums.pop(), **summary}
    if not args.keep:
        os.unlink(path)
    out = {
        "benchmark": "file_bench",
        "machine": info,
        "config": {
            "file_bytes": size,
            "budget_bytes": budget,
            "page_size": PAGE,
            "read_bytes": PAGE,
            "random_reads": args.random_reads,
            "reps": args.reps,
            "cold_start": "posix_fadvise(POSIX_FADV_DONTNEED) on the whole file before each run",
            "vmpager": "VM(memory=budget, swap=[]), daemon thread, map_file(path, 'r')",
        },
        "results": results,
        "total_seconds": round(time.perf_counter() - t0, 1),
        "loadavg_at_end": os.getloadavg(),
    }
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
