"""Render a paging benchmark report as the Markdown tables of docs/performance.md.

The report is the JSON of ``benchmarks/paging.py`` or of ``vmpager bench
--json`` (the same implementation, ``vmpager.bench.paging``).

Usage: ``python benchmarks/paging_report.py benchmarks/results/paging.json``
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any


def _num(value: Any, digits: int = 0) -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and digits:
        return f"{value:,.{digits}f}"
    return f"{round(value):,}"


def render(report: dict[str, Any]) -> str:
    cfg = report["config"]
    machine = report["machine"]
    summary = report["summary"]
    medians = summary["medians"]
    patterns = cfg["patterns"]
    lines = [
        f"{cfg['mib']} MiB object, {cfg['limit_mib']} MiB memory, medians of {cfg['reps']} "
        f"reps, batch {cfg['batch']} accesses, page size {cfg['page_size']}; "
        f"{machine.get('cpu_model', '?')}, {machine.get('cores', '?')} cores, "
        f"started {report['started']}.",
        "",
        "| system | pattern | accesses/s | miss | pages in | pages out | device reads "
        "| device writes | bytes written / page out | CPU µs / access |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for system in sorted(medians):
        for pattern in patterns:
            row = medians[system].get(pattern)
            if row is None:
                continue
            lines.append(
                f"| {system} | {pattern} | {_num(row.get('accesses_per_s'))} "
                f"| {row.get('miss_ratio', 0):.3f} | {_num(row.get('pages_in'))} "
                f"| {_num(row.get('pages_out'))} | {_num(row.get('device_read_ops'))} "
                f"| {_num(row.get('device_write_ops'))} "
                f"| {_num(row.get('bytes_written_per_page_out'))} "
                f"| {_num(row.get('cpu_us_per_access'), 1)} |"
            )
    for key, title in (
        ("ratios_to_kernel", "kernel (per access)"),
        ("ratios_to_kernel_batch", "kernel-batch (MADV_WILLNEED)"),
    ):
        ratios = summary.get(key) or {}
        if not ratios:
            continue
        lines += ["", f"Ratio to {title}, median of the per-rep ratios (per rep):", ""]
        lines += ["| system | " + " | ".join(patterns) + " |", "|---" * (len(patterns) + 1) + "|"]
        for system in sorted(ratios):
            cells = []
            for pattern in patterns:
                r = ratios[system].get(pattern)
                cells.append(
                    "—"
                    if r is None
                    else f"**{r['median']:.2f}** ({', '.join(f'{x:.2f}' for x in r['per_rep'])})"
                )
            lines.append(f"| {system} | " + " | ".join(cells) + " |")
    if "disk" in report:
        bw = [r["mib_per_s"] for r in report["disk"]["write_bandwidth"]]
        po = [r["mib_per_s"] for r in report["pageout"]]
        drain = [r.get("drain_mib_per_s") for r in report["pageout"]]
        lines += [
            "",
            f"Disk sequential write (O_DIRECT, same write size, one in flight): median "
            f"{statistics.median(bw):,.0f} MiB/s ({', '.join(f'{x:,.0f}' for x in bw)}); "
            f"vmpager pageout while a program writes: median {statistics.median(po):,.0f} "
            f"MiB/s ({', '.join(f'{x:,.0f}' for x in po)}), ratio "
            f"{report.get('pageout_vs_disk')}",
        ]
        if None not in drain:
            lines[-1] += (
                f"; the daemon draining dirty memory: median {statistics.median(drain):,.0f} "
                f"MiB/s ({', '.join(f'{x:,.0f}' for x in drain)}), ratio "
                f"{report.get('pageout_drain_vs_disk')}"
            )
        lines[-1] += "."
    if "hit_path" in report:
        hit = report["hit_path"]
        lines += ["", "Resident hit path (pages in memory, 1 M accesses):", ""]
        lines += ["| measure | per second |", "|---|---|"]
        for key, value in hit.items():
            if key.endswith("_per_s"):
                lines.append(f"| {key} | {value:,} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    print(render(json.loads(Path(argv[1]).read_text())), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
