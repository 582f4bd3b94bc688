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
        [--out benchmarks/results/nbd.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from vmpager.nbd import MemoryBackend, NbdServer

MIB = 1 << 20
IMAGE_BYTES = 256 * MIB
FIO_BYTES = 64 * MIB
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


def qemu_img_bench(url: str, count: int, write: bool) -> float:
    """IOPS of one ``qemu-img bench`` run."""
    args = ["qemu-img", "bench", "-f", "raw", "-c", str(count), "-d", "16", "-s", "4k"]
    if write:
        args.append("-w")
    out = subprocess.run([*args, url], capture_output=True, text=True, check=True).stdout
    seconds = float(out.strip().splitlines()[-1].split()[3])
    return count / seconds


def fio(url: str, rw: str, seconds: float) -> float:
    """IOPS of one time-based fio run with the nbd engine."""
    out = subprocess.run(
        [
            "fio",
            "--name=bench",
            "--ioengine=nbd",
            f"--uri={url}",
            f"--rw={rw}",
            "--bs=4k",
            "--iodepth=16",
            f"--size={FIO_BYTES}",
            f"--runtime={seconds}",
            "--time_based",
            "--randrepeat=1",
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--count", type=int, default=20000)
    parser.add_argument("--fio-seconds", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    for program in ("qemu-img", "fio", "nbdkit", "nbdcopy"):
        if shutil.which(program) is None:
            sys.exit(f"{program} is missing (apt-get install qemu-utils fio nbdkit libnbd-bin)")

    backend = MemoryBackend(IMAGE_BYTES)
    ours = NbdServer({"bench": backend}).start()
    # The same backend behind worker threads: what the hand-off costs when the
    # backend answers from memory (the mode exists for backends that block).
    pooled = NbdServer({"bench": backend}, workers_per_connection=4).start()
    theirs = Nbdkit(IMAGE_BYTES)
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
    raw: dict[str, dict[str, list[tuple[float, float, float]]]] = {
        w: {s: [] for s in servers} for w in workloads
    }
    try:
        with tempfile.TemporaryDirectory() as tmp:
            # Reads must find data, not holes: fill both images the same way.
            image = Path(tmp) / "fill.img"
            image.write_bytes(np.random.default_rng(1).bytes(IMAGE_BYTES))
            for url in (ours.url(), theirs.url()):  # the two vmpager servers share a backend
                subprocess.run(["nbdcopy", str(image), url], check=True)
        for rep in range(args.reps):
            for workload, run in workloads.items():
                # Rotate which server goes first so drift hits all alike.
                names = list(servers)
                order = names[rep % len(names) :] + names[: rep % len(names)]
                for name in order:
                    url, cpu = servers[name]
                    raw[workload][name].append(measure(lambda: run(url), cpu))  # noqa: B023
                    print(
                        f"rep {rep} {workload} {name}: {raw[workload][name][-1][0]:.0f} IOPS",
                        file=sys.stderr,
                    )
    finally:
        ours.close()
        pooled.close()
        theirs.close()

    results: dict[str, Any] = {}
    for workload, per_server in raw.items():
        entry: dict[str, Any] = {}
        for name, runs in per_server.items():
            entry[name] = {
                "iops_median": round(statistics.median(r[0] for r in runs)),
                "iops_runs": [round(r[0]) for r in runs],
                "server_cpu_us_per_request_median": round(statistics.median(r[1] for r in runs), 1),
            }
        for name in ("vmpager", "vmpager_workers4"):
            entry[f"ratio_{name}_over_nbdkit"] = round(
                entry[name]["iops_median"] / entry["nbdkit"]["iops_median"], 3
            )
        results[workload] = entry
    blocking = blocking_backend_section(args.reps, 2000, 200e-6)
    report = {
        "benchmark": "nbd_bench",
        "machine": machine(),
        "config": {
            "reps": args.reps,
            "qemu_img_bench_count": args.count,
            "fio_seconds": args.fio_seconds,
            "image_bytes": IMAGE_BYTES,
            "fio_bytes": FIO_BYTES,
            "transport": "TCP 127.0.0.1",
        },
        "vmpager_server_statistics": dataclasses.asdict(ours.statistics()),
        "vmpager_workers4_server_statistics": dataclasses.asdict(pooled.statistics()),
        "results": results,
        "blocking_backend_qemu_img_bench_read_4k_qd16": blocking,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
