"""Helpers for tests of mapped objects: availability, a pager fixture, memory seen from outside."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator

import pytest

from vmpager.mapped.client import PagerProcess
from vmpager.mapped.uffd import Userfaultfd, UserfaultfdUnavailable

PS = 4096


def _available() -> str | None:
    try:
        Userfaultfd().close()
    except UserfaultfdUnavailable as exc:
        return str(exc)
    return None


UNAVAILABLE = _available()
needs_uffd = pytest.mark.skipif(UNAVAILABLE is not None, reason=str(UNAVAILABLE))


def pager_fixture() -> Iterator[PagerProcess]:
    """A pager process with a 64-frame budget (256 KiB)."""
    if UNAVAILABLE is not None:
        pytest.skip(UNAVAILABLE)
    p = PagerProcess("256K")
    yield p
    p.close()


def rollup(pid: int | str) -> dict[str, int]:
    """/proc/<pid>/smaps_rollup, in bytes."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            m = re.match(r"(\w+):\s+(\d+) kB", line)
            if m:
                out[m.group(1)] = int(m.group(2)) * 1024
    return out


def region_rss(base: int, size: int) -> int:
    """Resident bytes of this process's mapping at ``base`` (from /proc/self/smaps)."""
    inside = False
    total = 0
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(x, 16) for x in head.split("-"))
                inside = base <= start and end <= base + size
            elif inside and head == "Rss:":
                total += int(line.split()[1]) * 1024
    return total


def memfd_bytes(pid: int) -> int:
    """Allocated bytes of the pager's memfds, seen from outside (/proc/<pid>/fd)."""
    total = 0
    for name in os.listdir(f"/proc/{pid}/fd"):
        path = f"/proc/{pid}/fd/{name}"
        try:
            if os.readlink(path).startswith("/memfd:vmpager"):
                total += os.stat(path).st_blocks * 512
        except OSError:
            pass
    return total
