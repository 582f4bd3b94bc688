"""Transparent paging: VM objects as plain memory (numpy arrays, memoryviews).

A pager process runs a VM for the mapped objects of a client and serves its
page faults through userfaultfd; see docs/mapped.md. ``VM.array`` and
``VM.object_of`` are the usual entry points.
"""

from vmpager.mapped.client import MappedObject, PagerDied, PagerProcess
from vmpager.mapped.memmap import flush, memmap
from vmpager.mapped.uffd import UserfaultfdUnavailable

__all__ = [
    "MappedObject",
    "PagerDied",
    "PagerProcess",
    "UserfaultfdUnavailable",
    "flush",
    "memmap",
]
