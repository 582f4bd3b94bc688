"""4 KiB random-ish I/O through NbdServer(MemoryBackend) versus ``nbdkit memory``, side by side.

Workloads (each run against both servers, interleaved, ``--reps`` times):

- ``qemu-img bench -c COUNT -d 16 -s 4k [-w]``: 4 KiB requests at queue depth
  16 (qemu-img steps through the image; the server cannot tell).
- ``fio --ioengine=nbd --rw=randwrite|randread --bs=4k --iodepth=16``,
  time-based, on a 64 MiB image pre-filled with random data.

For every run the benchmark records IOPS and the server's CPU time per
request (our server runs in this process, whose main thread only waits for
the client; nbdkit's comes from /proc/PID/stat), then prints JSON with the
medians and the ratios ours / nbdkit. "vmpager" is the default server (each
connection's requests run in its own thread); "vmpager_workers4" is the same
backend with ``workers_per_connection=4``. Needs qemu-utils, fio, libnbd-bin and
nbdkit. Usage::

    python benchmarks/nbd_bench.py [--reps 5] [--count 20000] [--fio-seconds 5] \
        [--sections memory,blocking,vm] [--profile] [--out benchmarks/results/nbd.json]

The ``vm`` section serves real VM objects (``VMObjectBackend``) of 256 MiB,
pre-filled with random data, each VM paging to its own swap file on disk
(``FileDevice``, O_DIRECT) in ``--swap-dir``:

- ``vm_fits``: a 512 MiB memory budget, so the object stays resident;
- ``vm_paging``: a 64 MiB budget (the object is 4x larger), so most requests
  fault a page in from the swap file or push one out;
- ``vm_paging_workersN``: the same object behind ``workers_per_connection=N``;
- ``vm_paging_readaround0``: ``vm_paging``'s budget in a third VM configured
  with ``readaround_npages=0`` (a fault reads only the page it needs);
- ``nbdkit``: ``nbdkit memory`` of the same size and content.

Here fio spreads its requests over the whole object, and ``qemu-img bench``
steps through it with a stride of 2053 pages (a permutation of the pages,
since the stride is odd and the page count a power of two), so neither runs
sequentially and read-around cannot hide the paging. Before every run a
paging VM is brought to one state (all pages out, then memory refilled with
clean pages), so no run pays for the write-back of the run before it; IOPS
are reported as medians and the ratios to nbdkit both as the ratio of
medians and as the median of each rep's ratio. ``--profile`` then
runs fio randread and randwrite once more against ``vm_fits`` and
``vm_paging`` with cProfile enabled in every server thread and reports where
the request path spends its time (wall time, by module group, and the top
functions), and, when py-spy is installed, samples every thread of the
paging VM (connection, page daemon, I/O engine) during the same runs; the
profiled runs are not part of the IOPS figures.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import dataclasses
import json
import os
import platform
import pstats
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from vmpager.nbd import MemoryBackend, NbdServer
from vmpager.nbd.vmdisk import VMObjectBackend
from vmpager.vm.config import VMConfig
from vmpager.vm.system import VM

MIB = 1 << 20
IMAGE_BYTES = 256 * MIB
FIO_BYTES = 64 * MIB
VM_OBJECT_BYTES = 256 * MIB
#: qemu-img bench stride in the vm section: odd, so it visits every page of the object.
VM_BENCH_STRIDE_NPAGES = 2053
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kib = int(f.readline().split()[1])

    def version(args: list[str]) -> str:
        try:
            out = subprocess.run(args, capture_output=True, text=True, timeout=10).stdout
        except OSError:
            return "missing"
        return out.splitlines()[0] if out else "unknown"

    return {
        "uname": " ".join(platform.uname()),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kib / (1 << 20), 1),
        "python": sys.version.split()[0],
        "qemu_img": version(["qemu-img", "--version"]),
        "fio": version(["fio", "--version"]),
        "nbdkit": version(["nbdkit", "--version"]),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Nbdkit:
    """``nbdkit memory`` on a free loopback port, in the foreground as our child."""

    def __init__(self, size_bytes: int) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            ["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(self.port), "memory", str(size_bytes)]
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("nbdkit did not start") from None
                time.sleep(0.05)

    def url(self) -> str:
        return f"nbd://127.0.0.1:{self.port}/"

    def cpu_s(self) -> float:
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def qemu_img_bench(
    url: str,
    count: int,
    write: bool,
    step_bytes: int | None = None,
    offset_bytes: int | None = None,
) -> float:
    """IOPS of one ``qemu-img bench`` run (``step_bytes``: offset stride, default 4 KiB;
    ``offset_bytes``: where the first request goes, default 0)."""
    args = ["qemu-img", "bench", "-f", "raw", "-c", str(count), "-d", "16", "-s", "4k"]
    if step_bytes is not None:
        args += ["-S", str(step_bytes)]
    if offset_bytes is not None:
        args += ["-o", str(offset_bytes)]
    if write:
        args.append("-w")
    out = subprocess.run([*args, url], capture_output=True, text=True, check=True).stdout
    seconds = float(out.strip().splitlines()[-1].split()[3])
    return count / seconds


def fio(
    url: str, rw: str, seconds: float, size_bytes: int = FIO_BYTES, seed: int | None = None
) -> float:
    """IOPS of one time-based fio run with the nbd engine over the first ``size_bytes``.

    ``seed`` None repeats fio's default random sequence (``--randrepeat=1``);
    an int draws another (``--randseed``).
    """
    out = subprocess.run(
        [
            "fio",
            "--name=bench",
            "--ioengine=nbd",
            f"--uri={url}",
            f"--rw={rw}",
            "--bs=4k",
            "--iodepth=16",
            f"--size={size_bytes}",
            f"--runtime={seconds}",
            "--time_based",
            "--randrepeat=1" if seed is None else f"--randseed={seed}",
            "--output-format=json",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    job = json.loads(out[out.index("{") :])["jobs"][0]
    return float(job["write" if "write" in rw else "read"]["iops"])


def measure(run: Callable[[], float], cpu_s: Callable[[], float]) -> tuple[float, float, float]:
    """``(iops, server CPU µs per request, wall seconds)`` of one run."""
    cpu0 = cpu_s()
    t0 = time.perf_counter()
    iops = run()
    wall = time.perf_counter() - t0
    cpu = cpu_s() - cpu0
    requests = iops * wall
    return iops, cpu / requests * 1e6 if requests else 0.0, wall


class DeviceLikeBackend(MemoryBackend):
    """A MemoryBackend whose reads block ``delay_s`` without the GIL, like a device read."""

    def __init__(self, size_bytes: int, delay_s: float) -> None:
        super().__init__(size_bytes)
        self.delay_s = delay_s

    def read_into(self, offset: int, buffer: memoryview) -> None:
        time.sleep(self.delay_s)
        super().read_into(offset, buffer)


def blocking_backend_section(reps: int, count: int, delay_s: float) -> dict[str, Any]:
    """qemu-img bench reads against a backend that blocks: inline vs worker threads."""
    backend = DeviceLikeBackend(64 * MIB, delay_s)
    runs: dict[str, list[float]] = {"inline": [], "workers4": [], "workers16": []}
    servers = {
        "inline": NbdServer({"b": backend}).start(),
        "workers4": NbdServer({"b": backend}, workers_per_connection=4).start(),
        "workers16": NbdServer({"b": backend}, workers_per_connection=16).start(),
    }
    try:
        for _ in range(reps):
            for name, server in servers.items():
                runs[name].append(qemu_img_bench(server.url(), count, False))
    finally:
        for server in servers.values():
            server.close()
    return {
        "read_delay_us": delay_s * 1e6,
        "requests_per_run": count,
        **{f"{name}_iops_median": round(statistics.median(r)) for name, r in runs.items()},
        **{f"{name}_iops_runs": [round(x) for x in r] for name, r in runs.items()},
    }


def interleaved(
    reps: int,
    workloads: dict[str, Callable[[str], float]],
    servers: dict[str, tuple[str, Callable[[], float]]],
    observe: Callable[[str], dict[str, int]] | None = None,
    settle: Callable[[str], None] | None = None,
) -> dict[str, dict[str, list[tuple[float, float, float, dict[str, int]]]]]:
    """Every workload against every server, ``reps`` times, rotating which server goes first.

    Returns ``raw[workload][server]``: one ``(iops, server CPU µs/request, wall s,
    counter deltas)`` per run; ``observe(server)``, when given, returns counters
    (VM statistics) read before and after each run; ``settle(server)``, when
    given, runs (untimed) before each run.
    """
    raw: dict[str, dict[str, list[tuple[float, float, float, dict[str, int]]]]] = {
        w: {name: [] for name in servers} for w in workloads
    }
    names = list(servers)
    for rep in range(reps):
        for workload, run in workloads.items():
            # Rotate which server goes first so drift hits all alike.
            order = names[rep % len(names) :] + names[: rep % len(names)]
            for name in order:
                url, cpu = servers[name]
                if settle is not None:
                    settle(name)
                before = observe(name) if observe is not None else {}
                iops, cpu_us, wall = measure(lambda: run(url), cpu)  # noqa: B023
                after = observe(name) if observe is not None else {}
                delta = {k: after[k] - before[k] for k in after}
                raw[workload][name].append((iops, cpu_us, wall, delta))
                print(f"rep {rep} {workload} {name}: {iops:.0f} IOPS", file=sys.stderr)
    return raw


def summarize(
    raw: dict[str, dict[str, list[tuple[float, float, float, dict[str, int]]]]],
    ours: tuple[str, ...],
) -> dict[str, Any]:
    """Medians per workload and server, counters per request, and ratios ``ours / nbdkit``."""
    results: dict[str, Any] = {}
    for workload, per_server in raw.items():
        entry: dict[str, Any] = {}
        for name, runs in per_server.items():
            entry[name] = {
                "iops_median": round(statistics.median(r[0] for r in runs)),
                "iops_runs": [round(r[0]) for r in runs],
                "server_cpu_us_per_request_median": round(statistics.median(r[1] for r in runs), 1),
            }
            for key in runs[0][3]:
                entry[name][f"{key}_per_request_median"] = round(
                    statistics.median(r[3][key] / (r[0] * r[2]) for r in runs), 3
                )
        for name in ours:
            entry[f"ratio_{name}_over_nbdkit"] = round(
                entry[name]["iops_median"] / entry["nbdkit"]["iops_median"], 3
            )
            # The same rep's runs are closest in time: their ratio is steadier.
            entry[f"ratio_{name}_over_nbdkit_median_of_reps"] = round(
                statistics.median(
                    a[0] / b[0] for a, b in zip(per_server[name], per_server["nbdkit"], strict=True)
                ),
                3,
            )
        results[workload] = entry
    return results


def memory_section(args: argparse.Namespace, theirs: Nbdkit) -> dict[str, Any]:
    """NbdServer(MemoryBackend) inline and with 4 workers against ``nbdkit memory``."""
    backend = MemoryBackend(IMAGE_BYTES)
    ours = NbdServer({"bench": backend}).start()
    # The same backend behind worker threads: what the hand-off costs when the
    # backend answers from memory (the mode exists for backends that block).
    pooled = NbdServer({"bench": backend}, workers_per_connection=4).start()
    servers: dict[str, tuple[str, Callable[[], float]]] = {
        "vmpager": (ours.url(), time.process_time),
        "vmpager_workers4": (pooled.url(), time.process_time),
        "nbdkit": (theirs.url(), theirs.cpu_s),
    }
    workloads: dict[str, Callable[[str], float]] = {
        "qemu_img_bench_write_4k_qd16": lambda url: qemu_img_bench(url, args.count, True),
        "qemu_img_bench_read_4k_qd16": lambda url: qemu_img_bench(url, args.count, False),
        "fio_randwrite_4k_qd16": lambda url: fio(url, "randwrite", args.fio_seconds),
        "fio_randread_4k_qd16": lambda url: fio(url, "randread", args.fio_seconds),
    }
    try:
        subprocess.run(["nbdcopy", str(args.fill_image), ours.url()], check=True)
        raw = interleaved(args.reps, workloads, servers)
    finally:
        ours.close()
        pooled.close()
    return {
        "vmpager_server_statistics": dataclasses.asdict(ours.statistics()),
        "vmpager_workers4_server_statistics": dataclasses.asdict(pooled.statistics()),
        "results": summarize(raw, ("vmpager", "vmpager_workers4")),
    }


#: VM statistics reported per request in the vm section.
VM_COUNTERS = ("faults", "pagein_pages", "pageins", "pageout_pages", "frame_waits")


@dataclasses.dataclass
class VMDisk:
    """A VM with one 256 MiB object served by one or more NbdServers (same backend)."""

    vm: VM
    backend: VMObjectBackend
    servers: dict[int, NbdServer]

    @classmethod
    def open(
        cls, memory_bytes: int, swap_path: Path, workers: tuple[int, ...], **config: Any
    ) -> VMDisk:
        vm = VM(
            memory=memory_bytes,
            swap=[(str(swap_path), 2 * VM_OBJECT_BYTES)],
            config=dataclasses.replace(VMConfig(), **config),
        )
        try:
            backend = VMObjectBackend(vm.allocate(VM_OBJECT_BYTES))
            servers = {
                n: NbdServer({"vm": backend}, workers_per_connection=n).start() for n in workers
            }
        except BaseException:
            vm.close()
            raise
        return cls(vm, backend, servers)

    def settle(self) -> None:
        """Bring a paging VM to the same state before every run: memory full of clean pages.

        Otherwise the first run after a write workload would pay for
        writing back what that workload dirtied. All pages go out (dirty
        ones are written), then sequential reads of the object's start fill
        the memory budget again with clean pages. A VM whose object fits in
        memory is left alone (it must stay resident).
        """
        vm = self.vm
        if vm.frames.nframes * vm.page_size >= self.backend.size_bytes:
            return
        vm.pageout()
        vm.wait_idle()
        chunk = bytearray(MIB)
        for offset in range(0, vm.frames.nframes * vm.page_size - 4 * MIB, MIB):
            self.backend.read_into(offset, memoryview(chunk))

    def counters(self) -> dict[str, int]:
        stats = self.vm.statistics()
        return {key: int(getattr(stats, key)) for key in VM_COUNTERS}

    def close(self) -> None:
        for server in self.servers.values():
            server.close()
        self.vm.check()
        self.vm.close()


def vm_section(args: argparse.Namespace, theirs: Nbdkit, swap_dir: Path) -> dict[str, Any]:
    """VM objects that fit in memory and that page, against ``nbdkit memory``, side by side."""
    with contextlib.ExitStack() as stack:
        fits = VMDisk.open(2 * VM_OBJECT_BYTES, swap_dir / "swap-fits", (0,))
        stack.callback(fits.close)
        paging = VMDisk.open(VM_OBJECT_BYTES // 4, swap_dir / "swap-paging", (0, *args.workers))
        stack.callback(paging.close)
        # The same budget without read-around: what it costs random 4 KiB reads.
        no_readaround = VMDisk.open(
            VM_OBJECT_BYTES // 4, swap_dir / "swap-paging-ra0", (0,), readaround_npages=0
        )
        stack.callback(no_readaround.close)
        for disk in (fits, paging, no_readaround):
            subprocess.run(["nbdcopy", str(args.fill_image), disk.servers[0].url()], check=True)
            disk.vm.wait_idle()
        servers: dict[str, tuple[str, Callable[[], float]]] = {
            "vm_fits": (fits.servers[0].url(), time.process_time),
            "vm_paging": (paging.servers[0].url(), time.process_time),
        }
        owner = {"vm_fits": fits, "vm_paging": paging}
        for n in args.workers:
            servers[f"vm_paging_workers{n}"] = (paging.servers[n].url(), time.process_time)
            owner[f"vm_paging_workers{n}"] = paging
        servers["vm_paging_readaround0"] = (no_readaround.servers[0].url(), time.process_time)
        owner["vm_paging_readaround0"] = no_readaround
        servers["nbdkit"] = (theirs.url(), theirs.cpu_s)

        def observe(name: str) -> dict[str, int]:
            if name == "nbdkit":
                return dict.fromkeys(VM_COUNTERS, 0)
            return owner[name].counters()

        # The paging servers share one object: a run that replayed the previous
        # run's offsets would find those pages still resident. So each
        # qemu-img run on an object continues the stride permutation where the
        # last one on that object stopped, and each fio run draws other offsets.
        rng = random.Random(2053)
        npages = VM_OBJECT_BYTES // 4096
        step = VM_BENCH_STRIDE_NPAGES * 4096
        disk_of_url = {url: owner.get(name) for name, (url, _) in servers.items()}
        next_index: dict[int, int] = {}  # per object (nbdkit: None): permutation index

        def start(url: str) -> int:
            key = id(disk_of_url[url])
            first = next_index.get(key, 0)
            next_index[key] = first + args.count
            return first * VM_BENCH_STRIDE_NPAGES % npages * 4096

        workloads: dict[str, Callable[[str], float]] = {
            "qemu_img_bench_write_4k_qd16_strided": lambda url: qemu_img_bench(
                url, args.count, True, step, start(url)
            ),
            "qemu_img_bench_read_4k_qd16_strided": lambda url: qemu_img_bench(
                url, args.count, False, step, start(url)
            ),
            "fio_randwrite_4k_qd16_whole_object": lambda url: fio(
                url, "randwrite", args.fio_seconds, VM_OBJECT_BYTES, rng.randrange(1 << 31)
            ),
            "fio_randread_4k_qd16_whole_object": lambda url: fio(
                url, "randread", args.fio_seconds, VM_OBJECT_BYTES, rng.randrange(1 << 31)
            ),
        }

        def settle(name: str) -> None:
            if name != "nbdkit":
                owner[name].settle()

        raw = interleaved(args.reps, workloads, servers, observe, settle)
        ours = tuple(name for name in servers if name != "nbdkit")
        report: dict[str, Any] = {
            "config": {
                "object_bytes": VM_OBJECT_BYTES,
                "vm_fits_memory_bytes": 2 * VM_OBJECT_BYTES,
                "vm_paging_memory_bytes": VM_OBJECT_BYTES // 4,
                "vm_paging_readaround0": "vm_paging's budget with readaround_npages=0",
                "swap": "one FileDevice per VM (O_DIRECT file of 512 MiB) in " + str(swap_dir),
                "qemu_img_bench_stride_pages": VM_BENCH_STRIDE_NPAGES,
                "fio_size_bytes": VM_OBJECT_BYTES,
                "vm_config": {
                    k: getattr(v, "value", v)
                    for k, v in dataclasses.asdict(paging.vm.config).items()
                },
            },
            "results": summarize(raw, ours),
            "vm_fits_statistics": dataclasses.asdict(fits.vm.statistics()),
            "vm_paging_statistics": dataclasses.asdict(paging.vm.statistics()),
            "vm_paging_readaround0_statistics": dataclasses.asdict(no_readaround.vm.statistics()),
        }
        if args.profile:
            report["profile"] = {
                f"{disk_name}_{rw}": profile_fio(disk, rw, args.fio_seconds)
                for disk_name, disk in (("vm_fits", fits), ("vm_paging", paging))
                for rw in ("randread", "randwrite")
            }
            if shutil.which("py-spy") is not None:
                report["py_spy"] = {
                    f"{disk_name}_{rw}": sample_threads(disk, rw, args.fio_seconds)
                    for disk_name, disk in (("vm_fits", fits), ("vm_paging", paging))
                    for rw in ("randread", "randwrite")
                }
            else:
                report["py_spy"] = "not installed (pip install py-spy)"
        return report


class ThreadProfiles:
    """cProfile in every thread started while this is entered (cProfile covers one thread).

    ``threading.setprofile`` runs a hook as each new thread begins; the hook
    replaces itself with a fresh ``cProfile.Profile`` for that thread. The
    server's connection and worker threads start per client, so entering this
    before a client connects profiles exactly that client's request path.
    """

    def __init__(self) -> None:
        self.profiles: list[cProfile.Profile] = []
        self._lock = threading.Lock()

    def _start(self, frame: object, event: str, arg: object) -> None:
        sys.setprofile(None)
        profile = cProfile.Profile()
        with self._lock:
            self.profiles.append(profile)
        profile.enable()

    def __enter__(self) -> ThreadProfiles:
        threading.setprofile(self._start)
        return self

    def __exit__(self, *exc: object) -> None:
        threading.setprofile(None)

    def stats(self) -> pstats.Stats:
        """All threads' profiles merged (call after those threads ended)."""
        with self._lock:
            profiles = list(self.profiles)
        merged = pstats.Stats(profiles[0])
        for profile in profiles[1:]:
            merged.add(profile)
        return merged


