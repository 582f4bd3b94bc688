"""The standard paging workload on the kernel's own swap, for ``vmpager bench``.

Runs ``kworkload.c`` (shipped with the package, compiled on the spot with the
system's C compiler) on an anonymous region inside a memory cgroup with a
memory limit, swapping to a swap file created for the run. The page-index
sequence comes from ``vmpager.workload`` through a file, so the kernel and
vmpager perform the very same accesses; afterwards the program's checksum of
the words it read and a few probe words of the fill are compared with what
``vmpager.workload`` predicts, so a run that did something else is refused.

Needs root on Linux, ``mkswap``/``swapon``/``swapoff``, a memory cgroup
controller and a C compiler; :func:`unavailable` says which is missing.
Every setting changed is restored:

- it refuses to start when any swap is already active (it never touches swap
  it did not create); the swap file it creates is always turned off and
  removed, also on errors, Ctrl-C and SIGTERM (see :func:`sigterm_as_exit`);
- the cgroup it creates holds only the process it started; on the way out any
  process still in it is killed by pid and the cgroup removed; when the
  memory controller had to be enabled in the parent's
  ``cgroup.subtree_control`` (cgroup v2), it is disabled again.

From Python::

    from vmpager.bench import kernel
    with kernel.SwapFile(4096) as swap:
        result = kernel.run_kernel("zipf", 2048, 512, swap=swap)

or ``kernel.run_kernel("zipf", 2048, 512)``, which creates and removes a swap
file around the single run. ``benchmarks/kernel/kswap.py`` is the command
line of this module alone.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Final

import numpy as np

from vmpager.workload import PATTERNS, Content, Pattern, Workload

SOURCE: Final = Path(__file__).resolve().parent / "kworkload.c"
PAGE_BYTES: Final = 4096
MIB: Final = 1 << 20


class KernelBenchError(RuntimeError):
    """The kernel baseline cannot run here (not root, swap busy, no memory cgroup, ...)."""


def compiler() -> str | None:
    """The C compiler to build kworkload.c with: $CC, else cc, gcc or clang on PATH."""
    candidates = [os.environ["CC"]] if os.environ.get("CC") else []
    for name in (*candidates, "cc", "gcc", "clang"):
        found = shutil.which(name)
        if found:
            return found
    return None


def unavailable() -> str | None:
    """None when the kernel side can run here, else one sentence saying why not.

    Checks, in order: Linux, root, the swap tools, no swap already active (it
    never touches swap it did not create), a memory cgroup controller and a C
    compiler. Cheap; changes nothing.
    """
    if sys.platform != "linux":
        return f"it needs Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return "it needs root (swapon and memory cgroups); run as root"
    missing = [tool for tool in ("mkswap", "swapon", "swapoff") if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not found; install util-linux"
    busy = active_swaps()
    if busy:
        return (
            f"swap is already active ({', '.join(busy)}); the kernel side only uses a swap "
            "file of its own, so turn that swap off first"
        )
    try:
        detect_memory_cgroup()
    except KernelBenchError as exc:
        return str(exc)
    if compiler() is None:
        return "no C compiler (cc, gcc or clang) to build kworkload.c; install gcc"
    return None


# ---- machine -------------------------------------------------------------------------------


def _read(path: str | Path, default: str = "n/a") -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return default


def _command(*argv: str) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "n/a"
    return done.stdout.strip() or done.stderr.strip()


def describe_machine(swap_dir: str | Path | None = None) -> dict[str, Any]:
    """The machine and the kernel settings that shape swap performance."""
    cpu_model = "n/a"
    for line in _read("/proc/cpuinfo", "").splitlines():
        if line.startswith("model name"):
            cpu_model = line.split(":", 1)[1].strip()
            break
    mem_kib = 0
    for line in _read("/proc/meminfo", "").splitlines():
        if line.startswith("MemTotal:"):
            mem_kib = int(line.split()[1])
    description: dict[str, Any] = {
        "uname": _command("uname", "-a"),
        "cpu_model": cpu_model,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kib / (1 << 20), 1),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "cc": _command("cc", "--version").splitlines()[0] if shutil.which("cc") else "n/a",
        "vm.swappiness": _read("/proc/sys/vm/swappiness"),
        "vm.page-cluster": _read("/proc/sys/vm/page-cluster"),
        "transparent_hugepage": _read("/sys/kernel/mm/transparent_hugepage/enabled"),
        "zswap": _read("/sys/module/zswap/parameters/enabled"),
    }
    if swap_dir is not None:
        description["swap_dir_filesystem"] = _command(
            "df", "--output=source,fstype", str(swap_dir)
        ).splitlines()[-1]
    return description


# ---- swap file -----------------------------------------------------------------------------


def active_swaps() -> list[str]:
    """Names of the active swap areas (from /proc/swaps)."""
    lines = _read("/proc/swaps", "").splitlines()[1:]
    return [line.split()[0] for line in lines if line.strip()]


class SwapFile:
    """A swap file of ``size_mib`` MiB in ``directory``, active while the context is open.

    Entering refuses (``KernelBenchError``) when any swap is already active.
    Exiting always turns the file off and removes it. Blocks while the file is
    written (dd fallback) and while swapoff reads swapped pages back.
    """

    def __init__(self, size_mib: int = 4096, directory: str | Path | None = None) -> None:
        if size_mib < 1:
            raise ValueError(f"size_mib must be >= 1, got {size_mib}")
        self.size_mib = size_mib
        self.directory = Path(directory or tempfile.gettempdir())
        self.path = self.directory / f"kswap-bench.{os.getpid()}.swap"
        self.method = ""
        self._active = False

    def __enter__(self) -> SwapFile:
        if os.geteuid() != 0:
            raise KernelBenchError("creating a swap file needs root")
        busy = active_swaps()
        if busy:
            raise KernelBenchError(f"refusing: swap already active (not ours): {busy}")
        try:
            self._create()
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._remove()

    def _create(self) -> None:
        self.path.unlink(missing_ok=True)
        size_bytes = self.size_mib * MIB
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(fd, 0, size_bytes)
        finally:
            os.close(fd)
        self.method = "fallocate"
        if self._swapon():
            return
        # Some filesystems refuse swap files with unwritten extents: write zeros.
        self.path.unlink()
        block = bytes(MIB)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            for _ in range(self.size_mib):
                os.write(fd, block)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.method = "dd"
        if not self._swapon():
            raise KernelBenchError(f"swapon {self.path} failed after writing it with zeros")

    def _swapon(self) -> bool:
        subprocess.run(["mkswap", "-q", str(self.path)], check=True, capture_output=True)
        done = subprocess.run(["swapon", str(self.path)], capture_output=True, text=True)
        self._active = done.returncode == 0
        return self._active

    def _remove(self) -> None:
        if self._active or str(self.path) in active_swaps():
            done = subprocess.run(["swapoff", str(self.path)], capture_output=True, text=True)
            if done.returncode != 0:
                print(f"WARNING: swapoff {self.path}: {done.stderr.strip()}", file=sys.stderr)
            self._active = False
        self.path.unlink(missing_ok=True)

    def describe(self) -> dict[str, Any]:
        """Where the swap file is and how it was made."""
        return {
            "kind": "file",
            "path": str(self.path),
            "size_mib": self.size_mib,
            "created_with": self.method,
            "filesystem": _command("df", "--output=source,fstype", str(self.directory))
            .splitlines()[-1]
            .split(),
        }


# ---- memory cgroup -------------------------------------------------------------------------


def detect_memory_cgroup() -> tuple[str, Path]:
    """Return ("v2", mount) or ("v1", mount) of a usable memory controller.

    cgroup v2 counts when its root lists ``memory`` in cgroup.controllers;
    otherwise a cgroup v1 hierarchy mounted with the ``memory`` option.
    """
    mounts = [line.split() for line in _read("/proc/mounts", "").splitlines()]
    for fields in mounts:
        if len(fields) > 2 and fields[2] == "cgroup2":
            controllers = _read(Path(fields[1]) / "cgroup.controllers", "").split()
            if "memory" in controllers:
                return "v2", Path(fields[1])
    for fields in mounts:
        if len(fields) > 3 and fields[2] == "cgroup" and "memory" in fields[3].split(","):
            return "v1", Path(fields[1])
    raise KernelBenchError(
        "no memory cgroup controller: neither a cgroup2 mount listing 'memory' in "
        "cgroup.controllers nor a cgroup v1 mount with the memory option"
    )


class MemoryCgroup:
    """A fresh memory cgroup limited to ``limit_mib`` MiB (None: no limit), removed on exit.

    ``preexec`` moves the calling (child) process into it, for
    ``subprocess.Popen(preexec_fn=...)``. Exiting kills, by pid, any process
    still in the cgroup -- only processes started into it by this object --
    and removes it.
    """

    def __init__(self, limit_mib: int | None) -> None:
        self.limit_mib = limit_mib
        self.version, mount = detect_memory_cgroup()
        self.path = mount / f"kswap-bench.{os.getpid()}.{time.monotonic_ns()}"
        #: The parent's subtree_control, when this object enabled memory in it.
        self._enabled_in: Path | None = None

    def __enter__(self) -> MemoryCgroup:
        if self.version == "v2":
            control = self.path.parent / "cgroup.subtree_control"
            if "memory" not in _read(control, "").split():
                control.write_text("+memory")
                self._enabled_in = control
        try:
            self.path.mkdir()
        except BaseException:
            self._restore_controller()
            raise
        try:
            if self.limit_mib is not None:
                limit = str(self.limit_mib * MIB)
                if self.version == "v2":
                    (self.path / "memory.max").write_text(limit)
                    (self.path / "memory.swap.max").write_text("max")
                else:
                    (self.path / "memory.limit_in_bytes").write_text(limit)
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._remove()

    def preexec(self) -> None:
        """Join the cgroup (runs in the forked child before exec)."""
        with open(self.path / "cgroup.procs", "w") as procs:
            procs.write(str(os.getpid()))

    def statistics(self) -> dict[str, Any]:
        """Peak usage and limit hits of the cgroup so far."""
        if self.version == "v2":
            events = dict(
                line.split() for line in _read(self.path / "memory.events", "").splitlines()
            )
            peak = _read(self.path / "memory.peak", "-1")
            return {
                "cgroup": "v2",
                "peak_mib": int(peak) // MIB if peak.lstrip("-").isdigit() else None,
                "events_max": int(events.get("max", -1)),
                "events_oom_kill": int(events.get("oom_kill", -1)),
            }
        return {
            "cgroup": "v1",
            "max_usage_mib": int(_read(self.path / "memory.max_usage_in_bytes", "0")) // MIB,
            "failcnt": int(_read(self.path / "memory.failcnt", "-1")),
            "swappiness": int(_read(self.path / "memory.swappiness", "-1")),
        }

    def _remove(self) -> None:
        if not self.path.is_dir():
            self._restore_controller()
            return
        for pid_text in _read(self.path / "cgroup.procs", "").split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid_text), signal.SIGKILL)
        for _ in range(20):
            try:
                self.path.rmdir()
                break
            except OSError:
                time.sleep(0.25)
        else:
            print(f"WARNING: could not remove cgroup {self.path}", file=sys.stderr)
            return
        self._restore_controller()

    def _restore_controller(self) -> None:
        """Disable the memory controller again where this object enabled it."""
        if self._enabled_in is None:
            return
        try:
            self._enabled_in.write_text("-memory")
        except OSError as exc:
            print(f"WARNING: could not restore {self._enabled_in}: {exc}", file=sys.stderr)
        self._enabled_in = None


# ---- one run -------------------------------------------------------------------------------


def compile_kworkload(directory: str | Path) -> Path:
    """Compile kworkload.c with ``-O2`` into ``directory``; return the binary's path.

    Raises ``KernelBenchError`` (with the compiler's first error line) when
    there is no compiler or the build fails. Blocks for about a second.
    """
    binary = Path(directory) / "kworkload"
    cc = compiler()
    if cc is None:
        raise KernelBenchError("no C compiler (cc, gcc or clang) to build kworkload.c")
    done = subprocess.run(
        [cc, "-O2", "-Wall", "-Wextra", "-o", str(binary), str(SOURCE)],
        check=False,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        first = (done.stderr.strip().splitlines() or ["no message"])[0]
        raise KernelBenchError(f"{cc} could not build kworkload.c: {first}")
    return binary


def _verify(workload: Workload, result: dict[str, Any]) -> list[str]:
    """What the C program's output contradicts in vmpager.workload's prediction."""
    problems = []
    expected = workload.access_checksum(result["accesses"])
    if result["checksum"] != expected:
        problems.append(f"checksum {result['checksum']} != expected {expected}")
    first = workload.fill_pages(0, 1)[0]
    last = workload.fill_pages(workload.npages - 1, 1)[0]
    probes = {
        "first_w1": int(first[1]),
        "first_w511": int(first[-1]),
        "last_w1": int(last[1]),
        "last_w511": int(last[-1]),
    }
    for name, value in probes.items():
        if result["probe"][name] != value:
            problems.append(f"probe {name} {result['probe'][name]} != expected {value}")
    return problems


def run_kernel(
    pattern: Pattern,
    mib: int = 2048,
    limit_mib: int | None = 512,
    *,
    content: Content = "random",
    seed: int = 42,
    accesses: int | None = None,
    max_seconds: float = 300.0,
    swap: SwapFile | None = None,
    swap_mib: int = 4096,
    swap_dir: str | Path | None = None,
    binary: str | Path | None = None,
    willneed: int = 0,
) -> dict[str, Any]:
    """Run the standard workload once on the kernel's VM and return its measurements.

    ``willneed`` > 0 is the batched variant: before each window of that many
    accesses the program calls madvise(MADV_WILLNEED) on their pages, which
    starts their swap-ins together (the kernel's counterpart of vmpager's
    batched calls).

    ``limit_mib`` None runs without a memory limit (the RAM ceiling) and
    without swap. With a limit, swap is ``swap`` when given (an open
    ``SwapFile``), else a swap file created for this run only (refused when
    other swap is active). ``binary`` is a compiled kworkload (compiled into a
    temporary directory when omitted). Blocks for the whole run (tens of
    seconds at the standard size); the access phase stops after
    ``max_seconds``. Raises ``KernelBenchError`` when the run cannot be done or
    its output contradicts vmpager.workload.
    """
    if pattern not in PATTERNS:
        raise ValueError(f"pattern must be one of {', '.join(PATTERNS)}; got {pattern!r}")
    if mib < 1 or (limit_mib is not None and limit_mib < 1):
        raise ValueError(f"mib and limit_mib must be >= 1, got {mib} and {limit_mib}")
    npages = mib * MIB // PAGE_BYTES
    workload = Workload(npages, pattern, seed=seed, accesses=accesses, content=content)
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kswap-")))
        program = Path(binary) if binary is not None else compile_kworkload(workdir)
        index_file = workdir / f"{pattern}.u32"
        workload.indices.astype("<u4").tofile(index_file)
        if limit_mib is not None and swap is None:
            swap = stack.enter_context(SwapFile(swap_mib, swap_dir))
        cgroup = stack.enter_context(MemoryCgroup(limit_mib))
        argv = [
            str(program),
            "--mib", str(mib),
            "--index-file", str(index_file),
            "--seed", str(seed),
            "--fill-offset", str(workload.index_draws),
            "--content", content,
            "--max-seconds", str(max_seconds),
            "--willneed", str(willneed),
        ]  # fmt: skip
        # The machine is shared; the load says how much a number is worth.
        loadavg_before = _read("/proc/loadavg")
        started = time.monotonic()
        process = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=cgroup.preexec,
        )
        try:
            # Generous: the fill alone swaps out most of the region.
            stdout, stderr = process.communicate(timeout=max_seconds + 600)
        except BaseException:
            process.kill()
            process.communicate()
            raise
        wall_s = time.monotonic() - started
        loadavg_after = _read("/proc/loadavg")
        cgroup_stats = cgroup.statistics()
    if process.returncode != 0:
        raise KernelBenchError(
            f"kworkload exited with {process.returncode} (negative: signal; an OOM kill "
            f"means the swap is too small): {stderr.strip()}"
        )
    result: dict[str, Any] = json.loads(stdout)
    problems = _verify(workload, result)
    if problems:
        raise KernelBenchError(
            "kworkload did not run the standard workload: " + "; ".join(problems)
        )
    pswpin = result["pswpin"]
    result.update(
        pattern=pattern,
        limit_mib=limit_mib,
        swap=swap.describe() if swap is not None and limit_mib is not None else None,
        verified=True,
        wall_s=round(wall_s, 3),
        loadavg_before=loadavg_before,
        loadavg_after=loadavg_after,
        swapins_per_access=pswpin / result["accesses"] if result["accesses"] else None,
        us_per_swapin=result["access_s"] * 1e6 / pswpin if pswpin > 0 else None,
        **cgroup_stats,
    )
    return result


# ---- command line --------------------------------------------------------------------------

SUMMARY_KEYS: Final = (
    "accesses_per_s",
    "access_s",
    "fill_s",
    "pswpin",
    "pswpout",
    "majflt",
    "swapins_per_access",
    "us_per_swapin",
)


def summarize(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Medians per pattern of the SUMMARY_KEYS over the given runs."""
    by_pattern: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        by_pattern.setdefault(run["pattern"], []).append(run)
    summary: dict[str, dict[str, Any]] = {}
    for pattern, group in by_pattern.items():
        medians: dict[str, Any] = {"reps": len(group)}
        for key in SUMMARY_KEYS:
            values = [run[key] for run in group if run.get(key) is not None]
            medians[key] = statistics.median(values) if values else None
        summary[pattern] = medians
    return summary


@contextlib.contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """Let SIGTERM unwind through the finally blocks (swapoff, cgroup removal).

    Only the main thread can set signal handlers; elsewhere this does nothing.
    """

    def handler(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=2048, help="region size, MiB")
    parser.add_argument(
        "--limit-mib", type=int, default=512, help="cgroup memory limit, MiB (0: no limit, no swap)"
    )
    parser.add_argument("--patterns", default="seq,random,zipf", help="comma-separated")
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--content", choices=("random", "sparse"), default="random")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--accesses", type=int, default=None, help="default: the pattern's")
    parser.add_argument(
        "--max-seconds", type=float, default=300.0, help="bound on each access phase"
    )
    parser.add_argument("--swap-mib", type=int, default=4096)
    parser.add_argument("--swap-dir", default=tempfile.gettempdir())
    parser.add_argument(
        "--willneed", type=int, default=0, help="madvise(MADV_WILLNEED) windows of N accesses"
    )
    parser.add_argument("--output", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    patterns = [p for p in args.patterns.split(",") if p]
    for pattern in patterns:
        if pattern not in PATTERNS:
            parser.error(f"--patterns: {pattern!r} is not one of {', '.join(PATTERNS)}")
    if os.geteuid() != 0:
        parser.error("needs root (swapon, cgroups)")
    limit_mib = args.limit_mib or None

    runs: list[dict[str, Any]] = []
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with sigterm_as_exit(), tempfile.TemporaryDirectory(prefix="kswap-bin-") as bindir:
        binary = compile_kworkload(bindir)
        with contextlib.ExitStack() as stack:
            swap = None
            if limit_mib is not None:
                swap = stack.enter_context(SwapFile(args.swap_mib, args.swap_dir))
            # Patterns interleaved within each rep, so drift hits them alike.
            for rep in range(args.reps):
                for pattern in patterns:
                    result = run_kernel(
                        pattern,
                        args.mib,
                        limit_mib,
                        content=args.content,
                        seed=args.seed,
                        accesses=args.accesses,
                        max_seconds=args.max_seconds,
                        swap=swap,
                        binary=binary,
                        willneed=args.willneed,
                    )
                    result["rep"] = rep
                    runs.append(result)
                    print(
                        f"# {pattern} rep {rep}: {result['accesses_per_s']:.0f} accesses/s, "
                        f"pswpin {result['pswpin']}, access {result['access_s']:.1f} s",
                        file=sys.stderr,
                    )
    leftover = active_swaps()
    report = {
        "benchmark": "kernel swap baseline (benchmarks/kernel/kswap.py)",
        "started": started,
        "machine": describe_machine(args.swap_dir),
        "config": {
            "mib": args.mib,
            "npages": args.mib * MIB // PAGE_BYTES,
            "limit_mib": limit_mib,
            "patterns": patterns,
            "reps": args.reps,
            "content": args.content,
            "seed": args.seed,
            "accesses": args.accesses,
            "max_seconds": args.max_seconds,
            "swap_mib": args.swap_mib if limit_mib is not None else None,
        },
        "summary": summarize(runs),
        "runs": runs,
        "swap_left_active": leftover,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.output is not None:
        args.output.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
