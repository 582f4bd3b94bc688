"""``benchmarks/pageout.py`` on two source trees, alternately, in fresh processes.

    python benchmarks/pageout_ab.py --before /tmp/po-before/src --after src \\
        --pairs 5 --output benchmarks/results/pageout_ab.json -- --limit-mib 256

Runs ``before``, ``after``, ``before``, ``after``... (each one repetition,
disk measured in each) and reports per tree the median of every figure, and
per pair the ratios after / before of the drain and writer rates and CPU per
page, with their medians. Arguments after ``--`` go to ``pageout.py``;
``--before-config`` / ``--after-config KEY=VALUE`` (repeatable) and
``--before-arg`` / ``--after-arg=ARG`` go to one side only, so one tree can be
compared with itself under two configurations:

    python benchmarks/pageout_ab.py --before src --after src \
        --before-config cluster_max_npages=64 --pairs 4 -- --limit-mib 512
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def run_one(src: str, extra: list[str]) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    try:
        env = dict(os.environ, PYTHONPATH=src)
        subprocess.run(
            [sys.executable, str(HERE / "pageout.py"), "--reps", "1", "--output", out, *extra],
            env=env,
            check=True,
            stderr=subprocess.DEVNULL,
        )
        report: dict[str, Any] = json.loads(Path(out).read_text())
    finally:
        os.unlink(out)
    rep: dict[str, Any] = report["reps"][0]
    rep["loadavg"] = report["loadavg_start"]
    rep["machine"] = report["machine"]
    rep["config"] = report["config"]
    return rep


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--before", required=True, help="the PYTHONPATH of the before tree")
    parser.add_argument("--after", required=True, help="the PYTHONPATH of the after tree")
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--before-config", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--after-config", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument(
        "--before-arg", action="append", default=[], help="one more pageout.py argument, one side"
    )
    parser.add_argument(
        "--after-arg", action="append", default=[], help="e.g. --after-arg=--switch-interval-ms=1"
    )
    parser.add_argument("--output")
    parser.add_argument("extra", nargs="*", help="arguments for pageout.py (after --)")
    options = parser.parse_args()
    report: dict[str, Any] = {
        "benchmark": "pageout.py, before and after, alternately in fresh processes",
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "loadavg_start": loadavg(),
        "before": options.before,
        "after": options.after,
        "pageout_args": options.extra,
        "before_config": options.before_config,
        "after_config": options.after_config,
        "before_args": options.before_arg,
        "after_args": options.after_arg,
        "runs": {"before": [], "after": []},
    }
    for _ in range(options.pairs):
        for name in ("before", "after"):
            side = [f"--config={item}" for item in getattr(options, f"{name}_config")]
            side += getattr(options, f"{name}_arg")
            rep = run_one(getattr(options, name), [*options.extra, *side])
            report.setdefault("machine", rep.pop("machine"))
            report.setdefault("config", {})[name] = rep.pop("config")
            rep.pop("machine", None)
            rep.pop("config", None)
            report["runs"][name].append(rep)
            print(name, json.dumps(rep), file=sys.stderr)
    keys = [
        k
        for k, v in report["runs"]["after"][0].items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    ]
    report["median"] = {
        name: {k: statistics.median(r[k] for r in runs) for k in keys}
        for name, runs in report["runs"].items()
    }
    ratios: dict[str, Any] = {}
    for key in (
        "drain_mib_per_s",
        "writer_mib_per_s",
        "drain_cpu_us_per_page",
        "writer_cpu_us_per_page",
        "drain_vs_disk",
        "writer_vs_disk",
    ):
        pairs = [
            round(a[key] / b[key], 3)
            for a, b in zip(report["runs"]["after"], report["runs"]["before"], strict=True)
            if key in a and b.get(key)
        ]
        if pairs:
            ratios[key] = {"pairs": pairs, "median": statistics.median(pairs)}
    report["after_over_before"] = ratios
    report["loadavg_end"] = loadavg()
    text = json.dumps(report, indent=2)
    if options.output:
        Path(options.output).write_text(text + "\n")
    print(json.dumps({"median": report["median"], "after_over_before": ratios}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