def _group(filename: str, function: str) -> str:
    """The part of the request path a profiled function belongs to."""
    path = filename.replace(os.sep, "/")
    for part, name in (
        ("vmpager/nbd/vmdisk", "vm backend (vmdisk.py)"),
        ("vmpager/nbd/", "nbd server"),
        ("vmpager/vm/", "vm (fault, pageout, object)"),
        ("vmpager/pager/", "pagers"),
        ("vmpager/swap/", "swap allocator and metadata"),
        ("vmpager/devices/", "swap device"),
        ("vmpager/io/", "I/O engine"),
        ("vmpager/units", "argument checks (units.py)"),
        ("threading.py", "waiting (Condition.wait)"),
    ):
        if part in path:
            return name
    if filename == "~":
        if "_thread.lock" in function or "_thread.RLock" in function:
            return "waiting (lock acquire)"
        if any(k in function for k in ("recv", "send", "select", "poll")):
            return "sockets"
        if any(k in function for k in ("preadv", "pwritev", "fdatasync", "fsync")):
            return "swap device"
    return "other"


def profile_fio(disk: VMDisk, rw: str, seconds: float) -> dict[str, Any]:
    """One fio run under ThreadProfiles through a fresh server: wall time by group, top functions.

    Times are per server thread: a connection thread's wall time includes
    waiting for the client (``recv``), for the VM lock and for page-ins.
    """
    server = NbdServer({"vm": disk.backend}).start()  # its accept thread is not profiled
    try:
        with ThreadProfiles() as profiles:
            iops = fio(server.url(), rw, seconds, VM_OBJECT_BYTES, seed=7)
    finally:
        server.close()  # joins the connection threads
    stats = profiles.stats()
    entries: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    total = sum(tt for (_, _, tt, _, _) in entries.values())
    groups: dict[str, float] = {}
    for (filename, _, function), (_, _, tt, _, _) in entries.items():
        group = _group(filename, function)
        groups[group] = groups.get(group, 0.0) + tt
    top = sorted(entries.items(), key=lambda kv: kv[1][2], reverse=True)[:15]
    requests = iops * seconds
    return {
        "iops_under_profiler": round(iops),
        "threads": len(profiles.profiles),
        "profiled_s": round(total, 3),
        "share_by_group": {
            g: round(t / total, 3) for g, t in sorted(groups.items(), key=lambda kv: -kv[1])
        },
        "top_by_own_time": [
            {
                "function": f"{Path(filename).name}:{line}:{function}",
                "calls": calls,
                "own_s": round(tt, 3),
                "own_us_per_request": round(tt / requests * 1e6, 2),
                "cumulative_s": round(ct, 3),
            }
            for (filename, line, function), (_, calls, tt, ct, _) in top
        ],
    }


