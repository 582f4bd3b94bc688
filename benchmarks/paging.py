"""The standard paging workload on vmpager and on the kernel's own swap, side by side.

A thin command line over ``vmpager.bench.paging`` (the implementation of
``vmpager bench``; see its docstring for what each system runs), with the
options and the JSON report this script has always had. Differences from
``vmpager bench``: sizes in MiB, 3 repetitions, and the disk bandwidth,
pageout throughput and hit-path measurements on unless ``--no-disk`` /
``--no-hit``.

Usage (from the repository root)::

    python benchmarks/paging.py [--mib 512] [--limit-mib 128] [--reps 3]
        [--patterns seq,random,zipf] [--variants loop,batch,mapped] [--kernel auto|yes|no]
        [--page-size 4096] [--device file|ram] [--config key=value ...]
        [--output benchmarks/results/paging.json] [--plot benchmarks/results/paging.png]

Prints the JSON report to stdout; ``--output`` also writes it. ``--device ram``
swaps to memory instead of a file (the software cost alone; the kernel is
then skipped). ``benchmarks/paging_report.py`` renders a report as the tables of
docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from vmpager.bench.paging import (
    MIB,
    BenchError,
    BenchOptions,
    have_matplotlib,
    parse_config,
    plot,
    run_bench,
)
from vmpager.console import Console


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=512, help="object / region size, MiB")
    parser.add_argument("--limit-mib", type=int, default=128, help="memory budget, MiB")
    parser.add_argument("--patterns", default="seq,random,zipf")
    parser.add_argument(
        "--variants",
        default="loop",
        help="some of loop, batch and mapped (a mapped numpy array), comma-separated",
    )
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
    try:
        options = BenchOptions(
            size=args.mib * MIB,
            memory=args.limit_mib * MIB,
            patterns=tuple(p for p in args.patterns.split(",") if p),
            variants=tuple(v for v in args.variants.split(",") if v),
            batch=args.batch,
            reps=args.reps,
            kernel=args.kernel,
            accesses=args.accesses,
            page_size=args.page_size,
            device=args.device,
            swap_dir=args.swap_dir,
            config=parse_config(args.config),
            disk=not args.no_disk,
            hit_path=not args.no_hit,
            profile=args.profile,
        )
    except ValueError as exc:
        parser.error(str(exc))
    if args.plot is not None and not have_matplotlib():
        parser.error("--plot needs matplotlib: pip install 'vmpager[plot]'")
    try:
        with Console(sys.stderr) as console:
            report = run_bench(options, console, source="benchmarks/paging.py")
    except BenchError as exc:
        print(f"paging.py: error: {exc}", file=sys.stderr)
        return 1
    text = json.dumps(report, indent=2)
    print(text)
    if args.output is not None:
        args.output.write_text(text + "\n")
    if args.plot is not None:
        plot(report, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
