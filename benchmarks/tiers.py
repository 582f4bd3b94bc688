"""Swap tiers measured: the compressed pool against zswap and zram, and what integrity
and encryption cost.

Three parts, all in one run (JSON on stdout, and in ``--output``):

* ``stages``: the cost per 4 KiB page of each stage of the tier pipeline on
  the benchmark's compressible pages (same-filled check, lz4 and zstd
  compression and decompression, xxh3-64, AES-256-GCM seal and unseal), one
  thread, medians of ``--stage-reps`` timings of ``--stage-pages`` pages.
* ``tier``: microseconds per page through the whole ``SwapTier`` (runs of 1
  and 8 pages, written and read, around a RAM device) against the device
  alone: the tier's own cost per page, Python and lock included.
* ``seals``: the standard workload (``--content compressible``) on vmpager with
  no check, with xxh3-64 checksums (the default) and with encryption,
  alternating A B C A B C for ``--reps`` rounds; ratios to no check.
* ``systems``: the same workload, same data, same memory budget, on
  ``vmpager`` (plain swap file), ``vmpager-lz4`` (``compress="lz4"``, the pool
  a fifth of the budget), the kernel with a swap file, the kernel with zswap
  (lz4; enabled for the run and restored) and the kernel swapping to zram
  (lz4), alternating per round.

The compressible content: every page holds the standard workload's random
words in its first two fifths and zeros after them (``vmpager.workload``,
``content="compressible"``); lz4 and zstd shrink such pages about 2.47 times.

Usage (as root for the kernel systems; from the repository root)::

    python benchmarks/tiers.py [--mib 512] [--limit-mib 128] [--patterns random,zipf]
        [--accesses 200000] [--reps 1] [--systems vmpager,vmpager-lz4,kernel,zswap,zram]
        [--parts stages,tier,seals,systems] [--output benchmarks/results/tiers.json]

Safety: the kernel systems refuse to start when swap is already active, and
every setting changed (zswap's parameters, zram0, the swap file, the cgroup)
is restored or removed on the way out, also on errors and Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from vmpager import VM
from vmpager.bench import kernel as kswap
from vmpager.tiers.codec import Codec, same_fill_word
from vmpager.tiers.seal import Checksum, Encryption
from vmpager.workload import Workload

PAGE = 4096
MIB = 1 << 20
CHUNK = 256  # pages per fill / verify call
ZSWAP = Path("/sys/module/zswap/parameters")
ZRAM = Path("/sys/block/zram0")


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


# ---- stages ---------------------------------------------------------------------------


def measure_stages(npages: int, reps: int) -> dict[str, Any]:
    """Microseconds per page of every stage, on the benchmark's compressible pages."""
    workload = Workload(1 << 14, "seq", content="compressible")
    pages = [memoryview(bytearray(p.tobytes())) for p in workload.fill_pages(0, npages)]
    out = memoryview(bytearray(PAGE))
    lz4, zstd = Codec("lz4", PAGE), Codec("zstd", PAGE)
    lz4_data = [lz4.compress(p) for p in pages]
    zstd_data = [zstd.compress(p) for p in pages]
    checksum = Checksum(npages)
    encryption = Encryption(npages, "bench")
    sealed = [bytes(encryption.seal(i, p)) for i, p in enumerate(pages)]
    sealed_views = [memoryview(bytearray(s)) for s in sealed]

    def timed(fn: Any) -> float:
        runs = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            runs.append((time.perf_counter() - t0) / npages * 1e6)
        return round(statistics.median(runs), 3)

    def unseal_all() -> None:
        for i, v in enumerate(sealed_views):
            assert encryption.unseal(i, v, out)

    # Sealing moves a block's generation on: time it on a second seal, so that the
    # copies sealed above still unseal.
    probe = Encryption(npages, "probe")

    def seal_all() -> None:
        for i, p in enumerate(pages):
            probe.seal(i, p)

    result = {
        "pages": npages,
        "reps": reps,
        "lz4_ratio": round(npages * PAGE / sum(len(d) for d in lz4_data), 3),
        "zstd_ratio": round(npages * PAGE / sum(len(d) for d in zstd_data), 3),
        "us_per_page": {
            "same_filled_check": timed(lambda: [same_fill_word(p) for p in pages]),
            "lz4_compress": timed(lambda: [lz4.compress(p) for p in pages]),
            "lz4_decompress": timed(lambda: [lz4.decompress_into(d, out) for d in lz4_data]),
            "zstd_compress": timed(lambda: [zstd.compress(p) for p in pages]),
            "zstd_decompress": timed(lambda: [zstd.decompress_into(d, out) for d in zstd_data]),
            "xxh3_seal": timed(lambda: [checksum.seal(i, p) for i, p in enumerate(pages)]),
            "xxh3_unseal": timed(lambda: [checksum.unseal(i, p, p) for i, p in enumerate(pages)]),
            "gcm_seal": timed(seal_all),
            "gcm_unseal": timed(unseal_all),
        },
        "meta_bytes_per_block": {
            "xxh3": Checksum.bytes_per_block,
            "gcm": Encryption.bytes_per_block,
        },
    }
    return result


