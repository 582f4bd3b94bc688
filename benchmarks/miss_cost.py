"""What a miss of the per-access loop costs in Python, and where that time goes.

The per-access loop of the standard workload (one 8-byte ``read`` and one
``write`` per access, ``vmpager.bench.loop.access``) on an object four times
its memory budget. Per pattern (random, zipf), one process:

* ``user_us_per_miss``: the process's user-mode CPU time of the access phase
  (every thread: the faulting one, the page daemon, the I/O workers) minus
  the hit path's share (hits times the user CPU of one access to a resident
  page, measured in the same run), over the misses (faults). This is the
  interpreter's cost per miss: the device transfer itself is kernel time
  (``sys_us_per_miss``) or waiting (``wall_us_per_miss``).
* ``breakdown``: with ``--breakdown``, a second run of the same phase sampled
  by ``py-spy --gil`` (interpreter time only, every thread) at ``--rate`` Hz;
  each sample is charged to the innermost vmpager module on its stack,
  grouped into parts (fault path, swap pager, swap metadata, tiers, device,
  page daemon, queues, I/O engine, object calls, the benchmark's own loop),
  and shown as µs per miss (samples / rate / misses) and as shares. py-spy
  counts the GIL's last holder, so a thread blocked in ``preadv`` with no
  other thread running still counts (``preadv_all`` in the top functions),
  and on a loaded machine the µs stretch with the time a thread holding the
  GIL waits for a CPU: compare the shares, or runs at the same load.

* ``calls``: with ``--calls``, a third run of the same phase under cProfile
  with the page daemon in the faulting thread (``daemon_thread=False``), so
  the count is deterministic: Python function calls per miss (every call the
  accesses make, the daemon's included, over the misses) and the functions
  called most often per miss.

The swap device is a private O_DIRECT file in the temporary directory
(``--swap file``, as ``benchmarks/paging.py``) or RAM (``--swap ram``: no
disk wait, the same Python). Usage (from the repository root)::

    PYTHONPATH=src python benchmarks/miss_cost.py [--mib 512] [--limit-mib 128]
        [--patterns random,zipf] [--accesses 200000] [--swap file|ram]
        [--breakdown] [--rate 250] [--calls]
        [--output benchmarks/results/miss_cost.json]
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import dataclasses
import json
import os
import platform
import pstats
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from vmpager import VM
from vmpager.bench import loop
from vmpager.console import Bar
from vmpager.devices.file import FileDevice
from vmpager.devices.memory import MemoryDevice
from vmpager.vm.config import VMConfig
from vmpager.workload import Workload

MIB = 1 << 20
PAGE = 4096

#: Module path prefixes (under vmpager/) -> the part of the miss they belong to,
#: first match wins (so vm/fault.py before vm/).
PARTS: list[tuple[str, str]] = [
    ("vm/fault.py", "fault path"),
    ("vm/pageout.py", "page daemon"),
    ("vm/queues.py", "page queues"),
    ("vm/batch.py", "batched calls"),
    ("vm/object.py", "object read/write"),
    ("vm/kernel.py", "kernel services"),
    ("vm/registry.py", "pager contract"),
    ("vm/", "vm other"),
    ("pager/swap.py", "swap pager"),
    ("pager/put.py", "swap pager"),
    ("pager/", "pagers other"),
    ("swap/meta.py", "swap metadata"),
    ("swap/blist.py", "swap allocator"),
    ("swap/", "swap space"),
    ("tiers/", "tiers (checksum)"),
    ("devices/", "device"),
    ("io/", "I/O engine"),
    ("bench/loop.py", "benchmark loop"),
]


class _Quiet:
    """A progress bar that shows nothing."""

    def update(self, done: int) -> None:
        pass

    def finish(self) -> None:
        pass


def _bar() -> Bar:
    return _Quiet()


def _swap(kind: str, nblocks: int) -> list[Any]:
    if kind == "ram":
        return [MemoryDevice(nblocks, block_size=PAGE)]
    return [FileDevice.temporary(nblocks, block_size=PAGE, directory=tempfile.gettempdir())]


def _thread_cpu() -> dict[str, float]:
    """CPU seconds (user + system) per thread name of this process (numbers dropped
    from the names, so the I/O workers add up)."""
    tick = os.sysconf("SC_CLK_TCK")
    names = {t.native_id: t.name for t in threading.enumerate()}
    out: dict[str, float] = collections.defaultdict(float)
    for task in Path("/proc/self/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue
        name = "".join(c for c in names.get(int(task.name), "other") if not c.isdigit())
        fields = stat[stat.rindex(")") + 2 :].split()
        out[name] += (int(fields[11]) + int(fields[12])) / tick
    return dict(out)


def _part_of(frame: str) -> str | None:
    """The part a py-spy frame ``func (path:line)`` belongs to, or None outside vmpager."""
    start = frame.rfind("(")
    where = frame[start + 1 :] if start >= 0 else frame
    idx = where.find("vmpager/")
    if idx < 0:
        return None
    path = where[idx + len("vmpager/") :]
    for prefix, part in PARTS:
        if path.startswith(prefix):
            return part
    return "other vmpager"


def _parse_raw(text: str) -> tuple[collections.Counter[str], collections.Counter[str], int]:
    """py-spy raw output -> samples per part, per innermost vmpager function, total.

    A line is ``thread (tid): name;frame;frame... count``, frames ``func (path:line)``.
    """
    parts: collections.Counter[str] = collections.Counter()
    funcs: collections.Counter[str] = collections.Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        total += count
        frames = stack.split(";")
        part = None
        func = None
        for frame in reversed(frames):
            part = _part_of(frame)
            if part is not None:
                func = frame
                break
        parts[part or "outside vmpager"] += count
        leaf = frames[-1]
        funcs[f"{func} <- {leaf}" if func and leaf != func else (func or leaf)] += count
    return parts, funcs, total


def _hit_user_us() -> float:
    """User CPU µs of one access of the loop (read + write of 8 bytes) to a resident page
    (64 MiB of pages in twice that memory, no swap); the best of three runs."""
    npages = 16384
    workload = Workload(npages, "random", accesses=300_000)
    with VM(memory=2 * npages * PAGE, swap=[]) as vm:
        obj = vm.allocate(npages * PAGE)
        loop.fill(obj, Workload(npages, "seq"), _bar())
        best = float("inf")
        for _ in range(3):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_utime
            loop.access(obj, workload, _bar())
            used = resource.getrusage(resource.RUSAGE_SELF).ru_utime - before
            best = min(best, used)
    return best * 1e6 / workload.naccesses


def _run(
    pattern: str,
    mib: int,
    limit_mib: int,
    accesses: int,
    swap_kind: str,
    hit_us: float,
    sampler: list[str] | None,
    *,
    count_calls: bool = False,
) -> dict[str, Any]:
    npages = mib * MIB // PAGE
    workload = Workload(npages, pattern, accesses=accesses)  # type: ignore[arg-type]
    devices = _swap(swap_kind, 2 * npages)
    config = dataclasses.replace(VMConfig(), daemon_thread=False) if count_calls else None
    profile = cProfile.Profile() if count_calls else None
    try:
        with VM(memory=f"{limit_mib}M", swap=devices, config=config) as vm:
            obj = vm.allocate(mib * MIB)
            loop.fill(obj, workload, _bar())
            vm.wait_idle()
            before = vm.statistics()
            ru0 = resource.getrusage(resource.RUSAGE_SELF)
            threads0 = _thread_cpu()
            proc = None
            raw_path = None
            if sampler is not None:
                fd, raw_path = tempfile.mkstemp(suffix=".txt", prefix="miss-cost-")
                os.close(fd)
                proc = subprocess.Popen(
                    [*sampler, "--pid", str(os.getpid()), "-o", raw_path],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                time.sleep(1.0)  # let it attach
            if profile is not None:
                profile.enable()
            seconds = loop.access(obj, workload, _bar())
            if profile is not None:
                profile.disable()
            if proc is not None:
                proc.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
                proc.wait(timeout=60)
            ru1 = resource.getrusage(resource.RUSAGE_SELF)
            threads1 = _thread_cpu()
            after = vm.statistics()
            bad = loop.verify(obj, workload, _bar())
            vm.check()
    finally:
        for device in devices:
            device.close()
    if bad:
        raise SystemExit(f"{pattern}: {bad} pages do not hold what they should")
    misses = after.faults - before.faults
    hits = workload.naccesses - misses
    user = ru1.ru_utime - ru0.ru_utime
    system = ru1.ru_stime - ru0.ru_stime
    result: dict[str, Any] = {
        "pattern": pattern,
        "accesses": workload.naccesses,
        "misses": misses,
        "miss_ratio": round(misses / workload.naccesses, 4),
        "access_s": round(seconds, 3),
        "accesses_per_s": round(workload.naccesses / seconds, 1),
        "pages_in": after.pagein_pages - before.pagein_pages,
        "pages_out": after.pageout_pages - before.pageout_pages,
        "user_s": round(user, 3),
        "sys_s": round(system, 3),
        "hit_user_us": round(hit_us, 3),
        "user_us_per_miss": round((user * 1e6 - hits * hit_us) / max(misses, 1), 2),
        "sys_us_per_miss": round(system * 1e6 / max(misses, 1), 2),
        "wall_us_per_miss": round((seconds * 1e6 - hits * hit_us) / max(misses, 1), 2),
        "thread_cpu_s": {
            k: round(threads1.get(k, 0.0) - threads0.get(k, 0.0), 3)
            for k in sorted(threads1)
            if threads1.get(k, 0.0) - threads0.get(k, 0.0) >= 0.005
        },
    }
    if profile is not None:
        stats = pstats.Stats(profile)
        per_function = sorted(
            (
                (entry[1], f"{func[2]} ({func[0].rsplit('vmpager/', 1)[-1]}:{func[1]})")
                for func, entry in stats.stats.items()  # type: ignore[attr-defined]
            ),
            reverse=True,
        )
        # Each call is charged to the part of its function, or, for a function
        # outside vmpager (builtins, the standard library), to its caller's.
        by_part: collections.Counter[str] = collections.Counter()
        for func, entry in stats.stats.items():  # type: ignore[attr-defined]
            part = _part_of(f"({func[0]}:{func[1]})")
            if part is not None:
                by_part[part] += entry[1]
                continue
            for caller, caller_entry in entry[4].items():
                by_part[_part_of(f"({caller[0]}:{caller[1]})") or "outside vmpager"] += (
                    caller_entry[1]
                )
        result["calls"] = {
            "calls_per_miss": round(stats.total_calls / max(misses, 1), 1),  # type: ignore[attr-defined]
            "calls_per_miss_by_part": {
                part: round(count / max(misses, 1), 2) for part, count in by_part.most_common()
            },
            "top_calls_per_miss": {
                name: round(count / max(misses, 1), 2) for count, name in per_function[:30]
            },
        }
    if raw_path is not None:
        text = Path(raw_path).read_text()
        os.unlink(raw_path)
        rate = float(sampler[sampler.index("--rate") + 1]) if sampler else 1.0
        parts, funcs, total = _parse_raw(text)
        per_miss = {
            part: round(count / rate * 1e6 / max(misses, 1), 2)
            for part, count in parts.most_common()
        }
        result["breakdown"] = {
            "samples": total,
            "rate_hz": rate,
            "interpreter_us_per_miss": round(total / rate * 1e6 / max(misses, 1), 2),
            "us_per_miss_by_part": per_miss,
            "percent_by_part": {
                part: round(100 * count / max(total, 1), 1) for part, count in parts.most_common()
            },
            "top_functions_us_per_miss": {
                f: round(c / rate * 1e6 / max(misses, 1), 2) for f, c in funcs.most_common(25)
            },
        }
    return result


def _machine() -> dict[str, Any]:
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "ncpu": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "tmpdir": tempfile.gettempdir(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=512)
    parser.add_argument("--limit-mib", type=int, default=128)
    parser.add_argument("--patterns", default="random,zipf")
    parser.add_argument("--accesses", type=int, default=200_000)
    parser.add_argument("--swap", choices=("file", "ram"), default="file")
    parser.add_argument("--breakdown", action="store_true", help="also sample with py-spy")
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument(
        "--calls", action="store_true", help="also count function calls per miss (cProfile)"
    )
    parser.add_argument("--label", default="", help="a name for this run in the output")
    parser.add_argument("--output", help="write the JSON here too")
    args = parser.parse_args(argv)
    sampler = None
    if args.breakdown:
        exe = shutil.which("py-spy")
        if exe is None:
            parser.error("--breakdown needs py-spy on PATH (pip install py-spy)")
        sampler = [exe, "record", "--gil", "--nonblocking", "--threads", "--format", "raw"]
        sampler += ["--rate", str(args.rate)]
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    load_before = os.getloadavg()
    hit_us = _hit_user_us()
    runs = []
    for pattern in args.patterns.split(","):
        runs.append(_run(pattern, args.mib, args.limit_mib, args.accesses, args.swap, hit_us, None))
        if sampler is not None:
            sampled = _run(
                pattern, args.mib, args.limit_mib, args.accesses, args.swap, hit_us, sampler
            )
            runs[-1]["breakdown"] = sampled["breakdown"]
            runs[-1]["breakdown"]["sampled_access_s"] = sampled["access_s"]
        if args.calls:
            counted = _run(
                pattern,
                args.mib,
                args.limit_mib,
                args.accesses,
                args.swap,
                hit_us,
                None,
                count_calls=True,
            )
            runs[-1]["calls"] = counted["calls"]
    report = {
        "benchmark": "miss_cost",
        "label": args.label,
        "started": started,
        "command": " ".join([sys.executable, *sys.argv]),
        "machine": _machine(),
        "mib": args.mib,
        "limit_mib": args.limit_mib,
        "swap": args.swap,
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "runs": runs,
        "threads": threading.active_count(),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
