"""The ``vmpager`` command: run the standard paging workload, show swap, serve disks."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

import numpy as np

from vmpager.units import format_size, parse_size
from vmpager.vm.system import VM
from vmpager.workload import PATTERNS, Workload

__all__ = ["main"]

_FILL_CHUNK_NPAGES = 256


class Progress:
    """A one-line progress bar on a terminal; silent otherwise."""

    def __init__(self, stream: TextIO, label: str, total: int) -> None:
        self._stream = stream
        self._label = label
        self._total = max(total, 1)
        self._on = stream.isatty()
        self._last = 0.0
        self._start = time.perf_counter()

    def update(self, done: int) -> None:
        if not self._on:
            return
        now = time.perf_counter()
        if now - self._last < 0.2 and done < self._total:
            return
        self._last = now
        frac = done / self._total
        rate = done / max(now - self._start, 1e-9)
        bar = "#" * int(frac * 30)
        self._stream.write(f"\r{self._label:<8} [{bar:<30}] {frac:6.1%} {rate:>10,.0f}/s")
        self._stream.flush()

    def finish(self) -> None:
        if self._on:
            self.update(self._total)
            self._stream.write("\n")
            self._stream.flush()


def _fill(obj: Any, workload: Workload, progress: Progress) -> None:
    ps = workload.page_size
    for first in range(0, workload.npages, _FILL_CHUNK_NPAGES):
        count = min(_FILL_CHUNK_NPAGES, workload.npages - first)
        obj.write(first * ps, workload.fill_pages(first, count).tobytes())
        progress.update(first + count)
    progress.finish()


def _access(obj: Any, workload: Workload, progress: Progress) -> float:
    ps = workload.page_size
    read = obj.read
    write = obj.write
    indices = workload.indices.tolist()
    step = 4096
    start = time.perf_counter()
    for base in range(0, len(indices), step):
        for p in indices[base : base + step]:
            offset = p * ps
            value = int.from_bytes(read(offset, 8), "little")
            write(offset, ((value + 1) & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little"))
        progress.update(base + step)
    elapsed = time.perf_counter() - start
    progress.finish()
    return elapsed


def _verify(obj: Any, workload: Workload, progress: Progress) -> int:
    """Compare every page with what it must hold; returns the number of bad pages."""
    ps = workload.page_size
    expected0 = workload.expected_word0()
    bad = 0
    buf = np.empty((_FILL_CHUNK_NPAGES, ps // 8), dtype=np.uint64)
    for first in range(0, workload.npages, _FILL_CHUNK_NPAGES):
        count = min(_FILL_CHUNK_NPAGES, workload.npages - first)
        got = buf[:count]
        obj.readinto(first * ps, got)
        want = workload.fill_pages(first, count)
        want[:, 0] = expected0[first : first + count]
        bad += int(np.count_nonzero((got != want).any(axis=1)))
        progress.update(first + count)
    progress.finish()
    return bad


def run_pattern(
    pattern: str,
    *,
    size: int,
    memory: int,
    swap: list[str] | None,
    accesses: int | None,
    verify: bool,
    err: TextIO,
) -> dict[str, Any]:
    """Fill, time the access phase, verify; returns the report of one pattern."""
    page_size = 4096
    npages = size // page_size
    workload = Workload(npages, pattern, accesses=accesses)  # type: ignore[arg-type]
    with VM(memory=memory, swap=swap, page_size=page_size) as vm:
        obj = vm.allocate(size)
        t0 = time.perf_counter()
        _fill(obj, workload, Progress(err, "fill", npages))
        fill_s = time.perf_counter() - t0
        before = vm.statistics()
        elapsed = _access(obj, workload, Progress(err, pattern, workload.naccesses))
        after = vm.statistics()
        bad = _verify(obj, workload, Progress(err, "verify", npages)) if verify else None
        vm.check()
        faults = after.faults - before.faults
        pageouts = after.pageouts - before.pageouts
        pageout_pages = after.pageout_pages - before.pageout_pages
        return {
            "pattern": pattern,
            "size_bytes": size,
            "memory_bytes": memory,
            "accesses": workload.naccesses,
            "seconds": round(elapsed, 3),
            "accesses_per_s": round(workload.naccesses / elapsed, 1),
            "fill_seconds": round(fill_s, 3),
            "faults": faults,
            "miss_ratio": round(faults / workload.naccesses, 4),
            "pageins": after.pageins - before.pageins,
            "pages_in": after.pagein_pages - before.pagein_pages,
            "pageouts": pageouts,
            "pages_out": pageout_pages,
            "mean_cluster_npages": round(pageout_pages / pageouts, 2) if pageouts else 0.0,
            "readaround_pages": after.readaround_pages - before.readaround_pages,
            "readaround_hits": after.readaround_hits - before.readaround_hits,
            "swap_used_blocks_at_end": after.swap_used_blocks,
            "verified_pages": npages if verify else 0,
            "bad_pages": bad,
        }


def _cmd_run(args: argparse.Namespace) -> int:
    size = parse_size(args.size, "--size", minimum=4096, multiple=4096)
    memory = parse_size(args.memory, "--memory", minimum=4 * 4096)
    patterns = list(PATTERNS) if args.pattern == "all" else [args.pattern]
    reports = []
    err = sys.stderr
    print(
        f"vmpager run: {format_size(size)} object, {format_size(memory)} memory, "
        f"swap: {', '.join(args.swap) if args.swap else 'private swap file (temporary)'}",
        file=err,
    )
    # --mapped: the access loop indexes a numpy array whose pages a pager
    # process serves (vmpager.mapped); same report and verification.
    runner = run_pattern
    if args.mapped:
        from vmpager.mapped.run import run_mapped_pattern

        runner = run_mapped_pattern
    for pattern in patterns:
        report = runner(
            pattern,
            size=size,
            memory=memory,
            swap=args.swap or None,
            accesses=args.accesses,
            verify=not args.no_verify,
            err=err,
        )
        reports.append(report)
        if not args.json:
            _print_report(report)
    if args.json:
        json.dump({"runs": reports}, sys.stdout, indent=2)
        print()
    failed = [r for r in reports if r["bad_pages"]]
    if failed:
        print(f"vmpager run: VERIFICATION FAILED for {[r['pattern'] for r in failed]}", file=err)
        return 1
    return 0


def _print_report(r: dict[str, Any]) -> None:
    verified = (
        f"all {r['verified_pages']:,} pages hold what they should"
        if r["bad_pages"] == 0
        else ("not verified" if r["bad_pages"] is None else f"{r['bad_pages']:,} BAD PAGES")
    )
    print(
        f"{r['pattern']:>6}: {r['accesses_per_s']:>12,.0f} accesses/s  "
        f"({r['accesses']:,} in {r['seconds']:.2f} s; fill {r['fill_seconds']:.2f} s)\n"
        f"        faults {r['faults']:,} (miss ratio {r['miss_ratio']:.1%}), "
        f"pages in {r['pages_in']:,} in {r['pageins']:,} reads, "
        f"pages out {r['pages_out']:,} in {r['pageouts']:,} writes "
        f"(mean cluster {r['mean_cluster_npages']:.1f})\n"
        f"        read-around {r['readaround_pages']:,} pages, {r['readaround_hits']:,} used; "
        f"verify: {verified}"
    )


def _cmd_swapinfo(args: argparse.Namespace) -> int:
    memory = parse_size(args.memory, "--memory", minimum=4 * 4096)
    with VM(memory=memory, swap=args.swap or None) as vm:
        devices = vm.swapinfo()
        block_kib = vm.page_size // 1024
    if args.json:
        json.dump([dataclasses.asdict(d) for d in devices], sys.stdout, indent=2)
        print()
        return 0
    print(f"{'Device':<40} {'1K-blocks':>12} {'Used':>12} {'Avail':>12} {'Capacity':>8} {'Bad':>6}")
    for d in devices:
        total = d.total * block_kib
        used = d.used * block_kib
        cap = f"{d.used / d.total:.0%}" if d.total else "-"
        print(f"{d.name:<40} {total:>12} {used:>12} {d.free * block_kib:>12} {cap:>8} {d.bad:>6}")
    return 0


def _parse_exports(args: argparse.Namespace) -> list[tuple[str, int]]:
    exports = []
    for spec in args.export or []:
        name, sep, size = spec.rpartition(":")
        if not sep or not name:
            raise ValueError(f"--export must be NAME:SIZE, got {spec!r}")
        exports.append((name, parse_size(size, f"--export {name}", minimum=4096)))
    if args.size is not None or not exports:
        size = parse_size(args.size or "1G", "--size", minimum=4096)
        exports.insert(0, (args.name, size))
    names = [n for n, _ in exports]
    if len(set(names)) != len(names):
        raise ValueError(f"export names must be unique, got {names}")
    return exports


def _parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--listen must be HOST:PORT with a port in [0, 65535], got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _cmd_serve(args: argparse.Namespace) -> int:
    import signal
    import threading

    from vmpager.nbd import NbdServer
    from vmpager.nbd.vmdisk import VMObjectBackend

    exports = _parse_exports(args)
    memory = parse_size(args.memory, "--memory", minimum=16 * 4096)
    host, port = _parse_listen(args.listen)
    with VM(memory=memory, swap=args.swap or None) as vm:
        backends = {name: VMObjectBackend(vm.allocate(size)) for name, size in exports}
        kwargs: dict[str, Any] = (
            {"unix_path": args.unix} if args.unix else {"host": host, "port": port}
        )
        with NbdServer(backends, **kwargs) as server:
            stop = threading.Event()
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: stop.set())
            for name, size in exports:
                print(f"serving {name!r} ({format_size(size)}) at {server.url(name)}", flush=True)
            print(
                f"memory {format_size(memory)}; swap: "
                f"{', '.join(d.name for d in vm.swapinfo())}; Ctrl-C stops",
                file=sys.stderr,
                flush=True,
            )
            while not stop.wait(0.5):
                pass
        vm.check()
    return 0


def _cmd_stress(args: argparse.Namespace) -> int:
    """Threads, faults, swapoff/swapon for --seconds; exit 1 on any lost or invented byte."""
    from vmpager.stress import StressConfig, run_stress

    memory = parse_size(args.memory, "--memory", minimum=8 * 4096, multiple=4096)
    config = StressConfig(
        seconds=args.seconds,
        nthreads=args.threads,
        memory_bytes=memory,
        write_error_rate=args.write_error_rate,
        read_error_rate=args.read_error_rate,
        swapoff_interval_s=0.0 if args.no_swapoff else args.swapoff_interval,
        seed=args.seed,
        directory=args.dir,
    )
    err = sys.stderr
    print(
        f"vmpager stress: {config.seconds:g} s, {config.nthreads} threads, "
        f"{format_size(memory)} memory, write/read fault rates "
        f"{config.write_error_rate:g}/{config.read_error_rate:g}, seed {config.seed}",
        file=err,
    )

    def progress(elapsed: float, ops: int) -> None:
        if err.isatty():
            err.write(f"\r  {elapsed:6.1f} s  {ops:>10,} operations")
            err.flush()

    report = run_stress(config, progress=progress)
    if err.isatty():
        err.write("\n")
    if args.json:
        json.dump(report.as_dict(), sys.stdout, indent=2)
        print()
    else:
        print(report.summary())
    return 0 if report.ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmpager",
        description="A user-space virtual-memory system: objects larger than memory, "
        "paged to swap.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "run",
        help="run the standard paging workload and verify every page",
        description="Fill an object larger than memory, run the access phase of the standard "
        "paging workload (seq, random, zipf), report and verify every page.",
    )
    run.add_argument("--size", default="2G", help="object size (default 2G)")
    run.add_argument("--memory", default="512M", help="memory budget (default 512M)")
    run.add_argument(
        "--pattern", default="all", choices=[*PATTERNS, "all"], help="access pattern (default all)"
    )
    run.add_argument(
        "--swap",
        action="append",
        metavar="PATH[:SIZE]",
        help="swap device (repeatable); default: a private temporary swap file",
    )
    run.add_argument("--accesses", type=int, default=None, help="accesses for random/zipf")
    run.add_argument("--no-verify", action="store_true", help="skip the final verification")
    run.add_argument(
        "--mapped",
        action="store_true",
        help="access a mapped numpy array (a[i] += 1; userfaultfd) instead of read/write calls",
    )
    run.add_argument("--json", action="store_true", help="print the report as JSON")
    run.set_defaults(func=_cmd_run)

    serve = sub.add_parser(
        "serve",
        help="serve swap-backed disks over NBD (like md(4) swap disks)",
        description="Export swap-backed VM objects as NBD disks (fixed newstyle, structured "
        "replies, base:allocation). Loopback only unless --listen says otherwise.",
    )
    serve.add_argument("--size", default=None, help="size of the default export (default 1G)")
    serve.add_argument("--name", default="vmpager", help="name of the default export")
    serve.add_argument(
        "--export", action="append", metavar="NAME:SIZE", help="another export (repeatable)"
    )
    serve.add_argument("--memory", default="256M", help="memory budget (default 256M)")
    serve.add_argument("--swap", action="append", metavar="PATH[:SIZE]")
    where = serve.add_mutually_exclusive_group()
    where.add_argument("--listen", default="127.0.0.1:10809", help="HOST:PORT (default loopback)")
    where.add_argument("--unix", metavar="PATH", help="serve on a unix socket instead")
    serve.set_defaults(func=_cmd_serve)

    stress = sub.add_parser(
        "stress",
        help="stress the VM: threads, injected faults, swapoff/swapon; verify every byte",
        description="Worker threads write, read back and discard their pages on a small VM "
        "whose two swap files fail requests at random, while devices are removed and "
        "added back; every read and, at the end, every byte is compared with what was "
        "written. Exits 1 on any lost or invented byte or failed check.",
    )
    stress.add_argument("--seconds", type=float, default=10.0, help="how long to run (default 10)")
    stress.add_argument("--threads", type=int, default=8, help="worker threads (default 8)")
    stress.add_argument("--memory", default="256K", help="memory budget (default 256K)")
    stress.add_argument(
        "--write-error-rate", type=float, default=0.01, help="fraction of writes failed"
    )
    stress.add_argument(
        "--read-error-rate", type=float, default=0.002, help="fraction of reads failed"
    )
    stress.add_argument(
        "--swapoff-interval", type=float, default=0.5, help="seconds between swapoff/swapon"
    )
    stress.add_argument("--no-swapoff", action="store_true", help="keep the swap devices")
    stress.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    stress.add_argument("--dir", default=None, help="directory of the swap files")
    stress.add_argument("--json", action="store_true", help="print the report as JSON")
    stress.set_defaults(func=_cmd_stress)

    swapinfo = sub.add_parser("swapinfo", help="list swap devices and their use (like swapctl -l)")
    swapinfo.add_argument("--swap", action="append", metavar="PATH[:SIZE]")
    swapinfo.add_argument("--memory", default="16M")
    swapinfo.add_argument("--json", action="store_true")
    swapinfo.set_defaults(func=_cmd_swapinfo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result: int = args.func(args)
    except (ValueError, TypeError) as exc:
        parser.exit(2, f"vmpager: error: {exc}\n")
    except KeyboardInterrupt:
        return 130
    return result
