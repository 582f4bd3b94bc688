"""The ``vmpager`` command: run the paging workload, benchmark it, show swap, serve disks.

Errors are one line on stderr naming the option at fault and what to do:
exit status 2 for usage errors (the command line itself is wrong: a bad
size, an unknown pattern, a malformed swap spec), 1 for failures (the
system refused: a swap path that cannot be opened, a busy port, missing
permissions, pages that do not verify). No traceback unless VMPAGER_DEBUG=1.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import json
import os
import ssl
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

from vmpager.bench import loop
from vmpager.console import Console
from vmpager.devices.url import redact_url
from vmpager.errors import VmError
from vmpager.units import format_size, parse_size
from vmpager.vm.system import VM
from vmpager.workload import PATTERNS, Workload, pattern_report

__all__ = ["CliError", "build_parser", "main"]

#: The quick workload of a bare ``vmpager run``: the standard one scaled down 8x.
QUICK_SIZE = "256M"
QUICK_ACCESSES = 125_000
#: The standard paging workload (docs/workload.md): what benchmarks/results report.
STANDARD_SIZE = "2G"


class CliError(Exception):
    """A failure reported as one line: ``status`` 2 for usage errors, 1 for failures."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


# What to do about an OSError, by errno (the message names the option and the path).
_OS_HINTS: dict[int, str] = {
    errno.ENOENT: "no such file or directory; create its directory first (PATH:SIZE creates "
    "the file, not the directory)",
    errno.EISDIR: "is a directory; give a file inside it, e.g. DIR/swap0:4G",
    errno.EACCES: "permission denied; choose a path you may write, or run as a user who may",
    errno.EPERM: "operation not permitted; run as root or as a user allowed to do it",
    errno.EROFS: "read-only file system; choose a path on a writable file system",
    errno.ENOSPC: "no space left on the device; choose a smaller SIZE or another directory",
    errno.EADDRINUSE: "address already in use; choose another port (--listen HOST:PORT) "
    "or stop the program using it",
    errno.EADDRNOTAVAIL: "address not available on this machine; listen on one of its "
    "addresses (default 127.0.0.1)",
}


@contextlib.contextmanager
def blame(option: str, hint: str = "") -> Iterator[None]:
    """Report an ``OSError`` or ``ValueError`` raised inside as a one-line ``CliError``.

    OSError becomes a failure (status 1) naming ``option``, the path and what
    to do; ValueError a usage error (status 2) prefixed with ``option``.
    ``hint`` replaces the errno's advice when given. A new option wraps the
    calls that can fail for it, e.g. ``with blame("--mapped", "userfaultfd is
    not permitted: run as root or set vm.unprivileged_userfaultfd=1"):``.
    """
    try:
        yield
    except CliError:
        raise
    except VmError as exc:
        raise CliError(f"{option}: {exc}") from exc
    except OSError as exc:
        where = f" {exc.filename}" if exc.filename else ""
        advice = hint or _OS_HINTS.get(exc.errno or 0) or (exc.strerror or str(exc))
        raise CliError(f"{option}{where}: {advice}") from exc
    except ValueError as exc:
        text = str(exc)
        raise CliError(text if text.startswith(option) else f"{option}: {text}", 2) from exc


