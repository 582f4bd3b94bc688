"""The cost per page of ``obj.write`` of whole new pages: the writing program's
own path (fault of each new page, queue, stream, copy), with no pageout.

Each repetition makes a fresh VM with memory for the whole object, then writes
the object once in ``--chunk-kib`` calls (new pages: the fill of a workload,
including the operating system's first touch of the frames), once more
(resident pages: the hit path of a large write), then discards it and writes
it again (new pages in frames touched before: the steady state of a program
writing behind the page daemon). It reports the process CPU per page of each
pass (medians over ``--reps``).

``--trees OLD/src NEW/src`` runs this script on each tree alternately in fresh
processes (``--pairs`` times) and reports the medians and the ratios pair by
pair, side by side in one run (the machine is shared and noisy).

    PYTHONPATH=src python benchmarks/write_path.py --trees /tmp/old/src src --pairs 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from vmpager.bench.kernel import describe_machine

MIB = 1 << 20


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def measure(size_mib: int, chunk_kib: int, reps: int) -> dict[str, Any]:
    from vmpager import VM

    page_size = 4096
    npages = size_mib * MIB // page_size
    data = bytes(range(256)) * (chunk_kib * 1024 // 256)
    new: list[float] = []
    again: list[float] = []
    renew: list[float] = []
    for _ in range(reps):
        with VM(memory=f"{size_mib + 16}M") as vm:
            obj = vm.allocate(size_mib * MIB)
            for passes in (new, again, renew):
                if passes is renew:
                    obj.discard(0, size_mib * MIB)
                cpu = time.process_time()
                for offset in range(0, size_mib * MIB, len(data)):
                    obj.write(offset, data)
                passes.append(1e6 * (time.process_time() - cpu) / npages)
            assert obj.read(size_mib * MIB - 8, 8) == data[-8:]
    return {
        "new_pages_cpu_us_per_page": round(statistics.median(new), 3),
        "resident_pages_cpu_us_per_page": round(statistics.median(again), 3),
        "new_pages_again_cpu_us_per_page": round(statistics.median(renew), 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=64)
    parser.add_argument("--chunk-kib", type=int, default=256)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--trees", nargs=2, metavar=("BEFORE", "AFTER"))
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--output")
    options = parser.parse_args()
    args = ["--size-mib", str(options.size_mib), "--chunk-kib", str(options.chunk_kib)]
    args += ["--reps", str(options.reps)]
    if not options.trees:
        print(json.dumps(measure(options.size_mib, options.chunk_kib, options.reps)))
        return 0
    report: dict[str, Any] = {
        "benchmark": "write_path.py, before and after, alternately in fresh processes",
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": describe_machine(),
        "args": args,
        "loadavg_start": loadavg(),
        "trees": dict(zip(("before", "after"), options.trees, strict=True)),
        "runs": {"before": [], "after": []},
    }
    for _ in range(options.pairs):
        for name, tree in zip(("before", "after"), options.trees, strict=True):
            env = dict(os.environ, PYTHONPATH=tree)
            out = subprocess.run(
                [sys.executable, __file__, *args], env=env, check=True, capture_output=True
            ).stdout
            row = json.loads(out.decode().strip().splitlines()[-1])
            row["loadavg"] = loadavg()
            report["runs"][name].append(row)
            print(name, json.dumps(row), file=sys.stderr)
    keys = (
        "new_pages_cpu_us_per_page",
        "resident_pages_cpu_us_per_page",
        "new_pages_again_cpu_us_per_page",
    )
    report["median"] = {
        name: {k: statistics.median(r[k] for r in runs) for k in keys}
        for name, runs in report["runs"].items()
    }
    report["after_over_before"] = {
        k: statistics.median(
            round(a[k] / b[k], 3)
            for a, b in zip(report["runs"]["after"], report["runs"]["before"], strict=True)
        )
        for k in keys
    }
    report["loadavg_end"] = loadavg()
    text = json.dumps(report, indent=2)
    if options.output:
        Path(options.output).write_text(text + "\n")
    print(json.dumps({"median": report["median"], "ratio": report["after_over_before"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