def sample_threads(disk: VMDisk, rw: str, seconds: float) -> dict[str, Any]:
    """Where the threads serving ``disk`` are during one fio run, sampled by py-spy.

    Unlike cProfile this sees the VM's own threads (page daemon, I/O engine)
    and does not slow the code down; ``--idle`` keeps the samples of blocked
    threads, so shares are of wall time. Only the threads of ``disk``'s VM
    and of the connection are kept (the other VMs' threads idle meanwhile).
    Returns, per thread role, the number of threads and the most frequent
    innermost frames as shares of that role's samples.
    """
    vm_threads = [getattr(disk.vm.daemon, "_thread", None)]
    vm_threads += list(getattr(disk.vm.engine, "_threads", []))
    vm_threads.append(getattr(disk.vm.engine, "_completion_thread", None))
    keep = {t.native_id for t in vm_threads if t is not None}
    with tempfile.TemporaryDirectory() as tmp:
        raw_path = Path(tmp) / "stacks.txt"
        server = NbdServer({"vm": disk.backend}).start()
        try:
            client = subprocess.Popen(
                [
                    "fio",
                    "--name=bench",
                    "--ioengine=nbd",
                    f"--uri={server.url()}",
                    f"--rw={rw}",
                    "--bs=4k",
                    "--iodepth=16",
                    f"--size={VM_OBJECT_BYTES}",
                    f"--runtime={seconds + 2}",
                    "--time_based",
                    "--randseed=11",
                ],
                stdout=subprocess.DEVNULL,
            )
            time.sleep(1)
            subprocess.run(
                [
                    "py-spy", "record", "--pid", str(os.getpid()), "--rate", "200",
                    "--duration", str(max(1, int(seconds))), "--threads", "--idle",
                    "--nonblocking", "--format", "raw", "--output", str(raw_path),
                ],
                check=True,
                capture_output=True,
            )  # fmt: skip
            client.wait(60)
        finally:
            server.close()
        lines = raw_path.read_text().splitlines()
    roles: dict[str, dict[str, int]] = {}
    tids: dict[str, set[int]] = {}
    for line in lines:
        stack, _, count_text = line.rpartition(" ")
        frames = stack.split(";")
        head, _, name = frames[0].partition(": ")
        tid = int(head.removeprefix("thread (").rstrip(")"), 0)
        if not (tid in keep or name.startswith("vmpager-nbd-conn")):
            continue
        role = name.rstrip("0123456789").rstrip("-")
        leaf = frames[-1] if len(frames) > 1 else "(no Python frame)"
        function, _, where = leaf.partition(" (")
        leaf = f"{function} ({Path(where.rstrip(')')).name})" if where else function
        per = roles.setdefault(role, {})
        per[leaf] = per.get(leaf, 0) + int(count_text)
        tids.setdefault(role, set()).add(tid)
    report: dict[str, Any] = {}
    for role, per in sorted(roles.items()):
        total = sum(per.values())
        report[role] = {
            "threads": len(tids[role]),
            "top_frames_share_of_wall": {
                leaf: round(n / total, 3)
                for leaf, n in sorted(per.items(), key=lambda kv: -kv[1])[:6]
            },
        }
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--count", type=int, default=20000)
    parser.add_argument("--fio-seconds", type=float, default=5.0)
    parser.add_argument(
        "--sections",
        default="memory,blocking,vm",
        help="comma-separated subset of memory, blocking, vm",
    )
    parser.add_argument(
        "--workers",
        default="4,16",
        help="workers_per_connection values measured for the paging VM (comma-separated)",
    )
    parser.add_argument("--profile", action="store_true", help="cProfile the VM request path")
    parser.add_argument(
        "--swap-dir",
        type=Path,
        default=Path("/var/tmp"),
        help="directory on disk for the vm section's swap files (a private subdirectory)",
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    sections = {s for s in args.sections.split(",") if s}
    if not sections <= {"memory", "blocking", "vm"}:
        parser.error(f"--sections: unknown {sorted(sections - {'memory', 'blocking', 'vm'})}")
    args.workers = tuple(int(n) for n in args.workers.split(",") if n)
    for program in ("qemu-img", "fio", "nbdkit", "nbdcopy"):
        if shutil.which(program) is None:
            sys.exit(f"{program} is missing (apt-get install qemu-utils fio nbdkit libnbd-bin)")

    report: dict[str, Any] = {"benchmark": "nbd_bench", "machine": machine()}
    report["config"] = {
        "reps": args.reps,
        "qemu_img_bench_count": args.count,
        "fio_seconds": args.fio_seconds,
        "image_bytes": IMAGE_BYTES,
        "fio_bytes": FIO_BYTES,
        "transport": "TCP 127.0.0.1",
        "sections": sorted(sections),
    }
    theirs = Nbdkit(IMAGE_BYTES)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            # Reads must find data, not holes: fill every image the same way.
            args.fill_image = Path(tmp) / "fill.img"
            args.fill_image.write_bytes(np.random.default_rng(1).bytes(IMAGE_BYTES))
            subprocess.run(["nbdcopy", str(args.fill_image), theirs.url()], check=True)
            if "memory" in sections:
                report.update(memory_section(args, theirs))
            if "vm" in sections:
                with tempfile.TemporaryDirectory(dir=args.swap_dir) as swap_dir:
                    report["vm_objects"] = vm_section(args, theirs, Path(swap_dir))
    finally:
        theirs.close()
    if "blocking" in sections:
        report["blocking_backend_qemu_img_bench_read_4k_qd16"] = blocking_backend_section(
            args.reps, 2000, 200e-6
        )
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
