"""Paging to Redis through the VM versus the raw redis-py client, side by side in one run.

Targets (one private redis-server, and a private 3-master Redis Cluster, on
this machine, started by the benchmark; loopback networking):

- ``vm_out``: an object of ``--mib`` MiB, written whole while it fits in
  memory, then timed: ``vm.pageout(asynchronous=True)`` + ``vm.sync()``
  (every page written to the server in the page daemon's clusters of 64
  pages, asynchronously, ``swap_async_max`` in flight, as the daemon does);
- ``vm_in``: then timed: ``obj.read_pages`` over every page in chunks of
  ``--chunk`` pages (batched page-ins: ``SwapSpace.read_many``, one pipeline
  per server);
- ``raw_out`` / ``raw_in``: redis-py alone, the same number of 4 KiB values,
  pipelines of 64 SETs (keys of one pipeline sharing a hash tag on the
  cluster, as the device's do) and pipelines of ``--chunk`` GETs.

Each rep runs vm then raw (A B A B ...); the JSON has the medians, the
per-rep ratios vm / raw, the client's and the servers' CPU time per phase
(where the bottleneck is), and the latency of one remote fault broken down:
a PING and a raw 4 KiB GET (network + server), the device's one-block read
(plus our request path), and a fault through the VM (plus the fault path).
The cluster is measured with ``replicas=0`` and, as an extra row, with
``replicas=1`` (every write waits for a replica). Usage::

    python benchmarks/redis_bench.py [--mib 64] [--reps 5] [--chunk 1024] \
        [--out benchmarks/results/redis.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np

from vmpager.devices.url import open_swap_url
from vmpager.testing.redis import RedisClusterProcesses, RedisServer
from vmpager.vm.config import VMConfig
from vmpager.vm.system import VM

PAGE = 4096
PIPE = 64
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
    server = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout
    import redis

    try:
        import hiredis  # noqa: F401

        parser = "hiredis"
    except ImportError:
        parser = "python"
    return {
        "uname": " ".join(platform.uname()),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kib / (1 << 20), 1),
        "python": sys.version.split()[0],
        "redis_server": server.strip(),
        "redis_py": redis.__version__,
        "redis_py_parser": parser,
        "network": "loopback (servers on this machine)",
    }


def cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds of processes (the redis-servers)."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS


class Meter:
    """Wall time, this process's CPU time and the servers' CPU time of one phase."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids

    def __call__(self, fn: Callable[[], int]) -> dict[str, float]:
        c0, s0, t0 = time.process_time(), cpu_s(self.pids), time.perf_counter()
        pages = fn()
        t1, c1, s1 = time.perf_counter(), time.process_time(), cpu_s(self.pids)
        wall = t1 - t0
        return {
            "pages": pages,
            "seconds": round(wall, 4),
            "pages_per_s": round(pages / wall, 1),
            "client_cpu_fraction": round((c1 - c0) / wall, 3),
            "server_cpu_fraction": round((s1 - s0) / wall, 3),
        }