def measure_tier(npages: int, reps: int) -> dict[str, Any]:
    """Microseconds per page through ``SwapTier`` around a RAM device, against the
    device alone: runs of 1 and 8 pages written and read, per seal (and the pool).

    The difference to ``device`` is the tier's whole cost per page (its Python,
    its lock, the hashing or crypto); minimum of ``reps`` passes (the floor,
    which the other load on the machine disturbs least).
    """
    from vmpager.devices.memory import MemoryDevice
    from vmpager.tiers.tier import SwapTier

    workload = Workload(1 << 14, "seq", content="compressible")
    content = workload.fill_pages(0, 8).tobytes()
    configs: dict[str, dict[str, Any] | None] = {
        "device": None,
        "xxh3": {},
        "gcm": {"encrypt": True},
        "lz4_pool_no_writeback": {"compress": "lz4", "pool_capacity": 2 * npages * PAGE},
    }
    result: dict[str, Any] = {"pages": npages, "reps": reps}
    for run in (1, 8):
        buffers = [memoryview(bytearray(content[: run * PAGE]))]
        out = [memoryview(bytearray(run * PAGE))]
        for name, kwargs in configs.items():
            times: dict[str, list[float]] = {"write": [], "read": []}
            for _ in range(reps):
                device = MemoryDevice(npages, PAGE, name="ram")
                tier = None
                if kwargs is not None:
                    tier = SwapTier(PAGE, **kwargs)
                    tier.device_added(device)
                for op in ("write", "read"):
                    t0 = time.perf_counter()
                    for blk in range(0, npages - run + 1, run):
                        if tier is None:
                            if op == "write":
                                device.write_blocks(blk, buffers)
                            else:
                                device.read_blocks(blk, out)
                        elif op == "write":
                            tier.write(blk, device, blk, buffers)
                        else:
                            tier.read(blk, device, blk, out)
                    times[op].append((time.perf_counter() - t0) / npages * 1e6)
            result[f"run{run}_{name}"] = {op: round(min(v), 2) for op, v in times.items()}
    return result


# ---- vmpager ------------------------------------------------------------------------------


