"""Kernel-swap baseline alone: the standard paging workload on Linux's own swap.

The implementation lives in ``vmpager.bench.kernel`` (installed with the
package, as is ``kworkload.c``); ``vmpager bench`` runs it side by side with
vmpager. This script is its command line, for the kernel side alone::

    python benchmarks/kernel/kswap.py [--mib 2048] [--limit-mib 512]
        [--patterns seq,random,zipf] [--reps 1] [--content random|sparse]
        [--output FILE]

Needs root on Linux; refuses to start when any swap is already active, and
always turns off and removes the swap file and the cgroup it creates.
"""

from __future__ import annotations

import sys

from vmpager.bench.kernel import (
    KernelBenchError,
    MemoryCgroup,
    SwapFile,
    active_swaps,
    compile_kworkload,
    describe_machine,
    detect_memory_cgroup,
    main,
    run_kernel,
    summarize,
    unavailable,
)

__all__ = [
    "KernelBenchError",
    "MemoryCgroup",
    "SwapFile",
    "active_swaps",
    "compile_kworkload",
    "describe_machine",
    "detect_memory_cgroup",
    "main",
    "run_kernel",
    "summarize",
    "unavailable",
]

if __name__ == "__main__":
    sys.exit(main())
