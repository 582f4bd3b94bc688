"""The phases of the standard paging workload on a VM object: fill, access, verify.

One implementation for ``vmpager run``, ``vmpager bench`` and
``benchmarks/paging.py``. ``obj`` is anything with the object calls used
(``write``, ``read``, ``readinto``; ``read_words``/``write_words`` for the
batched access phase): a ``VMObject`` here. Every phase blocks for as long as
its page-ins and pageouts take; progress is reported to a ``Bar``.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from vmpager.console import Bar
from vmpager.vm.system import VM
from vmpager.workload import Workload, pattern_report

__all__ = ["FILL_CHUNK_NPAGES", "access", "batched_access", "fill", "run_pattern", "verify"]

#: Pages written or verified per call of the fill and the verification.
FILL_CHUNK_NPAGES = 256
# Accesses between two progress updates of the access loop.
_ACCESS_STEP = 4096


class Indexed(Protocol):
    """What the access loops need of a ``Workload``: the indices and the page size."""

    @property
    def indices(self) -> NDArray[np.int64]: ...

    @property
    def page_size(self) -> int: ...


def fill(obj: Any, workload: Workload, bar: Bar) -> None:
    """Write every page of ``workload`` into ``obj``, FILL_CHUNK_NPAGES pages per call."""
    ps = workload.page_size
    for first in range(0, workload.npages, FILL_CHUNK_NPAGES):
        count = min(FILL_CHUNK_NPAGES, workload.npages - first)
        obj.write(first * ps, workload.fill_pages(first, count).tobytes())
        bar.update(first + count)
    bar.finish()


def access(obj: Any, workload: Indexed, bar: Bar) -> float:
    """The access phase, one 8-byte ``read`` and one ``write`` per access; returns seconds."""
    ps = workload.page_size
    read = obj.read
    write = obj.write
    indices = workload.indices.tolist()
    start = time.perf_counter()
    for base in range(0, len(indices), _ACCESS_STEP):
        for p in indices[base : base + _ACCESS_STEP]:
            offset = p * ps
            value = int.from_bytes(read(offset, 8), "little")
            write(offset, ((value + 1) & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little"))
        bar.update(base + _ACCESS_STEP)
    elapsed = time.perf_counter() - start
    bar.finish()
    return elapsed


def batched_access(obj: Any, workload: Indexed, batch: int, bar: Bar) -> float:
    """The access phase through ``read_words``/``write_words``, ``batch`` accesses per pair.

    A page accessed k times in one window is read once and written back plus
    k: the same final contents as the per-access loop. Returns seconds.
    """
    ps = workload.page_size
    indices = workload.indices
    start = time.perf_counter()
    for base in range(0, len(indices), batch):
        pages, counts = np.unique(indices[base : base + batch], return_counts=True)
        offsets = pages * ps
        values = obj.read_words(offsets)
        obj.write_words(offsets, values + counts.astype(np.uint64))
        bar.update(base + batch)
    elapsed = time.perf_counter() - start
    bar.finish()
    return elapsed


def verify(obj: Any, workload: Workload, bar: Bar) -> int:
    """Compare every page with what it must hold; returns the number of bad pages."""
    ps = workload.page_size
    expected0 = workload.expected_word0()
    bad = 0
    buf = np.empty((FILL_CHUNK_NPAGES, ps // 8), dtype=np.uint64)
    for first in range(0, workload.npages, FILL_CHUNK_NPAGES):
        count = min(FILL_CHUNK_NPAGES, workload.npages - first)
        got = buf[:count]
        obj.readinto(first * ps, got)
        want = workload.fill_pages(first, count)
        want[:, 0] = expected0[first : first + count]
        bad += int(np.count_nonzero((got != want).any(axis=1)))
        bar.update(first + count)
    bar.finish()
    return bad


def run_pattern(
    workload: Workload,
    *,
    memory: int,
    swap: list[str] | None,
    verify_pages: bool,
    bars: Any,
) -> dict[str, Any]:
    """Fill, time the access phase, verify: the report of one pattern of ``vmpager run``.

    ``bars(label, total)`` makes the progress bar of each phase (a
    ``Console.bar``). Opens and closes its own VM; ``vm.check()`` runs at the
    end. Raises what ``VM()`` raises for bad swap devices.
    """
    size = workload.size_bytes
    npages = workload.npages
    with VM(memory=memory, swap=swap, page_size=workload.page_size) as vm:
        obj = vm.allocate(size)
        t0 = time.perf_counter()
        fill(obj, workload, bars("fill", npages))
        fill_s = time.perf_counter() - t0
        before = vm.statistics()
        elapsed = access(obj, workload, bars(workload.pattern, workload.naccesses))
        after = vm.statistics()
        bad = verify(obj, workload, bars("verify", npages)) if verify_pages else None
        vm.check()
    return pattern_report(
        workload,
        memory=memory,
        elapsed=elapsed,
        fill_s=fill_s,
        before=before,
        after=after,
        verified=verify_pages,
        bad=bad,
    )
