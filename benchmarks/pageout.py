"""Pageout bandwidth against the disk's sequential write bandwidth, side by side.

Per repetition, in one process:

* ``disk``: sequential O_DIRECT ``pwritev`` into a fresh file on the swap
  directory, one write in flight, of ``--disk-kib`` (1 MiB; the same
  whatever the configuration, so that trees or configurations with other
  pageout sizes are measured against one ceiling; this disk's rate still
  grows from 256 KiB writes to 1 MiB ones): the ceiling pageout is
  measured against;
* ``drain``: memory full of dirty pages (``write_pages``), then
  ``vm.pageout(asynchronous=True)`` of all but a few frames and the wait for
  the writes: the page daemon's path alone;
* ``writer``: memory full of dirty pages, then a program writes twice the
  budget more in 256 KiB ``write`` calls while the daemon pages out behind
  it; the clock runs from the first write to the last completion.

Reports MiB/s of each, the ratios to the disk per repetition and their
medians, the mean pageout cluster, the load average before and after, and
(``--profile``) nothing more: profile with ``py-spy record --gil`` around it.

    PYTHONPATH=src python benchmarks/pageout.py --limit-mib 256 --reps 3 \
        --output benchmarks/results/pageout.json

Run it with ``PYTHONPATH`` pointing at two trees, alternately, to compare
them: the JSON carries the tree it imported (``vmpager_path``).
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import statistics
import sys
import tempfile
import time
from typing import Any

import numpy as np

import vmpager
from vmpager.bench import kernel
from vmpager.devices.file import FileDevice
from vmpager.vm.config import VMConfig
from vmpager.vm.system import VM

MIB = 1 << 20


def loadavg() -> list[float]:
    return [float(x) for x in open("/proc/loadavg").read().split()[:3]]


def disk_write(
    directory: str, write_bytes: int, seconds: float, file_mib: int = 1024
) -> tuple[float, float]:
    """MiB/s of sequential O_DIRECT writes of ``write_bytes``, one in flight, and the
    CPU time (user + system) per 4 KiB written."""
    fd, path = tempfile.mkstemp(prefix="pageout-bench-", suffix=".dat", dir=directory)
    os.close(fd)
    buf = mmap.mmap(-1, write_bytes)
    buf.write(os.urandom(write_bytes))
    try:
        fd = os.open(path, os.O_RDWR | os.O_DIRECT)
        os.ftruncate(fd, file_mib * MIB)
        written = 0
        start, cpu = time.perf_counter(), time.process_time()
        while time.perf_counter() - start < seconds:
            os.pwritev(fd, [buf], written % (file_mib * MIB))
            written += write_bytes
        elapsed = time.perf_counter() - start
        cpu = time.process_time() - cpu
        os.close(fd)
    finally:
        os.unlink(path)
        buf.close()
    return written / MIB / elapsed, 1e6 * cpu / (written / 4096)


def pageout_rates(
    limit_mib: int, directory: str, page_size: int, config: VMConfig, phases: str = "both"
) -> dict[str, Any]:
    """The drain and behind-a-writer rates of one fresh VM (see the module docstring);
    ``phases``: "drain" or "writer" skips the other (for profiling one)."""
    npages = limit_mib * MIB // page_size
    nblocks = 8 * npages + 1024
    device = FileDevice.temporary(nblocks, block_size=page_size, directory=directory)
    chunk = np.full(64 * page_size, 0x5A, dtype=np.uint8).tobytes()
    try:
        with VM(memory=f"{limit_mib}M", swap=[device], page_size=page_size, config=config) as vm:
            obj = vm.allocate(3 * limit_mib * MIB)
            keep = max(vm.free_target_nframes, 64)
            rows = np.full((npages - keep, page_size), 0x5A, dtype=np.uint8)
            obj.write_pages(np.arange(npages - keep), rows)
            vm.wait_idle()
            drained, drain_s, drain_cpu = 0, 1e-9, 0.0
            if phases != "writer":
                before = vm.statistics().pageout_pages
                start, cpu = time.perf_counter(), time.process_time()
                vm.pageout(npages - 2 * keep, asynchronous=True)
                vm.wait_idle()
                drain_s = time.perf_counter() - start
                drain_cpu = time.process_time() - cpu
                drained = vm.statistics().pageout_pages - before
                obj.write_pages(np.arange(npages - keep), rows)
                vm.wait_idle()
            written, writer_s, writer_cpu = 0, 1e-9, 0.0
            if phases != "drain":
                before = vm.statistics().pageout_pages
                start, cpu = time.perf_counter(), time.process_time()
                for offset in range(npages * page_size, 3 * npages * page_size, len(chunk)):
                    obj.write(offset, chunk)
                vm.wait_idle()
                writer_s = time.perf_counter() - start
                writer_cpu = time.process_time() - cpu
                written = vm.statistics().pageout_pages - before
            stats = vm.statistics()
            vm.check()
            # Nothing written is lost: every page reads back as written.
            sample = np.random.default_rng(1).integers(0, 3 * npages, 2000)
            for pindex in sample.tolist():
                data = obj.read(pindex * page_size, 8)
                wrote = pindex < npages - keep or (pindex >= npages and phases != "drain")
                expected = b"\x5a" * 8 if wrote else bytes(8)
                if data != expected:
                    raise AssertionError(f"page {pindex} reads {data!r}")
    finally:
        device.close()
    return {
        "drain_pages": drained,
        "drain_s": round(drain_s, 3),
        "drain_mib_per_s": round(drained * page_size / MIB / drain_s, 1),
        "drain_cpu_us_per_page": round(1e6 * drain_cpu / max(drained, 1), 2),
        "writer_pages": written,
        "writer_s": round(writer_s, 3),
        "writer_mib_per_s": round(written * page_size / MIB / writer_s, 1),
        "writer_cpu_us_per_page": round(1e6 * writer_cpu / max(written, 1), 2),
        "mean_cluster_npages": round(stats.mean_cluster_npages, 1),
        "pageouts": stats.pageouts,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--limit-mib", type=int, default=256, help="memory budget, MiB")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--page-size", type=int, default=4096)
    parser.add_argument("--swap-dir", default="/var/tmp")
    parser.add_argument("--disk-seconds", type=float, default=2.0)
    parser.add_argument("--no-disk", action="store_true", help="skip the disk measurement")
    parser.add_argument(
        "--disk-kib", type=int, default=1024, help="the disk measurement's write size, KiB"
    )
    parser.add_argument(
        "--phases", choices=("both", "drain", "writer"), default="both", help="for profiling"
    )
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a VMConfig field (int or bool), e.g. swap_async_max=8; repeatable",
    )
    parser.add_argument(
        "--switch-interval-ms",
        type=float,
        default=None,
        help="sys.setswitchinterval for the run (how long a thread back from the device "
        "may wait for the interpreter; Python's default is 5 ms)",
    )
    parser.add_argument("--label", default="", help="a name for this tree in the output")
    parser.add_argument("--output", help="write the JSON report here (else stdout)")
    options = parser.parse_args(argv)
    fields: dict[str, Any] = {}
    for item in options.config:
        key, _, value = item.partition("=")
        fields[key] = value == "true" if value in ("true", "false") else int(value)
    config = VMConfig(**fields)
    if options.switch_interval_ms is not None:
        sys.setswitchinterval(options.switch_interval_ms / 1000)
    write_bytes = options.disk_kib * 1024
    report: dict[str, Any] = {
        "benchmark": "pageout bandwidth against the disk's sequential write bandwidth",
        "label": options.label,
        "vmpager_path": os.path.dirname(vmpager.__file__),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "loadavg_start": loadavg(),
        "machine": kernel.describe_machine(options.swap_dir),
        "config": {
            "limit_mib": options.limit_mib,
            "page_size": options.page_size,
            "disk_write_kib": options.disk_kib,
            "pageout_write_kib": config.cluster_max_npages * options.page_size // 1024,
            "swap_dir": options.swap_dir,
            "vm_config": fields,
            "switch_interval_ms": sys.getswitchinterval() * 1000,
        },
        "reps": [],
    }
    for _ in range(options.reps):
        rep: dict[str, Any] = {}
        if not options.no_disk:
            rate, cpu = disk_write(options.swap_dir, write_bytes, options.disk_seconds)
            rep["disk_mib_per_s"] = round(rate, 1)
            rep["disk_cpu_us_per_4k"] = round(cpu, 2)
        rep.update(
            pageout_rates(
                options.limit_mib, options.swap_dir, options.page_size, config, options.phases
            )
        )
        if not options.no_disk:
            rep["drain_vs_disk"] = round(rep["drain_mib_per_s"] / rep["disk_mib_per_s"], 3)
            rep["writer_vs_disk"] = round(rep["writer_mib_per_s"] / rep["disk_mib_per_s"], 3)
        report["reps"].append(rep)
        print(json.dumps(rep), file=sys.stderr)
    reps = report["reps"]
    median = {
        key: statistics.median(r[key] for r in reps)
        for key in reps[0]
        if isinstance(reps[0][key], (int, float))
    }
    report["median"] = median
    report["loadavg_end"] = loadavg()
    text = json.dumps(report, indent=2)
    if options.output:
        with open(options.output, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