def vm_run(
    url: str, npages: int, chunk: int, meter: Meter, data: np.ndarray
) -> tuple[dict[str, float], dict[str, float]]:
    config = replace(VMConfig(), daemon_thread=False)
    memory = (npages + npages // 4 + 256) * PAGE
    with VM(memory=memory, swap=[url], config=config) as vm:
        obj = vm.allocate(npages * PAGE)
        obj.write_pages(np.arange(npages), data)
        before = vm.statistics()

        def out() -> int:
            # As the page daemon does: clusters written asynchronously, a few in flight.
            vm.pageout(npages, asynchronous=True)
            vm.sync()
            return vm.statistics().pageout_pages - before.pageout_pages

        out_m = meter(out)
        mid = vm.statistics()
        assert mid.resident_npages < npages // 10, mid.resident_npages

        def back() -> int:
            for first in range(0, npages, chunk):
                rows = obj.read_pages(np.arange(first, min(first + chunk, npages)))
                if first == 0:
                    assert np.array_equal(rows[:4], data[:4])
            return vm.statistics().pagein_pages - mid.pagein_pages

        in_m = meter(back)
        vm.check()
    return out_m, in_m


def raw_run(
    client: Any, npages: int, chunk: int, meter: Meter, data: np.ndarray, cluster: bool
) -> tuple[dict[str, float], dict[str, float]]:
    tag = os.urandom(6).hex()
    rows = [data[i].tobytes() for i in range(npages)]  # what a client would hold: bytes

    def key(i: int) -> bytes:
        if cluster:
            return b"{raw%s:%d}%d" % (tag.encode(), i // PIPE, i)
        return b"raw%s:%d" % (tag.encode(), i)

    keys = [key(i) for i in range(npages)]

    def out() -> int:
        for first in range(0, npages, PIPE):
            pipe = client.pipeline(transaction=False)
            for i in range(first, min(first + PIPE, npages)):
                pipe.set(keys[i], rows[i])
            pipe.execute()
        return npages

    def back() -> int:
        for first in range(0, npages, chunk):
            pipe = client.pipeline(transaction=False)
            for i in range(first, min(first + chunk, npages)):
                pipe.get(keys[i])
            values = pipe.execute()
            if first == 0:
                assert values[0] == rows[0]
        return npages

    out_m = meter(out)
    in_m = meter(back)
    # Clean up: delete per pipeline batch (one slot each on the cluster).
    for first in range(0, npages, PIPE):
        pipe = client.pipeline(transaction=False)
        for i in range(first, min(first + PIPE, npages)):
            pipe.unlink(keys[i])
        pipe.execute()
    return out_m, in_m


def fault_latency(url: str, client: Any, reps: int = 400) -> dict[str, float]:
    """Median µs: PING, raw GET of 4 KiB, device read of one block, one fault through the VM."""
    rng = np.random.default_rng(1)
    npages = 2048
    device = open_swap_url(f"{url}?size={npages * PAGE}", PAGE)
    payload = rng.integers(0, 256, size=(npages, PAGE), dtype=np.uint8)
    for first in range(0, npages, 64):
        device.write_blocks(first, [payload[first : first + 64].tobytes()])
    buf = bytearray(PAGE)

    def median_us(fn: Callable[[int], object]) -> float:
        times = []
        for i in range(reps):
            t0 = time.perf_counter()
            fn(i)
            times.append(time.perf_counter() - t0)
        return round(statistics.median(times) * 1e6, 1)

    is_cluster = "+cluster" in url
    raw_key = b"{lat}k" if is_cluster else b"lat:k"
    client.set(raw_key, payload[0].tobytes())
    ping = median_us(lambda i: client.ping())
    raw_get = median_us(lambda i: client.get(raw_key))
    dev_read = median_us(lambda i: device.read_blocks(int(i * 7 % npages), [buf]))
    client.delete(raw_key)
    device.close()
    # One fault: a small VM whose object lives on swap; each read faults one page
    # (no read-around), from a random place.
    config = replace(
        VMConfig(), daemon_thread=False, readaround_npages=0, sequential_readahead=False
    )
    with VM(memory=64 * PAGE, swap=[f"{url}?size={2 * npages * PAGE}"], config=config) as vm:
        obj = vm.allocate(npages * PAGE)
        obj.write_pages(np.arange(npages), payload)
        vm.pageout()
        vm.sync()
        order = rng.permutation(npages)
        fault = median_us(lambda i: obj.read(int(order[i]) * PAGE, 8))
    return {
        "ping_us": ping,
        "raw_get_4k_us": raw_get,
        "device_read_1_block_us": dev_read,
        "vm_fault_us": fault,
        "network_and_server_us": raw_get,
        "device_request_path_us": round(dev_read - raw_get, 1),
        "vm_fault_path_us": round(fault - dev_read, 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import redis.cluster

    import redis

    load_at_start = os.getloadavg()
    npages = args.mib * 256
    rng = np.random.default_rng(42)
    data = rng.integers(0, 256, size=(npages, PAGE), dtype=np.uint8)
    server = RedisServer()
    cluster = RedisClusterProcesses(masters=3, replicas=1)
    results: dict[str, Any] = {}
    try:
        targets = {
            "server": (
                f"{server.url}?size={args.mib * 2}M",
                redis.Redis(host="127.0.0.1", port=server.port),
                False,
            ),
            "cluster": (
                f"{cluster.url}?size={args.mib * 2}M",
                redis.cluster.RedisCluster(host="127.0.0.1", port=cluster.servers[0].port),
                True,
            ),
            "cluster_replicas1": (f"{cluster.url}?size={args.mib * 2}M&replicas=1", None, True),
        }
        pids = {
            "server": [server.process.pid],  # type: ignore[union-attr]
            "cluster": [s.process.pid for s in cluster.servers],  # type: ignore[union-attr]
        }
        pids["cluster_replicas1"] = pids["cluster"]
        for name, (url, client, is_cluster) in targets.items():
            meter = Meter(pids[name])
            reps: dict[str, list[dict[str, float]]] = {
                k: [] for k in ("vm_out", "vm_in", "raw_out", "raw_in")
            }
            for _ in range(args.reps):
                vo, vi = vm_run(url, npages, args.chunk, meter, data)
                reps["vm_out"].append(vo)
                reps["vm_in"].append(vi)
                if client is not None:
                    ro, ri = raw_run(client, npages, args.chunk, meter, data, is_cluster)
                    reps["raw_out"].append(ro)
                    reps["raw_in"].append(ri)
            summary: dict[str, Any] = {"url": url, "reps": reps}
            for phase, runs in reps.items():
                if runs:
                    summary[f"{phase}_pages_per_s_median"] = statistics.median(
                        r["pages_per_s"] for r in runs
                    )
                    summary[f"{phase}_client_cpu_median"] = statistics.median(
                        r["client_cpu_fraction"] for r in runs
                    )
                    summary[f"{phase}_server_cpu_median"] = statistics.median(
                        r["server_cpu_fraction"] for r in runs
                    )
            for direction in ("out", "in"):
                vm_runs, raw_runs = reps[f"vm_{direction}"], reps[f"raw_{direction}"]
                if raw_runs:
                    ratios = [
                        v["pages_per_s"] / r["pages_per_s"]
                        for v, r in zip(vm_runs, raw_runs, strict=True)
                    ]
                    summary[f"ratio_{direction}_median"] = round(statistics.median(ratios), 3)
            if client is not None:
                summary["fault_latency"] = fault_latency(url.split("?")[0], client)
            results[name] = summary
            print(
                f"{name}: out vm {summary['vm_out_pages_per_s_median']:,.0f} "
                f"raw {summary.get('raw_out_pages_per_s_median', 0):,.0f} "
                f"(x{summary.get('ratio_out_median', 0)}); in vm "
                f"{summary['vm_in_pages_per_s_median']:,.0f} raw "
                f"{summary.get('raw_in_pages_per_s_median', 0):,.0f} "
                f"(x{summary.get('ratio_in_median', 0)})",
                file=sys.stderr,
            )
            if client is not None:
                client.close()
    finally:
        cluster.stop()
        server.stop()
    report = {
        "benchmark": "redis",
        "machine": machine(),
        "load_average_at_start": load_at_start,
        "load_average_at_end": os.getloadavg(),
        "config": {
            "mib": args.mib,
            "pages": npages,
            "reps": args.reps,
            "chunk_pages": args.chunk,
            "raw_pipeline_pages": PIPE,
        },
        "results": results,
    }
    text = json.dumps(report, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