def run_pattern(
    pattern: str,
    *,
    size: int,
    memory: int,
    swap: list[str] | None,
    accesses: int | None,
    verify: bool,
    console: Console,
    tiers: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Fill, time the access phase, verify; returns the report of one pattern.

    ``tiers``: the VM's swap tier arguments (compress, encrypt, integrity).
    """
    page_size = 4096
    npages = size // page_size
    workload = Workload(npages, pattern, accesses=accesses)  # type: ignore[arg-type]
    with blame("--swap"):
        vm = VM(memory=memory, swap=swap, page_size=page_size, **(tiers or {}))
    with vm:
        obj = vm.allocate(size)
        t0 = time.perf_counter()
        loop.fill(obj, workload, console.bar("fill", npages))
        fill_s = time.perf_counter() - t0
        before = vm.statistics()
        elapsed = loop.access(obj, workload, console.bar(pattern, workload.naccesses))
        after = vm.statistics()
        # The number people wait for, before the (long) verification.
        console.note(
            f"{pattern}: {workload.naccesses / elapsed:,.0f} accesses/s "
            f"({workload.naccesses:,} in {elapsed:.2f} s)"
            + ("; verifying every page" if verify else "")
        )
        bad = loop.verify(obj, workload, console.bar("verify", npages)) if verify else None
        vm.check()
        report = pattern_report(
            workload,
            memory=memory,
            elapsed=elapsed,
            fill_s=fill_s,
            before=before,
            after=after,
            verified=verify,
            bad=bad,
        )
        report["tiers"] = _tier_report(vm)
        return report


def _run_workload(args: argparse.Namespace) -> tuple[str, int, int, int | None]:
    """(name, size, memory, random/zipf accesses) that ``vmpager run`` runs.

    Bare ``vmpager run``: the quick workload. ``--standard`` or ``--size``:
    that size, memory a quarter of it unless ``--memory``, the patterns'
    own access counts unless ``--accesses``.
    """
    quick = not args.standard and args.size is None
    size_text = STANDARD_SIZE if args.standard else (args.size or QUICK_SIZE)
    size = parse_size(size_text, "--size", minimum=4096, multiple=4096)
    if args.memory is None:
        memory = max(size // 4 // 4096 * 4096, 4 * 4096)
    else:
        memory = parse_size(args.memory, "--memory", minimum=4 * 4096)
    if args.accesses is not None and args.accesses < 1:
        raise ValueError(f"--accesses must be >= 1, got {args.accesses}")
    accesses = args.accesses if args.accesses is not None else (QUICK_ACCESSES if quick else None)
    npages = size // 4096
    if args.pattern in ("zipf", "all") and npages & (npages - 1):
        raise ValueError(
            f"--size must be a power of two (e.g. 256M, 2G) for the zipf pattern, got "
            f"{size_text}; or choose --pattern seq or random"
        )
    name = "quick workload" if quick else "standard workload" if size == 2 << 30 else "workload"
    return name, size, memory, accesses


def _cmd_run(args: argparse.Namespace) -> int:
    name, size, memory, accesses = _run_workload(args)
    _check_swap_specs(args.swap)
    if args.swap:
        # Open the devices once before anything is printed: a bad one fails at once.
        with blame("--swap"):
            VM(memory=memory, swap=args.swap, **_tier_kwargs(args)).close()
    patterns = list(PATTERNS) if args.pattern == "all" else [args.pattern]
    reports = []
    console = Console(sys.stderr, sys.stdout, quiet=args.json and not sys.stderr.isatty())
    density = f"{accesses:,} random/zipf accesses" if accesses else "1,000,000 random/zipf accesses"
    console.note(
        f"vmpager run: {name}: {format_size(size)} object, {format_size(memory)} memory, "
        f"seq 3 passes, {density}; swap: "
        f"{', '.join(map(redact_url, args.swap)) if args.swap else 'private swap file (temporary)'}"
    )
    if name == "quick workload":
        console.note(
            "  (the 2 GiB standard workload of the published numbers: vmpager run --standard)"
        )
    # --mapped: the access loop indexes a numpy array whose pages a pager
    # process serves (vmpager.mapped); same report and verification.
    runner: Any = run_pattern
    mapped_errors: Any = contextlib.nullcontext
    if args.mapped:
        from vmpager.mapped.run import run_mapped_pattern

        runner = run_mapped_pattern
        mapped_errors = lambda: blame(  # noqa: E731
            "--mapped",
            "userfaultfd is not permitted: run as root or set vm.unprivileged_userfaultfd=1",
        )
    with console:
        for pattern in patterns:
            extra: dict[str, Any] = {} if args.mapped else {"tiers": _tier_kwargs(args)}
            with mapped_errors():
                report = runner(
                    pattern,
                    size=size,
                    memory=memory,
                    swap=args.swap or None,
                    accesses=None if pattern == "seq" else accesses,
                    verify=not args.no_verify,
                    console=console,
                    **extra,
                )
            reports.append(report)
            if not args.json:
                _print_report(report)
        if not args.json and len(reports) > 1:
            console.table(*_run_table(reports))
    if args.json:
        json.dump({"runs": reports}, sys.stdout, indent=2)
        print()
    failed = [r for r in reports if r["bad_pages"]]
    if failed:
        raise CliError(
            f"verification FAILED for {', '.join(r['pattern'] for r in failed)}: pages do not "
            "hold what was written; please report this with the output above"
        )
    return 0


def _run_table(reports: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    header = ["pattern", "accesses/s", "miss", "pages in", "pages out", "verified"]
    rows = [
        [
            r["pattern"],
            f"{r['accesses_per_s']:,.0f}",
            f"{r['miss_ratio']:.1%}",
            f"{r['pages_in']:,}",
            f"{r['pages_out']:,}",
            "skipped" if r["bad_pages"] is None else "ok" if r["bad_pages"] == 0 else "FAILED",
        ]
        for r in reports
    ]
    return header, rows


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
    if r.get("tiers"):
        print(f"        {_tier_line(r['tiers'])}")


def _add_tier_args(parser: argparse.ArgumentParser) -> None:
    """The swap tier options (docs/tiers.md)."""
    parser.add_argument(
        "--compress",
        choices=["lz4", "zstd"],
        default=None,
        help="keep pages leaving memory in a compressed pool first (needs vmpager[compress])",
    )
    parser.add_argument(
        "--compress-pool",
        default=None,
        metavar="SIZE",
        help="the pool's share of --memory (default a fifth)",
    )
    parser.add_argument(
        "--encrypt",
        action="store_true",
        help="encrypt swap with AES-256-GCM, keys in memory only (needs vmpager[crypto])",
    )
    parser.add_argument(
        "--no-integrity",
        action="store_true",
        help="do not checksum swapped pages (on by default)",
    )


def _tier_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "compress": args.compress,
        "compress_pool": args.compress_pool,
        "encrypt": args.encrypt,
        "integrity": not args.no_integrity,
    }


def _tier_report(vm: VM) -> dict[str, Any] | None:
    stats = vm.tier_statistics()
    return None if stats is None else dataclasses.asdict(stats)


def _tier_line(t: dict[str, Any]) -> str:
    seal = "AES-256-GCM" if t["encrypt"] else ("xxh3-64" if t["integrity"] else "none")
    line = f"tiers: seal {seal}, {t['corrupt_pages']} corrupt pages"
    if t["compress"]:
        line += (
            f"; {t['compress']} pool {format_size(t['pool_bytes'])} of "
            f"{format_size(t['pool_capacity'])}: {t['stored_pages']:,} pages "
            f"({t['same_filled_pages']:,} same-filled, ratio {t['ratio']:.2f}), "
            f"hits {t['hits']:,}, rejects {t['rejects']:,}, written back {t['writebacks']:,}"
        )
    return line


def _check_swap_specs(specs: Sequence[str] | None) -> None:
    """Refuse, as a usage error, a ``--swap PATH`` without a size whose file does not exist.

    Everything else about a device is checked by opening it as ``VM()`` does.
    URLs (``scheme://...``) are left to the devices that understand them.
    """
    for spec in specs or ():
        if "://" in spec:
            continue
        path = _swap_path(spec)
        if path == spec and not os.path.exists(path):
            raise CliError(
                f"--swap {path}: no such file; give PATH:SIZE (e.g. {path}:4G) to create it", 2
            )


def _swap_path(spec: str) -> str:
    """The file a ``--swap`` spec names (``PATH:SIZE`` or ``PATH``), parsed as VM() does."""
    path, sep, size_text = spec.rpartition(":")
    if sep and path and size_text and (size_text[0].isdigit() or size_text[0] in "+-."):
        return path
    return spec


def _cmd_swapinfo(args: argparse.Namespace) -> int:
    """The devices ``--swap`` would open, opened and checked as ``VM()`` does.

    Files that did not exist are created for the check (as ``VM()`` would)
    and removed again: listing changes nothing on disk. Without ``--swap``
    there is nothing to list: vmpager has no system-wide swap.
    """
    memory = parse_size(args.memory, "--memory", minimum=4 * 4096)
    page_size = parse_size(args.page_size, "--page-size", minimum=4096)
    if page_size & (page_size - 1):
        raise ValueError(f"--page-size must be a power of two >= 4K, got {args.page_size}")
    _check_swap_specs(args.swap)
    if not args.swap:
        directory = tempfile.gettempdir()
        message = (
            "vmpager swapinfo: nothing to list: vmpager has no system-wide swap; each VM "
            "opens the devices it is given. Without any, a VM pages to a private temporary "
            f"swap file in {directory} (removed with the VM; up to 64 GiB, at most 90% of "
            f"the {format_size(_free_bytes(directory))} free there). Give --swap PATH:SIZE "
            "(repeatable) to check a configuration."
        )
        if args.json:
            print(message, file=sys.stderr)
            json.dump({"layout": args.layout, "page_size": page_size, "devices": []}, sys.stdout)
            print()
        else:
            print(message)
        return 0
    files = [_swap_path(spec) for spec in args.swap if "://" not in spec]
    created = [path for path in files if not os.path.lexists(path)]
    try:
        with blame("--swap"):
            vm = VM(
                memory=memory,
                swap=args.swap,
                page_size=page_size,
                layout=args.layout,
                **_tier_kwargs(args),
            )
        with vm:
            devices = vm.swapinfo()
            block_kib = vm.page_size // 1024
            tiers = _tier_report(vm)
    finally:
        for path in created:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    if args.json:
        json.dump(
            {
                "layout": args.layout,
                "page_size": page_size,
                "devices": [
                    {**dataclasses.asdict(d), "created_for_the_check": d.name in created}
                    for d in devices
                ],
                "tiers": tiers,
            },
            sys.stdout,
            indent=2,
        )
        print()
        return 0
    print(f"{'Device':<40} {'1K-blocks':>12} {'Used':>12} {'Avail':>12} {'Capacity':>8} {'Bad':>6}")
    for d in devices:
        total = d.total * block_kib
        used = d.used * block_kib
        cap = f"{d.used / d.total:.0%}" if d.total else "-"
        print(f"{d.name:<40} {total:>12} {used:>12} {d.free * block_kib:>12} {cap:>8} {d.bad:>6}")
    total_blocks = sum(d.total for d in devices)
    notes = [f"layout {args.layout}", f"{format_size(page_size)} blocks"]
    notes.append(f"total {format_size(total_blocks * vm.page_size)}")
    if created:
        notes.append(f"not existing yet (VM() creates them): {', '.join(created)}")
    print("; ".join(notes))
    if tiers:
        print(_tier_line(tiers))
    return 0


def _cmd_scrub(args: argparse.Namespace) -> int:
    """Write a pattern through swap (an object of --size under --memory), then verify
    every swapped page against its checksum or tag and read every page back."""
    size = parse_size(args.size, "--size", minimum=4096, multiple=4096)
    memory = parse_size(args.memory, "--memory", minimum=16 * 4096)
    npages = size // 4096
    _check_swap_specs(args.swap)

    def word(p: int) -> bytes:
        return (p * 0x9E3779B97F4A7C15 % (1 << 64)).to_bytes(8, "little")

    with blame("--swap"):
        vm = VM(memory=memory, swap=args.swap or None, **_tier_kwargs(args))
    with vm:
        if vm.tier is None or not vm.tier.integrity:
            raise CliError(
                "scrub needs integrity checks: drop --no-integrity or add --encrypt", status=2
            )
        obj = vm.allocate(size)
        for p in range(npages):
            obj.write(p * 4096, word(p) * 512)
        report = vm.scrub()
        wrong = sum(1 for p in range(npages) if obj.read(p * 4096, 8) != word(p))
        tiers = _tier_report(vm)
        vm.check()
    result = {
        "checked_pages": report.checked,
        "corrupt": [str(e) for e in report.corrupt],
        "wrong_pages": wrong,
        "tiers": tiers,
    }
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        print()
    else:
        print(
            f"scrub: {report.checked:,} swapped pages verified, {len(report.corrupt)} corrupt, "
            f"{wrong} pages read back wrong"
        )
        for e in report.corrupt:
            print(f"  {e}")
        if tiers:
            print(_tier_line(tiers))
    return 1 if report.corrupt or wrong else 0


def _free_bytes(directory: str) -> int:
    try:
        st = os.statvfs(directory)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


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


def _serve_tls(args: argparse.Namespace, host: str | None) -> ssl.SSLContext | None:
    """The TLS context ``serve`` asks for; refuses a plain listener beyond loopback.

    ``host`` is None for a unix socket (never beyond this machine).
    """
    from vmpager.nbd.tls import is_loopback, server_context

    mode = args.tls or ("require" if args.tls_creds else "off")
    if mode == "require" and not args.tls_creds:
        raise ValueError("--tls require needs --tls-creds DIR")
    if args.tls_verify_client and mode != "require":
        raise ValueError("--tls-verify-client needs TLS (--tls-creds DIR)")
    if mode == "off" and host is not None and not is_loopback(host):
        if not args.insecure:
            raise ValueError(
                f"--listen {host} reaches beyond this machine: give --tls-creds DIR, "
                "or --insecure to serve the disks unencrypted to anyone who can connect"
            )
        print(
            f"warning: serving without TLS on {host}: anyone who can reach the port "
            "can read and write the disks",
            file=sys.stderr,
            flush=True,
        )
    if mode == "off":
        return None
    with blame("--tls-creds"):
        return server_context(args.tls_creds, verify_client=args.tls_verify_client)


def _cmd_serve(args: argparse.Namespace) -> int:
    import signal
    import threading

    from vmpager.nbd import NbdServer
    from vmpager.nbd.vmdisk import VMObjectBackend

    exports = _parse_exports(args)
    memory = parse_size(args.memory, "--memory", minimum=16 * 4096)
    host, port = _parse_listen(args.listen)
    _check_swap_specs(args.swap)
    tls = _serve_tls(args, None if args.unix else host)
    with blame("--swap"):
        vm = VM(memory=memory, swap=args.swap or None, **_tier_kwargs(args))
    with vm:
        backends = {name: VMObjectBackend(vm.allocate(size)) for name, size in exports}
        kwargs: dict[str, Any] = (
            {"unix_path": args.unix} if args.unix else {"host": host, "port": port}
        )
        kwargs["tls"] = tls
        server = NbdServer(backends, **kwargs)
        with blame("--unix" if args.unix else f"--listen {args.listen}"):
            server.start()
        with server:
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

    # Progress in tenths of a second of the run (on a terminal only: a log gets the summary).
    console = Console(err, quiet=not err.isatty())
    bar = console.bar("stress", max(round(config.seconds * 10), 1))

    def progress(elapsed: float, ops: int) -> None:
        bar.update(round(elapsed * 10))

    with console:
        report = run_stress(config, progress=progress)
        bar.finish()
    if args.json:
        json.dump(report.as_dict(), sys.stdout, indent=2)
        print()
    else:
        print(report.summary())
    return 0 if report.ok else 1


def _cmd_bench(args: argparse.Namespace) -> int:
    from vmpager.bench import paging

    size = parse_size(args.size, "--size", minimum=1 << 20, multiple=1 << 20)
    if args.memory is None:
        memory = max(size // 4 >> 20, 1) << 20
    else:
        memory = parse_size(args.memory, "--memory", minimum=1 << 20, multiple=1 << 20)
    page_size = parse_size(args.page_size, "--page-size", minimum=4096)
    if page_size & (page_size - 1):
        raise ValueError(f"--page-size must be a power of two >= 4K, got {args.page_size}")
    with blame("--config"):
        config = paging.parse_config(args.config)
    try:
        options = paging.BenchOptions(
            size=size,
            memory=memory,
            patterns=tuple(p for p in args.patterns.split(",") if p),
            variants=tuple(v for v in args.variants.split(",") if v),
            batch=args.batch,
            reps=args.reps,
            kernel=args.kernel,
            accesses=args.accesses,
            page_size=page_size,
            device=args.device,
            swap_dir=args.swap_dir,
            config=config,
            disk=args.disk,
            hit_path=args.hit_path,
        )
    except ValueError as exc:
        raise CliError(f"--{exc}", 2) from exc
    if args.plot is not None and not paging.have_matplotlib():
        raise CliError("--plot needs matplotlib: pip install 'vmpager[plot]' (or leave out --plot)")
    for option, path in (("--output", args.output), ("--plot", args.plot)):
        if path is not None and not Path(path).resolve().parent.is_dir():
            raise CliError(f"{option} {path}: no such directory; create it first")
    if not os.path.isdir(args.swap_dir):
        raise CliError(f"--swap-dir {args.swap_dir}: no such directory; create it first")
    try:
        paging.kernel_plan(options)  # --kernel yes that cannot be honoured: fail before starting
    except paging.BenchError as exc:
        raise CliError(str(exc)) from exc
    console = Console(sys.stderr, sys.stdout)
    console.note(
        f"vmpager bench: {format_size(size)} object, {format_size(memory)} memory, "
        f"patterns {','.join(options.patterns)}, {options.reps} rep(s); swap in {args.swap_dir}"
    )
    try:
        with console:
            report = paging.run_bench(options, console)
    except paging.BenchError as exc:
        raise CliError(str(exc)) from exc
    text = json.dumps(report, indent=2)
    if args.output is not None:
        Path(args.output).write_text(text + "\n")
    if args.plot is not None:
        paging.plot(report, Path(args.plot))
    if args.json:
        print(text)
        return 0
    header, rows = paging.ratio_rows(report)
    console.table(header, rows, title="accesses/s and ratios (medians)")
    if not report["config"]["kernel"]:
        print(f"kernel side skipped: {report['config']['kernel_skipped_because']}")
    print(
        f"load average {report['loadavg_start']} at the start, {report['loadavg_end']} at "
        "the end (a busy machine lowers both sides)"
    )
    for option, path in (("report", args.output), ("plot", args.plot)):
        if path is not None:
            print(f"{option}: {path}")
    return 0


class _Formatter(argparse.HelpFormatter):
    """Descriptions wrapped as usual; the examples (``EXAMPLES``) kept line by line."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("examples:"):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


class _Parser(argparse.ArgumentParser):
    """argparse with examples kept as written and usage errors on one line (exit 2)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


#: The examples that end each command's --help.
EXAMPLES: dict[str, str] = {
    "vmpager": """examples:
  vmpager run                   quick workload (256 MiB object, 64 MiB memory), under a minute
  vmpager run --standard        the standard 2 GiB workload of the published numbers
  sudo vmpager bench            vmpager against the kernel's swap, side by side

user guide: docs/guide.md""",
    "run": """examples:
  vmpager run                                  quick: 256M object, 64M memory, 125,000 accesses
  vmpager run --standard --pattern zipf        the standard workload (2G, 512M, 1,000,000)
  vmpager run --size 1G --memory 128M --swap /var/tmp/swap0:4G --json""",
    "bench": """examples:
  sudo vmpager bench                           2 GiB standard workload, vmpager and the kernel
  vmpager bench --size 256M --reps 3 --kernel no
  sudo vmpager bench --variants loop,batch --json --output bench.json --plot bench.png""",
    "serve": """examples:
  vmpager serve --size 8G --memory 256M        then: nbdinfo nbd://127.0.0.1:10809/vmpager
  vmpager serve --export scratch:4G --swap /var/tmp/swap0:16G --listen 127.0.0.1:10810
  vmpager serve --unix /tmp/vmpager.sock --size 1G""",
    "stress": """examples:
  vmpager stress
  vmpager stress --seconds 60 --threads 16 --seed 7
  vmpager stress --write-error-rate 0 --read-error-rate 0 --json""",
    "swapinfo": """examples:
  vmpager swapinfo --swap /var/tmp/swap0:4G --swap /var/tmp/swap1:4G
  vmpager swapinfo --swap /var/tmp/swap0:4G --layout stripe --json
  vmpager swapinfo                             says where a VM pages without --swap""",
    "scrub": """examples:
  vmpager scrub --swap /var/tmp/swap0:1G       checksums every page written through swap
  vmpager scrub --compress lz4 --encrypt --json""",
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="vmpager",
        description="A user-space virtual-memory system: objects larger than memory, "
        "paged to swap.",
        epilog=EXAMPLES["vmpager"],
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "run",
        help="run the paging workload and verify every page (quick; --standard for 2 GiB)",
        description="Fill an object larger than memory, run the access phase of the standard "
        "paging workload (seq, random, zipf), report and verify every page. Without "
        "options: the quick workload (256 MiB object, 64 MiB memory, 125,000 random and zipf "
        "accesses; under a minute). --standard or --size 2G: the standard workload "
        "(2 GiB, 512 MiB, 1,000,000 accesses), the one benchmarks/results report.",
    )
    run.epilog = EXAMPLES["run"]
    size = run.add_mutually_exclusive_group()
    size.add_argument("--size", default=None, help="object size (default: 256M, quick)")
    size.add_argument(
        "--standard", action="store_true", help="the standard workload: --size 2G --memory 512M"
    )
    run.add_argument("--memory", default=None, help="memory budget (default: a quarter of --size)")
    run.add_argument(
        "--pattern", default="all", choices=[*PATTERNS, "all"], help="access pattern (default all)"
    )
    run.add_argument(
        "--swap",
        action="append",
        metavar="PATH[:SIZE]|URL",
        help="swap device (repeatable): a file, or a URL such as redis://host:6379/0?size=4G "
        "or redis+cluster://host:6379?size=64G; default: a private temporary swap file",
    )
    run.add_argument(
        "--accesses",
        type=int,
        default=None,
        help="accesses for random/zipf (default: 125,000 quick, else 1,000,000)",
    )
    run.add_argument("--no-verify", action="store_true", help="skip the final verification")
    run.add_argument(
        "--mapped",
        action="store_true",
        help="access a mapped numpy array (a[i] += 1; userfaultfd) instead of read/write calls",
    )
    run.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_tier_args(run)
    run.set_defaults(func=_cmd_run)

    serve = sub.add_parser(
        "serve",
        help="serve swap-backed disks over NBD (like md(4) swap disks)",
        description="Export swap-backed VM objects as NBD disks (fixed newstyle, structured "
        "replies, base:allocation). Loopback only unless --listen says otherwise.",
    )
    serve.epilog = EXAMPLES["serve"]
    serve.add_argument("--size", default=None, help="size of the default export (default 1G)")
    serve.add_argument("--name", default="vmpager", help="name of the default export")
    serve.add_argument(
        "--export", action="append", metavar="NAME:SIZE", help="another export (repeatable)"
    )
    serve.add_argument("--memory", default="256M", help="memory budget (default 256M)")
    serve.add_argument("--swap", action="append", metavar="PATH[:SIZE]|URL")
    where = serve.add_mutually_exclusive_group()
    where.add_argument("--listen", default="127.0.0.1:10809", help="HOST:PORT (default loopback)")
    where.add_argument("--unix", metavar="PATH", help="serve on a unix socket instead")
    serve.add_argument(
        "--tls-creds",
        metavar="DIR",
        help="TLS credentials in qemu's layout (ca-cert.pem, server-cert.pem, server-key.pem)",
    )
    serve.add_argument(
        "--tls",
        choices=("require", "off"),
        default=None,
        help="require: only STARTTLS before the upgrade (default with --tls-creds); off: no TLS",
    )
    serve.add_argument(
        "--tls-verify-client",
        action="store_true",
        help="require client certificates signed by ca-cert.pem",
    )
    serve.add_argument(
        "--insecure",
        action="store_true",
        help="allow listening beyond loopback without TLS (prints a warning)",
    )
    _add_tier_args(serve)
    serve.set_defaults(func=_cmd_serve)

    stress = sub.add_parser(
        "stress",
        help="stress the VM: threads, injected faults, swapoff/swapon; verify every byte",
        description="Worker threads write, read back and discard their pages on a small VM "
        "whose two swap files fail requests at random, while devices are removed and "
        "added back; every read and, at the end, every byte is compared with what was "
        "written. Exits 1 on any lost or invented byte or failed check.",
    )
    stress.epilog = EXAMPLES["stress"]
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

    swapinfo = sub.add_parser(
        "swapinfo",
        help="check and list the swap devices a configuration would open (like swapctl -l)",
        description="Open the devices given with --swap exactly as VM(swap=...) would (same "
        "checks, same refusals), list their size, use and free space, and close them again; "
        "files created for the check are removed. Without --swap there is nothing to list: "
        "vmpager has no system-wide swap, and a VM given no devices pages to a private "
        "temporary file.",
    )
    swapinfo.epilog = EXAMPLES["swapinfo"]
    swapinfo.add_argument(
        "--swap", action="append", metavar="PATH[:SIZE]|URL", help="swap device (repeatable)"
    )
    swapinfo.add_argument("--memory", default="16M", help="memory of the VM that opens them")
    swapinfo.add_argument(
        "--layout", default="per_device", choices=("per_device", "stripe"), help="swap layout"
    )
    swapinfo.add_argument("--page-size", default="4K", help="page and swap block size")
    swapinfo.add_argument("--json", action="store_true", help="print the listing as JSON")
    _add_tier_args(swapinfo)
    swapinfo.set_defaults(func=_cmd_swapinfo)

    scrub = sub.add_parser(
        "scrub",
        help="write a pattern through swap and verify every swapped page",
        description="Fill an object larger than memory so that it is swapped, then read and "
        "verify every swapped page against its checksum (or GCM tag) and every page's content.",
    )
    scrub.epilog = EXAMPLES["scrub"]
    scrub.add_argument("--size", default="256M", help="object size (default 256M)")
    scrub.add_argument("--memory", default="64M", help="memory budget (default 64M)")
    scrub.add_argument("--swap", action="append", metavar="PATH[:SIZE]|URL")
    scrub.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_tier_args(scrub)
    scrub.set_defaults(func=_cmd_scrub)

    bench = sub.add_parser(
        "bench",
        help="the paging workload on vmpager and on the kernel's swap, side by side",
        description="Run the standard paging workload through vmpager and, as root with "
        "swapon, a memory cgroup and a C compiler, through the kernel's own swap in the "
        "same run (a swap file and a cgroup of its own, both removed at the end), "
        "alternating who goes first; print the accesses per second and their ratios. "
        "Without root or a compiler the kernel side is skipped with the reason.",
    )
    bench.epilog = EXAMPLES["bench"]
    bench.add_argument("--size", default="2G", help="object size, whole MiB (default 2G)")
    bench.add_argument("--memory", default=None, help="memory budget (default: a quarter)")
    bench.add_argument("--patterns", default="seq,random,zipf", help="comma-separated")
    bench.add_argument(
        "--variants",
        default="loop",
        help="comma-separated: loop (per access), batch (batched calls), "
        "mapped (numpy indexing on a mapped array)",
    )
    bench.add_argument("--batch", type=int, default=4096, help="accesses per batched call")
    bench.add_argument("--reps", type=int, default=1, help="repetitions (default 1)")
    bench.add_argument(
        "--kernel",
        default="auto",
        choices=("auto", "yes", "no"),
        help="run the kernel side: when possible (auto), or fail when not (yes)",
    )
    bench.add_argument("--accesses", type=int, default=None, help="default: the pattern's")
    bench.add_argument("--page-size", default="4K", help="vmpager's page size")
    bench.add_argument("--device", default="file", choices=("file", "ram"), help="swap device")
    bench.add_argument(
        "--swap-dir", default=tempfile.gettempdir(), help="directory of the swap files"
    )
    bench.add_argument("--config", action="append", default=[], metavar="KEY=VALUE")
    bench.add_argument("--disk", action="store_true", help="also measure disk and pageout speed")
    bench.add_argument("--hit-path", action="store_true", help="also measure resident accesses")
    bench.add_argument("--json", action="store_true", help="print the report as JSON")
    bench.add_argument("--output", metavar="FILE", help="also write the JSON report here")
    bench.add_argument("--plot", metavar="PNG", help="bar chart (needs the plot extra)")
    bench.set_defaults(func=_cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (usage errors exit 2 via SystemExit)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = f"vmpager {args.command}"
    try:
        result: int = args.func(args)
    except CliError as exc:
        if exc.status == 2:
            parser.exit(2, f"{prog}: error: {exc}\n")
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return exc.status
    except (ValueError, TypeError) as exc:
        parser.exit(2, f"{prog}: error: {exc}\n")
    except VmError as exc:
        print(f"{prog}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        where = f" {exc.filename}" if exc.filename else ""
        print(f"{prog}: error:{where} {exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if os.environ.get("VMPAGER_DEBUG"):
            raise
        print(
            f"{prog}: internal error: {type(exc).__name__}: {exc} "
            "(VMPAGER_DEBUG=1 shows the traceback; please report it)",
            file=sys.stderr,
        )
        return 1
    return result