def run_vmpager(
    pattern: str, mib: int, limit_mib: int, accesses: int | None, tiers: dict[str, Any]
) -> dict[str, Any]:
    """The standard workload (compressible content) on a VM of ``limit_mib``; verified."""
    npages = mib * MIB // PAGE
    workload = Workload(npages, pattern, accesses=accesses, content="compressible")  # type: ignore[arg-type]
    load_before = loadavg()
    cpu0 = time.process_time()
    with VM(memory=limit_mib * MIB, **tiers) as vm:
        obj = vm.allocate(npages * PAGE)
        t0 = time.perf_counter()
        for first in range(0, npages, CHUNK):
            count = min(CHUNK, npages - first)
            obj.write(first * PAGE, workload.fill_pages(first, count).tobytes())
        fill_s = time.perf_counter() - t0
        before = vm.statistics()
        read, write = obj.read, obj.write
        t0 = time.perf_counter()
        for p in workload.indices.tolist():
            value = int.from_bytes(read(p * PAGE, 8), "little")
            write(p * PAGE, ((value + 1) & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little"))
        access_s = time.perf_counter() - t0
        after = vm.statistics()
        expected0 = workload.expected_word0()
        bad = 0
        buf = np.empty((CHUNK, PAGE // 8), dtype=np.uint64)
        for first in range(0, npages, CHUNK):
            count = min(CHUNK, npages - first)
            got = buf[:count]
            obj.readinto(first * PAGE, got)
            want = workload.fill_pages(first, count)
            want[:, 0] = expected0[first : first + count]
            bad += int(np.count_nonzero((got != want).any(axis=1)))
        tier = vm.tier_statistics()
        vm.check()
    if bad:
        raise RuntimeError(f"vmpager {tiers}: {bad} pages wrong after the run")
    return {
        "pattern": pattern,
        "accesses": workload.naccesses,
        "accesses_per_s": round(workload.naccesses / access_s, 1),
        "access_s": round(access_s, 3),
        "fill_s": round(fill_s, 3),
        "faults": after.faults - before.faults,
        "pages_in": after.pagein_pages - before.pagein_pages,
        "pages_out": after.pageout_pages - before.pageout_pages,
        "cpu_s": round(time.process_time() - cpu0, 3),
        "tiers": None if tier is None else tier.__repr__(),
        "pool_hits": None if tier is None else tier.hits,
        "pool_ratio": None if tier is None else round(tier.ratio, 3),
        "writebacks": None if tier is None else tier.writebacks,
        "rejects": None if tier is None else tier.rejects,
        "verified_pages": npages,
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
    }


# ---- kernel: zswap and zram ----------------------------------------------------------------


@contextlib.contextmanager
def zswap_enabled(compressor: str = "lz4") -> Iterator[dict[str, str]]:
    """zswap on with ``compressor`` for the block; every parameter restored after."""
    names = ("enabled", "compressor", "max_pool_percent")
    saved = {n: (ZSWAP / n).read_text().strip() for n in names if (ZSWAP / n).exists()}
    try:
        with contextlib.suppress(OSError):
            (ZSWAP / "compressor").write_text(compressor)
        (ZSWAP / "max_pool_percent").write_text("20")
        (ZSWAP / "enabled").write_text("Y")
        yield {n: (ZSWAP / n).read_text().strip() for n in names}
    finally:
        (ZSWAP / "enabled").write_text(saved.get("enabled", "N"))
        for n in ("compressor", "max_pool_percent"):
            if n in saved:
                with contextlib.suppress(OSError):
                    (ZSWAP / n).write_text(saved[n])


class ZramSwap:
    """zram0 as the only swap (lz4, ``size_mib``), set up on entry and reset on exit."""

    def __init__(self, size_mib: int, algorithm: str = "lz4") -> None:
        self.size_mib = size_mib
        self.algorithm = algorithm
        self.device = "/dev/zram0"
        self._mine = False

    def __enter__(self) -> ZramSwap:
        if kswap.active_swaps():
            raise kswap.KernelBenchError(f"refusing: swap already active: {kswap.active_swaps()}")
        if not ZRAM.exists():
            subprocess.run(["modprobe", "zram"], check=False, capture_output=True)
        if not ZRAM.exists():
            raise kswap.KernelBenchError("no /sys/block/zram0")
        if (ZRAM / "initstate").read_text().strip() != "0":
            raise kswap.KernelBenchError("refusing: zram0 is already in use")
        self._mine = True
        try:
            (ZRAM / "comp_algorithm").write_text(self.algorithm)
            (ZRAM / "disksize").write_text(f"{self.size_mib}M")
            subprocess.run(["mkswap", "-q", self.device], check=True, capture_output=True)
            subprocess.run(["swapon", self.device], check=True, capture_output=True)
        except BaseException:
            self._reset()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._reset()

    def _reset(self) -> None:
        if not self._mine:
            return
        if self.device in kswap.active_swaps():
            subprocess.run(["swapoff", self.device], check=False, capture_output=True)
        (ZRAM / "reset").write_text("1")
        self._mine = False

    def describe(self) -> dict[str, Any]:
        return {"kind": "zram", "size_mib": self.size_mib, "algorithm": self.algorithm}


def wait_for_no_swap(seconds: float) -> None:
    """The machine is shared: wait (up to ``seconds``) for swap others turned on to go."""
    deadline = time.monotonic() + seconds
    while kswap.active_swaps() and time.monotonic() < deadline:
        time.sleep(5)


def run_kernel_system(
    system: str, pattern: str, mib: int, limit_mib: int, accesses: int | None, binary: Path
) -> dict[str, Any]:
    wait_for_no_swap(600)
    common = {
        "content": "compressible",
        "accesses": accesses,
        "binary": binary,
    }
    if system == "zram":
        with ZramSwap(2 * mib) as zram:
            result = kswap.run_kernel(pattern, mib, limit_mib, swap=zram, **common)  # type: ignore[arg-type]
    elif system == "zswap":
        with zswap_enabled() as params, kswap.SwapFile(2 * mib) as swap:
            result = kswap.run_kernel(pattern, mib, limit_mib, swap=swap, **common)  # type: ignore[arg-type]
            result["zswap"] = params
            result["zswap_stats"] = _zswap_stats()
    else:
        with kswap.SwapFile(2 * mib) as swap:
            result = kswap.run_kernel(pattern, mib, limit_mib, swap=swap, **common)  # type: ignore[arg-type]
    keys = ("accesses", "accesses_per_s", "access_s", "fill_s", "pswpin", "pswpout", "majflt")
    out = {k: result.get(k) for k in keys}
    out.update(
        pattern=pattern,
        swap=result.get("swap"),
        zswap=result.get("zswap"),
        zswap_stats=result.get("zswap_stats"),
        loadavg_before=result.get("loadavg_before"),
        loadavg_after=result.get("loadavg_after"),
    )
    return out


def _zswap_stats() -> dict[str, str]:
    base = Path("/sys/kernel/debug/zswap")
    if not base.exists():
        return {}
    return {p.name: p.read_text().strip() for p in base.iterdir() if p.is_file()}


# ---- main ----------------------------------------------------------------------------------

VMPAGER_SYSTEMS: dict[str, dict[str, Any]] = {
    "vmpager": {},
    "vmpager-lz4": {"compress": "lz4"},
}
SEALS: dict[str, dict[str, Any]] = {
    "none": {"integrity": False},
    "xxh3": {},
    "gcm": {"encrypt": True},
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=512)
    parser.add_argument("--limit-mib", type=int, default=128)
    parser.add_argument("--patterns", default="random,zipf")
    parser.add_argument("--accesses", type=int, default=200_000)
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--systems", default="vmpager,vmpager-lz4,kernel,zswap,zram")
    parser.add_argument("--parts", default="stages,seals,systems")
    parser.add_argument("--stage-pages", type=int, default=4096)
    parser.add_argument("--stage-reps", type=int, default=5)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    parts = args.parts.split(",")
    patterns = args.patterns.split(",")
    report: dict[str, Any] = {
        "command": " ".join(sys.argv),
        "machine": kswap.describe_machine(),
        "python": platform.python_version(),
        "mib": args.mib,
        "limit_mib": args.limit_mib,
        "accesses": args.accesses,
        "content": "compressible",
        "loadavg_start": loadavg(),
    }
    if "stages" in parts:
        report["stages"] = measure_stages(args.stage_pages, args.stage_reps)
        print(json.dumps(report["stages"], indent=1), file=sys.stderr)
    if "tier" in parts:
        report["tier"] = measure_tier(args.stage_pages, args.stage_reps)
        print(json.dumps(report["tier"], indent=1), file=sys.stderr)
    if "seals" in parts:
        runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
        for _ in range(args.reps):
            for pattern in patterns:
                for name, kwargs in SEALS.items():
                    r = run_vmpager(pattern, args.mib, args.limit_mib, args.accesses, kwargs)
                    runs.setdefault(pattern, {}).setdefault(name, []).append(r)
                    print(f"seal {name} {pattern}: {r['accesses_per_s']}/s", file=sys.stderr)
                    _save(report | {"seals_partial": runs}, args.output)
        report["seals"] = {"runs": runs, "ratios_to_none": _ratios(runs, "none")}
    if "systems" in parts:
        systems = args.systems.split(",")
        runs = {}
        with tempfile.TemporaryDirectory(prefix="tiers-bench-") as workdir:
            binary = kswap.compile_kworkload(workdir) if os.geteuid() == 0 else None
            for _ in range(args.reps):
                for pattern in patterns:
                    for system in systems:
                        if system in VMPAGER_SYSTEMS:
                            r = run_vmpager(
                                pattern,
                                args.mib,
                                args.limit_mib,
                                args.accesses,
                                VMPAGER_SYSTEMS[system],
                            )
                        elif binary is None:
                            continue
                        else:
                            try:
                                r = run_kernel_system(
                                    system, pattern, args.mib, args.limit_mib, args.accesses, binary
                                )
                            except kswap.KernelBenchError as error:
                                print(f"{system} {pattern}: {error}", file=sys.stderr)
                                report.setdefault("errors", []).append(
                                    f"{system} {pattern}: {error}"
                                )
                                continue
                        runs.setdefault(pattern, {}).setdefault(system, []).append(r)
                        print(f"{system} {pattern}: {r['accesses_per_s']}/s", file=sys.stderr)
                        _save(report | {"systems_partial": runs}, args.output)
        report["systems"] = {
            "runs": runs,
            "ratios_to_vmpager_lz4": _ratios(runs, "vmpager-lz4", invert=True),
        }
    report["loadavg_end"] = loadavg()
    print(json.dumps(report, indent=2, default=str))
    _save(report, args.output)
    return 0


def _save(report: dict[str, Any], output: str | None) -> None:
    """Write the report so far (a run interrupted later keeps what was measured)."""
    if output:
        Path(output).write_text(json.dumps(report, indent=2, default=str) + "\n")


def _ratios(
    runs: dict[str, dict[str, list[dict[str, Any]]]], base: str, *, invert: bool = False
) -> dict[str, dict[str, float]]:
    """Per pattern, the median accesses/s of each system over that of ``base``
    (``invert``: ``base`` over each system: how many times faster ``base`` is)."""
    out: dict[str, dict[str, float]] = {}
    for pattern, systems in runs.items():
        if base not in systems:
            continue
        ref = statistics.median(r["accesses_per_s"] for r in systems[base])
        out[pattern] = {}
        for name, rs in systems.items():
            value = statistics.median(r["accesses_per_s"] for r in rs)
            out[pattern][name] = round(ref / value if invert else value / ref, 3)
    return out


if __name__ == "__main__":
    sys.exit(main())
