"""Server CPU per NBD request: the request loop and the protocol, without a real client.

A client thread in this process pipelines 4 KiB requests at queue depth 16
over loopback TCP to ``NbdServer(MemoryBackend)`` and reads the replies; the
figure is the CPU time of the server's connection thread (its own thread
clock, ``pthread_getcpuclockid``) divided by the requests it served, so the
client's cost and the machine's other load stay out of it. Workloads: reads
and writes, with simple and with structured replies.

``--compare-src DIR`` measures a second source tree (another checkout's
``src``) in turns with this one (A B A B ..., each in a fresh process) and
reports the ratios this/other per rep and their median: the way to show that
a change to the request path did not make it slower. Usage::

    python benchmarks/nbd_wire_bench.py [--requests 80000] [--reps 5] \\
        [--compare-src /path/to/other/src] [--out benchmarks/results/nbd_wire.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

QUEUE_DEPTH = 16
BLOCK = 4096
SIZE = 64 << 20


def measure(nrequests: int) -> dict[str, float]:
    """µs of server-thread CPU per request for each workload (this interpreter's vmpager)."""
    from vmpager.nbd import MemoryBackend, NbdServer
    from vmpager.nbd import protocol as p
    from vmpager.testing.nbd import RawNbdClient

    backend = MemoryBackend(SIZE)
    backend.write(0, os.urandom(1 << 20) * (SIZE >> 20))
    out: dict[str, float] = {}
    # Sparse reads would ask the backend for extents: keep every read a plain one.
    with NbdServer({"disk": backend}, sparse_read_bytes=None) as server:
        for structured in (False, True):
            for kind in ("read", "write"):
                client = RawNbdClient(server.address)
                client.connect()
                client.go("disk", structured=structured)
                batch = bytearray()
                for i in range(QUEUE_DEPTH):
                    offset = (i * 7919 * BLOCK) % SIZE
                    command = p.NBD_CMD_READ if kind == "read" else p.NBD_CMD_WRITE
                    batch += p.REQUEST.pack(p.REQUEST_MAGIC, 0, command, i, offset, BLOCK)
                    if kind == "write":
                        batch += bytes(BLOCK)
                if kind == "read":
                    reply_bytes = QUEUE_DEPTH * ((28 if structured else 16) + BLOCK)
                else:
                    reply_bytes = QUEUE_DEPTH * 16
                buffer = bytearray(reply_bytes)
                view = memoryview(buffer)
                conn_threads = [
                    t for t in threading.enumerate() if t.name.startswith("vmpager-nbd-conn-")
                ]
                thread = max(conn_threads, key=lambda t: t.name.split("-")[-1].zfill(8))
                assert thread.ident is not None
                clock = time.pthread_getcpuclockid(thread.ident)
                rounds = nrequests // QUEUE_DEPTH
                start = time.clock_gettime(clock)
                for _ in range(rounds):
                    client.sock.sendall(batch)
                    got = 0
                    while got < reply_bytes:
                        got += client.sock.recv_into(view[got:])
                used = time.clock_gettime(clock) - start
                client.close()
                name = f"{kind}_{'structured' if structured else 'simple'}"
                out[name] = round(used / (rounds * QUEUE_DEPTH) * 1e6, 3)
    return out


def run_child(src: str | None, nrequests: int) -> dict[str, float]:
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = src
    result = subprocess.run(
        [sys.executable, __file__, "--child", "--requests", str(nrequests)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    parsed: dict[str, float] = json.loads(result.stdout)
    return parsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=80000)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--compare-src", default=None, help="another source tree to measure")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.requests)))
        return
    this_src = str(Path(__file__).resolve().parent.parent / "src")
    report: dict[str, Any] = {
        "benchmark": "nbd_wire_bench",
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "loadavg_start": os.getloadavg(),
        },
        "config": {
            "requests_per_workload": args.requests,
            "reps": args.reps,
            "queue_depth": QUEUE_DEPTH,
            "block_bytes": BLOCK,
            "metric": "server connection thread CPU µs per request",
            "this_src": this_src,
            "other_src": args.compare_src,
        },
    }
    runs: dict[str, list[dict[str, float]]] = {"this": [], "other": []}
    for _ in range(args.reps):
        runs["this"].append(run_child(this_src, args.requests))
        if args.compare_src:
            runs["other"].append(run_child(args.compare_src, args.requests))
    results: dict[str, Any] = {}
    for workload in runs["this"][0]:
        mine = [r[workload] for r in runs["this"]]
        entry: dict[str, Any] = {"this_us": mine, "this_median_us": statistics.median(mine)}
        if args.compare_src:
            theirs = [r[workload] for r in runs["other"]]
            ratios = [round(a / b, 3) for a, b in zip(mine, theirs, strict=True)]
            entry |= {
                "other_us": theirs,
                "other_median_us": statistics.median(theirs),
                "ratio_this_over_other_per_rep": ratios,
                "ratio_this_over_other_median": statistics.median(ratios),
            }
        results[workload] = entry
    report["results"] = results
    report["machine"]["loadavg_end"] = os.getloadavg()
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
