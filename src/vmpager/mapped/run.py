"""The standard paging workload through a mapped numpy array (``vmpager run --mapped``).

The same fill, access sequence and verification as ``vmpager run``
(workload.py), but the object is a numpy array of 64-bit words: the fill
assigns whole pages, each access is ``a[w] = a[w] + 1`` on word 0 of a page
(plain indexing, the page faults are served by the pager process), and the
verification compares the array with the expected pages.
"""

from __future__ import annotations

import time
from typing import Any, TextIO

import numpy as np

from vmpager.mapped.client import PagerProcess
from vmpager.workload import Workload, pattern_report

__all__ = ["run_mapped_pattern"]

_CHUNK_NPAGES = 256


def run_mapped_pattern(
    pattern: str,
    *,
    size: int,
    memory: int,
    swap: list[str] | None,
    accesses: int | None,
    verify: bool,
    console: Any = None,
    err: TextIO | None = None,
    page_size: int = 4096,
) -> dict[str, Any]:
    """Fill, time the access phase, verify; the report of one pattern (as ``run_pattern``).

    Progress notes go to ``console.note`` (the command line's console) or to
    ``err``; raises ``UserfaultfdUnavailable`` when userfaultfd cannot be used.
    """

    def note(text: str) -> None:
        if console is not None:
            console.note(text)
        elif err is not None:
            print(text, file=err, flush=True)

    npages = size // page_size
    workload = Workload(npages, pattern, accesses=accesses)  # type: ignore[arg-type]
    wpp = page_size // 8
    with PagerProcess(memory, swap, page_size) as pager:
        a = pager.array((npages, wpp), np.uint64)
        t0 = time.perf_counter()
        for first in range(0, npages, _CHUNK_NPAGES):
            count = min(_CHUNK_NPAGES, npages - first)
            a[first : first + count] = workload.fill_pages(first, count)
        fill_s = time.perf_counter() - t0
        note(f"{pattern}: mapped array of {npages:,} pages filled in {fill_s:.2f} s")
        before = pager.statistics()
        info_before = pager.info()
        words = a.reshape(-1)
        offsets = (workload.indices * wpp).tolist()
        start = time.perf_counter()
        for w in offsets:
            words[w] = words[w] + 1  # numpy wraps at 2**64 as the C program does
        elapsed = time.perf_counter() - start
        note(
            f"{pattern}: {workload.naccesses / elapsed:,.0f} accesses/s "
            f"({workload.naccesses:,} in {elapsed:.2f} s)"
            + ("; verifying every page" if verify else "")
        )
        after = pager.statistics()
        info = pager.info()
        bad = None
        if verify:
            bad = 0
            expected0 = workload.expected_word0()
            for first in range(0, npages, _CHUNK_NPAGES):
                count = min(_CHUNK_NPAGES, npages - first)
                want = workload.fill_pages(first, count)
                want[:, 0] = expected0[first : first + count]
                bad += int(np.count_nonzero((a[first : first + count] != want).any(axis=1)))
        pager.check()
        del a, words
        soft = info["soft_faults"] - info_before["soft_faults"]
        report = pattern_report(
            workload,
            memory=memory,
            elapsed=elapsed,
            fill_s=fill_s,
            before=before,
            after=after,
            verified=verify,
            bad=bad,
        )
        report.update(
            mapped=True,
            soft_faults=soft,
            wp_faults=info["wp_faults"] - info_before["wp_faults"],
            client_faults=info["faults"] - info_before["faults"] + soft,
            ahead_pages=info["ahead_pages"] - info_before["ahead_pages"],
        )
        return report
